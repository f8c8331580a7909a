"""SISA: sharded, isolated training, so that deleting a sample retrains only its shard (Bourtoule
et al. 2021, "Machine Unlearning"). The exact baseline of the unlearning family: after a deletion
the ensemble is the one that training without the deleted samples would have given.

The training set is split (seeded) into ``num_shards`` disjoint shards; shard ``k`` trains its own
module from scratch, from seed ``mix_seed(seed, k)`` and in a seeded order of its own samples.
``delete(indices)`` removes the samples from their shards and retrains only those shards, from
scratch: each retrained module is bit-identical to training that shard without the samples.
Predictions average the shard modules' softmax outputs. (SISA's slicing, which resumes a shard from
the checkpoint before the deleted sample's slice, is not implemented: a shard is retrained whole.)

Example:
    >>> from litplug.datamodules import Digits
    >>> from litplug.modules import MLP, Classifier
    >>> dm = Digits(); dm.setup()
    >>> sisa = SISA(lambda: Classifier(MLP([1, 8, 8], 10, hidden=[32]), num_classes=10), dm.train_set,
    ...             num_shards=4, max_epochs=1)
    >>> sisa.fit()  # doctest: +SKIP
    >>> sisa.delete([0, 1, 2])  # doctest: +SKIP
    [...]
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from lightning.pytorch import LightningModule, Trainer, seed_everything
from torch.utils.data import DataLoader, Dataset, Subset

from ..datamodules.base import EpochShuffle
from ..plumbing import mix_seed
from ..validation import check_int, check_positive_int, check_str

__all__ = ["SISA"]


class SISA:
    """An ensemble of ``num_shards`` modules, each trained on its own shard of ``dataset``.

    Args:
        make_module: builds a fresh LightningModule (the same architecture for every shard) whose
            ``forward`` gives class logits and whose ``training_step`` takes the dataset's batches.
        dataset: the map-style training set.
        num_shards: number of shards (>= 1, at most ``len(dataset)``).
        seed: seed of the partition, of each shard's initialisation and of its order.
        batch_size: samples per batch.
        max_epochs: epochs per shard.
        accelerator: the ``Trainer``'s accelerator for every shard (one device).
    """

    def __init__(
        self,
        make_module: Callable[[], LightningModule],
        dataset: Dataset,
        num_shards: int = 5,
        seed: int = 0,
        batch_size: int = 64,
        max_epochs: int = 10,
        accelerator: str = "cpu",
    ) -> None:
        if not callable(make_module):
            raise TypeError(f"`make_module` must be a callable returning a LightningModule, got {make_module!r:.60}")
        if not isinstance(dataset, Dataset):
            raise TypeError(f"`dataset` must be a map-style torch Dataset, got {type(dataset).__name__}")
        check_str("accelerator", accelerator)
        n = len(dataset)  # type: ignore[arg-type]
        check_int("num_shards", num_shards, low=1, high=max(1, n))
        check_int("seed", seed)
        check_positive_int("batch_size", batch_size)
        check_positive_int("max_epochs", max_epochs)
        self.make_module, self.dataset, self.seed = make_module, dataset, seed
        self.batch_size, self.max_epochs = batch_size, max_epochs
        self.accelerator = accelerator
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
        self.shards: list[list[int]] = [sorted(order[k::num_shards]) for k in range(num_shards)]
        self.modules: list[LightningModule | None] = [None] * num_shards

    def train_shard(self, k: int, indices: list[int]) -> LightningModule:
        """A module trained from scratch on ``indices`` as shard ``k`` (a function of ``k`` and
        ``indices`` only: the same call gives the same weights)."""
        seed_everything(mix_seed(self.seed, k), verbose=False)
        module = self.make_module()
        subset = Subset(self.dataset, indices)
        loader = DataLoader(
            subset, batch_size=self.batch_size, sampler=EpochShuffle(len(subset), mix_seed(self.seed, k))
        )
        Trainer(
            max_epochs=self.max_epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, accelerator=self.accelerator, devices=1,
        ).fit(module, loader)  # fmt: skip
        return module.eval()

    def fit(self) -> None:
        """Train every shard."""
        for k, indices in enumerate(self.shards):
            self.modules[k] = self.train_shard(k, indices)

    def delete(self, indices: Iterable[int]) -> list[int]:
        """Remove ``indices`` (positions in ``dataset``) and retrain the shards that held them;
        returns those shards. An index in no shard (already deleted, or out of range) is an error."""
        doomed = {int(i) for i in indices}
        held = {i for shard in self.shards for i in shard}
        if not doomed <= held:
            raise ValueError(f"`indices` {sorted(doomed - held)[:5]} are not in the training set (deleted already?)")
        affected = [k for k, shard in enumerate(self.shards) if doomed.intersection(shard)]
        for k in affected:
            self.shards[k] = [i for i in self.shards[k] if i not in doomed]
            if not self.shards[k]:
                raise ValueError(f"deleting {sorted(doomed)[:5]} would leave shard {k} empty")
            if self.modules[k] is not None:
                self.modules[k] = self.train_shard(k, self.shards[k])
        return affected

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """The mean of the shard modules' softmax outputs ``[B, C]``."""
        if any(m is None for m in self.modules):
            raise RuntimeError("SISA.predict_proba before fit()")
        return torch.stack([m(x).softmax(-1) for m in self.modules]).mean(0)  # type: ignore[misc]
