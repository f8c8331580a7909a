"""Seeded label noise on the training set of any datamodule, the clean labels kept.

Example:
    >>> from litplug.datamodules import Digits, NoisyLabels
    >>> dm = NoisyLabels(Digits(), rate=0.4, kind="symmetric", seed=0)
    >>> loader = dm.train_dataloader()
    >>> round(float(dm.is_noisy.float().mean()), 2), bool((dm.noisy_labels != dm.clean_labels).all() == False)
    (0.4, True)
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset
from torchdata.stateful_dataloader import StatefulDataLoader

from ..validation import check_choice, check_int, check_list, check_number
from .base import WrappedDataModule, flip_labels
from .indexed import training_labels, warn_unless_resumable

Kind = Literal["symmetric", "pair", "transition"]


class _Relabelled(Dataset):
    def __init__(self, dataset: Dataset, labels: Tensor) -> None:
        self.dataset, self.labels = dataset, labels

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[Any, Tensor]:
        sample = self.dataset[i]
        return sample[0], self.labels[i]


class NoisyLabels(WrappedDataModule):
    """Any datamodule with a fraction of its training labels corrupted.

    Corrupt the training labels of ``datamodule``; validation and test data stay clean.

    - ``kind="symmetric"``: ``round(rate N)`` samples, drawn uniformly, get a uniformly drawn
      *different* class (the convention of ``Digits(label_noise=...)``);
    - ``kind="pair"`` (class-dependent, Han et al. 2018's pair flip): ``round(rate N)`` samples
      drawn uniformly get the next class, ``c -> (c + 1) mod C``;
    - ``kind="transition"`` (class-dependent, any noise transition matrix, Patrini et al. 2017):
      every sample of clean class ``i`` independently gets the label ``j`` with probability
      ``transition[i][j]`` (the diagonal is the probability of staying clean); ``rate`` is not
      used, the matrix sets each class's noise rate.

    The noise is drawn from ``seed`` once; ``clean_labels``, ``noisy_labels`` and ``is_noisy``
    (training-set order) are kept for evaluation (e.g. how many noisy labels a model memorised).
    Training samples must be ``(inputs, label)`` pairs of a map-style dataset (other samples, e.g.
    dicts, raise a ``TypeError`` when the training loader is built); the labels are read
    from the dataset's ``targets``/``labels``/``y`` attribute or from the samples. The training
    loader keeps the wrapped one's sampler, batch size, collate function and workers, and is a
    ``StatefulDataLoader`` (its position is saved in checkpoints, so a run resumes mid-epoch
    exactly when the wrapped sampler is resumable, as litplug's datamodules' are).

    Args:
        datamodule: any ``LightningDataModule`` with a map-style training set.
        rate: fraction of training labels corrupted, in [0, 1), for ``"symmetric"`` and ``"pair"``
            (None: 0.2); must be None for ``"transition"``.
        kind: ``"symmetric"``, ``"pair"`` or ``"transition"``.
        num_classes: number of classes (None: the datamodule's ``num_classes``, else the largest
            label + 1, else the size of ``transition``); a training label outside
            ``[0, num_classes)`` raises a ``ValueError`` when the training loader is built.
        seed: seed of the noise.
        transition: for ``kind="transition"`` only: a ``C x C`` matrix of probabilities, each row
            summing to 1, ``transition[i][j]`` the probability that a clean ``i`` is labelled ``j``.
    """

    def __init__(
        self,
        datamodule: LightningDataModule,
        rate: float | None = None,
        kind: Kind = "symmetric",
        num_classes: int | None = None,
        seed: int = 0,
        transition: list[list[float]] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(datamodule, LightningDataModule):
            raise TypeError(f"`datamodule` must be a LightningDataModule, got {type(datamodule).__name__}")
        self.kind = check_choice("kind", kind, ("symmetric", "pair", "transition"))
        rate = check_number("rate", rate, 0, 1, high_open=True, allow_none=True)
        self.transition = _check_transition(transition, self.kind)
        if self.kind == "transition" and rate is not None:
            raise ValueError(
                f"`rate` must be None with kind='transition' (the matrix sets each class's noise rate), got {rate!r}"
            )
        self.rate = 0.2 if rate is None and self.kind != "transition" else rate
        self.num_classes = check_int("num_classes", num_classes, low=2, allow_none=True) or getattr(
            datamodule, "num_classes", None
        )
        if self.transition is not None:
            size = len(self.transition)
            if self.num_classes is not None and self.num_classes != size:
                raise ValueError(
                    f"`transition` must be a {self.num_classes} x {self.num_classes} matrix (num_classes="
                    f"{self.num_classes}), got {size} x {size}"
                )
            self.num_classes = size
        self.seed = check_int("seed", seed)
        self.datamodule = datamodule
        self.clean_labels: Tensor | None = None
        self.noisy_labels: Tensor | None = None
        self._resume_warned = False
        for name in ("val_dataloader", "test_dataloader", "predict_dataloader"):
            if is_overridden(name, datamodule, LightningDataModule):
                setattr(self, name, getattr(datamodule, name))
        for name in ("input_shape", "batch_size"):
            if hasattr(datamodule, name):
                setattr(self, name, getattr(datamodule, name))

    @property
    def is_noisy(self) -> Tensor:
        """Which training labels were corrupted."""
        return self.noisy_labels != self.clean_labels

    def _corrupt(self, clean: Tensor) -> Tensor:
        num_classes = self.num_classes or int(clean.max()) + 1
        gen = torch.Generator().manual_seed(self.seed)
        low, high = int(clean.min()), int(clean.max())
        if low < 0 or high >= num_classes:
            given = (
                f"`transition` is a {num_classes} x {num_classes} matrix"
                if self.kind == "transition"
                else f"`num_classes` is {num_classes}"
            )
            raise ValueError(
                f"NoisyLabels: {given} but {type(self.datamodule).__name__}'s training labels span [{low}, {high}]; "
                f"labels must lie in [0, num_classes)"
            )
        if self.kind == "transition":
            rows = torch.tensor(self.transition, dtype=torch.float64)[clean]
            return torch.multinomial(rows, 1, generator=gen).squeeze(1).to(clean.dtype)
        if self.kind == "symmetric":
            return flip_labels(clean, self.rate, num_classes, gen)
        noisy = clean.clone()
        idx = torch.randperm(len(clean), generator=gen)[: int(round(self.rate * len(clean)))]
        noisy[idx] = (clean[idx] + 1) % num_classes
        return noisy

    def train_dataloader(self) -> DataLoader:
        loader = self.datamodule.train_dataloader()
        dataset = getattr(loader, "dataset", None)
        if not isinstance(loader, DataLoader) or isinstance(dataset, IterableDataset):
            raise TypeError(
                f"NoisyLabels needs the training loader of {type(self.datamodule).__name__} to be a DataLoader over a "
                "map-style dataset"
            )
        first = dataset[0] if len(dataset) else None
        if first is not None and not (isinstance(first, (tuple, list)) and len(first) == 2):
            raise TypeError(
                f"NoisyLabels needs (input, label) samples in the training set of {type(self.datamodule).__name__}, "
                f"got a {type(first).__name__}: return `(input, label)` from the dataset's __getitem__ (a batch "
                "converted later, in a collate_fn or a batch hook, is not enough: the labels are replaced per sample)"
            )
        if self.clean_labels is None or len(self.clean_labels) != len(dataset):
            self.clean_labels = training_labels(dataset, "NoisyLabels")
            self.noisy_labels = self._corrupt(self.clean_labels)
        if not self._resume_warned:
            self._resume_warned = warn_unless_resumable(loader, "NoisyLabels", self.datamodule)
        relabelled = _Relabelled(dataset, self.noisy_labels)
        if loader.batch_size is None and loader.batch_sampler is not None:
            batching: dict[str, Any] = {"batch_sampler": loader.batch_sampler}
        else:
            batching = {"batch_size": loader.batch_size, "sampler": loader.sampler, "drop_last": loader.drop_last}
        extra = {"prefetch_factor": loader.prefetch_factor} if loader.num_workers > 0 else {}
        return StatefulDataLoader(
            relabelled,
            **batching,
            num_workers=loader.num_workers,
            collate_fn=loader.collate_fn,
            pin_memory=loader.pin_memory,
            timeout=loader.timeout,
            worker_init_fn=loader.worker_init_fn,
            multiprocessing_context=loader.multiprocessing_context,
            generator=loader.generator,
            persistent_workers=loader.persistent_workers,
            **extra,
        )


def _check_transition(transition: Any, kind: str) -> list[list[float]] | None:
    """A square matrix of probabilities whose rows sum to 1, given exactly with kind='transition'."""
    if transition is None:
        if kind == "transition":
            raise ValueError("`transition` must be a C x C matrix of probabilities with kind='transition', got None")
        return None
    rows = check_list("transition", transition, lambda name, row: check_list(name, row, _probability), nonempty=True)
    size = len(rows)
    if size < 2:
        raise ValueError(f"`transition` must be a C x C matrix with C >= 2 classes, got {transition!r}")
    for i, row in enumerate(rows):
        if len(row) != size:
            raise ValueError(f"`transition` must be square ({size} x {size}), but row {i} has {len(row)} entries")
        total = math.fsum(row)
        if abs(total - 1) > 1e-6:
            raise ValueError(f"`transition` rows must sum to 1, but row {i} sums to {total:.6g}: {row!r}")
    if kind != "transition":
        raise ValueError(f"`transition` is only used with kind='transition', got kind={kind!r}")
    return rows


def _probability(name: str, value: Any) -> float:
    return check_number(name, value, 0, 1)
