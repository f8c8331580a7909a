"""LightningModules and datamodules litplug did not write, for the foreign-module tests
(importable as ``foreign``): Lightning's own demos and hand-written modules of the kinds users bring.

* ``boring()``: ``lightning.pytorch.demos.boring_classes.BoringModel`` (dict output, a StepLR).
* ``lm()``: ``lightning.pytorch.demos.transformer.LightningTransformer`` on a 32-token vocabulary
  (a tiny ``Transformer`` of the demo, dropout 0, no download); ``training_step`` returns the token NLL and
  ``forward`` needs the target too.
* ``Handwritten``: BatchNorm, a per-step scheduler, a dict output, logs in ``training_step``.
* ``Manual``: manual optimisation, with ``batch_loss``.
* ``TwoOptimizers``: manual optimisation stepping two optimizers per batch (a GAN-style
  alternation), with ``batch_loss``: ``trainer.global_step`` grows by 2 per batch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.demos.boring_classes import BoringModel, RandomDataset
from lightning.pytorch.demos.transformer import LightningTransformer, Transformer
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

VOCAB = 32


def boring() -> LightningModule:
    return BoringModel()


def lm() -> LightningModule:
    module = LightningTransformer(vocab_size=VOCAB)
    module.model = Transformer(vocab_size=VOCAB, ninp=16, nhead=2, nhid=16, nlayers=1, dropout=0.0)
    module.prepare_data = lambda: None  # the demo's own downloads WikiText-2; the tests bring data
    return module


class Handwritten(LightningModule):
    """An MLP classifier with BatchNorm, a per-step OneCycle-like schedule and a dict output."""

    def __init__(self, lr: float = 0.1) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.log("mine/loss", loss)
        return {"loss": loss, "logits": logits.detach()}

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val/loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=self.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1.0 + step))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class Manual(LightningModule):
    """Manual optimisation: ``training_step`` does the backward and the step itself."""

    def __init__(self, lr: float = 0.1) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
        self.lr = lr
        self.steps = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def batch_loss(self, batch: Any) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt = self.optimizers()
        opt.zero_grad()
        loss = self.batch_loss(batch)
        self.manual_backward(loss)
        opt.step()
        self.steps += 1
        self.log("mine/loss", loss)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val/loss", self.batch_loss(batch))

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class TwoOptimizers(LightningModule):
    """Manual optimisation with two optimizers stepped one after the other on every batch, each
    on its own loss evaluation (the alternation of a GAN's generator and discriminator)."""

    def __init__(self, lr: float = 0.1) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.first = nn.Sequential(nn.Linear(6, 8), nn.Tanh())
        self.second = nn.Linear(8, 3)
        self.lr = lr
        self.steps = 0  # batches trained

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))

    def batch_loss(self, batch: Any) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def training_step(self, batch: Any, batch_idx: int) -> None:
        for opt in self.optimizers():
            opt.zero_grad()
            loss = self.batch_loss(batch)
            self.manual_backward(loss)
            opt.step()
            self.log("mine/loss", loss)
        self.steps += 1

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val/loss", self.batch_loss(batch))

    def configure_optimizers(self) -> Any:
        return [
            torch.optim.SGD(self.first.parameters(), lr=self.lr),
            torch.optim.SGD(self.second.parameters(), lr=self.lr),
        ]


class ManualNoLoss(LightningModule):
    """Manual optimisation without ``batch_loss``: only ``training_step`` knows the loss."""

    def __init__(self, lr: float = 0.1) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.net = nn.Linear(6, 3)
        self.lr = lr
        self.steps = 0

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt = self.optimizers()
        opt.zero_grad()
        x, y = batch
        self.manual_backward(F.cross_entropy(self.net(x), y))
        opt.step()
        self.steps += 1

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class Split(LightningDataModule):
    """A training set whose first ``forget`` samples form the forget set, the rest the retain set
    (:class:`litplug.protocols.ForgetRetainData`); ``x``/``y`` are tensors of samples."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, forget: int, batch_size: int) -> None:
        super().__init__()
        self.x, self.y, self.forget, self.batch_size = x, y, forget, batch_size

    def _loader(self, sl: slice, shuffle: bool = False) -> DataLoader:
        return DataLoader(TensorDataset(self.x[sl], self.y[sl]), batch_size=self.batch_size, shuffle=shuffle)

    def train_dataloader(self) -> DataLoader:
        return self._loader(slice(None))

    def val_dataloader(self) -> DataLoader:
        return self._loader(slice(0, 2 * self.batch_size))

    def forget_dataloader(self) -> DataLoader:
        return self._loader(slice(0, self.forget))

    def retain_dataloader(self) -> DataLoader:
        return self._loader(slice(self.forget, None))


def tokens(n: int = 32, length: int = 9, batch_size: int = 4, seed: int = 0) -> Split:
    """Random token sequences as ``(inputs, next tokens)``; the first 8 sequences are the forget set."""
    seq = torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))
    return Split(seq[:, :-1].contiguous(), seq[:, 1:].contiguous(), forget=8, batch_size=batch_size)


def features(n: int = 64, batch_size: int = 8, seed: int = 0) -> Split:
    """Gaussian 6-d features with 3 classes; the first 16 samples are the forget set."""
    g = torch.Generator().manual_seed(seed)
    return Split(
        torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g), forget=16, batch_size=batch_size
    )


class Sharded(LightningDataModule):
    """``features`` in index order, sharded by its own ``DistributedSampler`` under DDP or FSDP2
    (Lightning's would reshuffle; run with ``use_distributed_sampler=False``): rank r's k-th batch
    of 8 is half of one process's k-th batch of 16."""

    def __init__(self, batch_size: int, world: int = 1, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.data, self.batch_size, self.world, self.dtype = features(n=64), batch_size, world, dtype

    def train_dataloader(self) -> DataLoader:
        dataset = TensorDataset(self.data.x.to(self.dtype), self.data.y)
        if self.world == 1:
            return DataLoader(dataset, batch_size=self.batch_size)
        sampler = DistributedSampler(dataset, self.world, self.trainer.global_rank, shuffle=False)
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler)


def boring_data(batch_size: int = 4) -> LightningDataModule:
    """BoringModel's random data, batched (its own loaders use batch size 1)."""

    class Boring(LightningDataModule):
        def train_dataloader(self) -> DataLoader:
            return DataLoader(RandomDataset(32, 64), batch_size=batch_size)

        def val_dataloader(self) -> DataLoader:
            return DataLoader(RandomDataset(32, 16), batch_size=batch_size)

    return Boring()
