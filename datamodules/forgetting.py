"""Forget/retain splits for machine unlearning, around any litplug datamodule.

Example:
    >>> from litplug.datamodules import Digits
    >>> dm = ForgetRetain(Digits(batch_size=32), scenario="class", forget_classes=[3])
    >>> dm.setup()
    >>> batch, _, _ = next(iter(dm.train_dataloader()))
    >>> sorted(batch), bool((batch["forget"][1] == 3).all())
    (['forget', 'retain'], True)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader, Dataset, Subset

from litplug.validation import check_choice, check_int, check_list, check_number

from .base import EpochShuffle, TensorDataModule

Scenario = Literal["class", "random"]


class ForgetRetain(LightningDataModule):
    """Split the training set of ``datamodule`` into a *forget* and a *retain* set.

    - ``scenario="class"``: every training sample of ``forget_classes`` is forgotten;
    - ``scenario="random"``: a seeded ``forget_fraction`` of the training samples is forgotten.

    The split is deterministic (``seed``) and its indices into the wrapped training set are saved
    in checkpoints (``state_dict``). Training batches are ``{"forget": (x, y), "retain": (x, y)}``
    from a ``CombinedLoader`` in ``max_size_cycle`` mode (an epoch is one pass over the larger
    split, the smaller one cycles). Validation and test loaders are a dict, in this order:

    - ``forget``: the forget set (training samples), giving UA = 100 - accuracy;
    - ``retain``: the retain set, giving RA;
    - ``test``: held-out data (the wrapped validation split for ``validate``, the test split for
      ``test``), without the forgotten classes in the class scenario, giving TA;
    - ``forget_test`` (class scenario only): held-out samples of the forgotten classes.

    Under DDP/FSDP2 Lightning shards every loader with a ``DistributedSampler``.

    Args:
        datamodule: a ``TensorDataModule`` (``Digits``, ``MNIST``, ``CIFAR10``, ...).
        scenario: ``"class"`` or ``"random"`` forgetting.
        forget_classes: classes forgotten in the class scenario (in ``[0, num_classes)``).
        forget_fraction: fraction of training samples forgotten in the random scenario.
        seed: seed of the random split and of the shuffling.
    """

    def __init__(
        self,
        datamodule: LightningDataModule,
        scenario: Scenario = "class",
        forget_classes: Sequence[int] = (0,),
        forget_fraction: float = 0.1,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not isinstance(datamodule, TensorDataModule):
            raise TypeError(f"`datamodule` must be a litplug TensorDataModule, got {type(datamodule).__name__}")
        check_choice("scenario", scenario, ("class", "random"))
        forget_classes = check_list("forget_classes", forget_classes, check_int)
        check_number("forget_fraction", forget_fraction, 0, 1, low_open=True, high_open=True)
        check_int("seed", seed)
        num_classes = datamodule.num_classes
        if scenario == "class":
            bad = [c for c in forget_classes if not 0 <= c < num_classes]
            if bad or not forget_classes:
                raise ValueError(f"`forget_classes` must be a non-empty list of classes in [0, {num_classes}), got {forget_classes}")
            if len(set(forget_classes)) == num_classes:
                raise ValueError(f"`forget_classes` must leave at least one class to retain, got {forget_classes}")
        self.datamodule = datamodule
        self.scenario = scenario
        self.forget_classes = forget_classes
        self.forget_fraction = forget_fraction
        self.seed = seed
        self.num_classes = num_classes
        self.input_shape = datamodule.input_shape
        self.batch_size = datamodule.batch_size
        self.forget_indices: torch.Tensor | None = None
        self.retain_indices: torch.Tensor | None = None

    def _split(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(labels)
        if self.scenario == "class":
            forget = torch.isin(labels, torch.tensor(self.forget_classes))
        else:
            n_forget = int(self.forget_fraction * n)
            if n_forget == 0 or n_forget == n:
                raise ValueError(
                    f"`forget_fraction`={self.forget_fraction} leaves an empty split of {n} training samples "
                    f"({n_forget} forgotten); choose a value in ({1 / n:.4g}, 1)"
                )
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))
            forget = torch.zeros(n, dtype=torch.bool)
            forget[perm[:n_forget]] = True
        if not forget.any() or forget.all():
            raise ValueError(f"`forget_classes`={self.forget_classes} gives an empty forget or retain split")
        return forget.nonzero().flatten(), (~forget).nonzero().flatten()

    @staticmethod
    def _labels(dataset: Dataset) -> torch.Tensor:
        return torch.as_tensor(dataset.y)

    def setup(self, stage: str | None = None) -> None:
        self.datamodule.setup(stage)
        if self.forget_indices is None:
            self.forget_indices, self.retain_indices = self._split(self._labels(self.datamodule.train_set))

    @property
    def forget_set(self) -> Subset:
        self.setup()
        return Subset(self.datamodule.train_set, self.forget_indices.tolist())

    @property
    def retain_set(self) -> Subset:
        self.setup()
        return Subset(self.datamodule.train_set, self.retain_indices.tolist())

    def _loader(self, dataset: Dataset, shuffle: bool, offset: int = 0) -> DataLoader:
        dm = self.datamodule
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=EpochShuffle(len(dataset), self.seed + offset) if shuffle else None,
            num_workers=dm.num_workers,
            persistent_workers=dm.num_workers > 0,
        )

    def forget_dataloader(self, shuffle: bool = False) -> DataLoader:
        """The forget set alone (used by ``UnlearningMask`` to score weights)."""
        return self._loader(self.forget_set, shuffle)

    def retain_dataloader(self, shuffle: bool = False) -> DataLoader:
        """The retain set alone."""
        return self._loader(self.retain_set, shuffle, offset=1)

    def train_dataloader(self) -> CombinedLoader:
        loaders = {"forget": self.forget_dataloader(shuffle=True), "retain": self.retain_dataloader(shuffle=True)}
        return CombinedLoader(loaders, mode="max_size_cycle")

    def _held_out(self, dataset: Dataset) -> dict[str, DataLoader]:
        loaders = {"forget": self.forget_dataloader(), "retain": self.retain_dataloader()}
        if self.scenario == "class":
            forgotten = torch.isin(self._labels(dataset), torch.tensor(self.forget_classes))
            loaders["test"] = self._loader(Subset(dataset, (~forgotten).nonzero().flatten().tolist()), False)
            loaders["forget_test"] = self._loader(Subset(dataset, forgotten.nonzero().flatten().tolist()), False)
        else:
            loaders["test"] = self._loader(dataset, False)
        return loaders

    def val_dataloader(self) -> dict[str, DataLoader]:
        self.setup()
        return self._held_out(self.datamodule.val_set)

    def test_dataloader(self) -> dict[str, DataLoader]:
        self.setup()
        return self._held_out(self.datamodule.test_set)

    @property
    def eval_names(self) -> list[str]:
        """Names of the validation/test loaders, in ``dataloader_idx`` order."""
        return ["forget", "retain", "test"] + (["forget_test"] if self.scenario == "class" else [])

    def state_dict(self) -> dict[str, Any]:
        self.setup()
        return {"forget_indices": self.forget_indices.clone(), "retain_indices": self.retain_indices.clone()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.forget_indices = state_dict["forget_indices"].clone()
        self.retain_indices = state_dict["retain_indices"].clone()
