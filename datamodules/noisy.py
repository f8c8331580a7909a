"""Seeded label noise on the training set of any datamodule, the clean labels kept.

Example:
    >>> from litplug.datamodules import Digits, NoisyLabels
    >>> dm = NoisyLabels(Digits(), rate=0.4, kind="symmetric", seed=0)
    >>> loader = dm.train_dataloader()
    >>> round(float(dm.is_noisy.float().mean()), 2), bool((dm.noisy_labels != dm.clean_labels).all() == False)
    (0.4, True)
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset

from ..validation import check_choice, check_int, check_number
from .base import WrappedDataModule, flip_labels
from .indexed import training_labels

Kind = Literal["symmetric", "pair"]


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

    Corrupt a ``rate`` fraction of the training labels of ``datamodule``; validation and test
    data stay clean.

    - ``kind="symmetric"``: ``round(rate N)`` samples, drawn uniformly, get a uniformly drawn
      *different* class (the convention of ``Digits(label_noise=...)``);
    - ``kind="pair"`` (class-dependent, Han et al. 2018's pair flip): ``round(rate N)`` samples
      drawn uniformly get the next class, ``c -> (c + 1) mod C``.

    The flips are drawn from ``seed`` once; ``clean_labels``, ``noisy_labels`` and ``is_noisy``
    (training-set order) are kept for evaluation (e.g. how many noisy labels a model memorised).
    Training samples must be ``(inputs, label)`` pairs of a map-style dataset; the labels are read
    from the dataset's ``targets``/``labels``/``y`` attribute or from the samples. The training
    loader keeps the wrapped one's sampler, batch size, collate function and workers.

    Args:
        datamodule: any ``LightningDataModule`` with a map-style training set.
        rate: fraction of training labels corrupted, in [0, 1).
        kind: ``"symmetric"`` or ``"pair"``.
        num_classes: number of classes (None: the datamodule's ``num_classes``, else the largest
            label + 1).
        seed: seed of the flips.
    """

    def __init__(
        self,
        datamodule: LightningDataModule,
        rate: float = 0.2,
        kind: Kind = "symmetric",
        num_classes: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not isinstance(datamodule, LightningDataModule):
            raise TypeError(f"`datamodule` must be a LightningDataModule, got {type(datamodule).__name__}")
        self.rate = check_number("rate", rate, 0, 1, high_open=True)
        self.kind = check_choice("kind", kind, ("symmetric", "pair"))
        self.num_classes = check_int("num_classes", num_classes, low=2, allow_none=True) or getattr(
            datamodule, "num_classes", None
        )
        self.seed = check_int("seed", seed)
        self.datamodule = datamodule
        self.clean_labels: Tensor | None = None
        self.noisy_labels: Tensor | None = None
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
        if self.clean_labels is None or len(self.clean_labels) != len(dataset):
            self.clean_labels = training_labels(dataset, "NoisyLabels")
            self.noisy_labels = self._corrupt(self.clean_labels)
        relabelled = _Relabelled(dataset, self.noisy_labels)
        if loader.batch_size is None and loader.batch_sampler is not None:
            batching: dict[str, Any] = {"batch_sampler": loader.batch_sampler}
        else:
            batching = {"batch_size": loader.batch_size, "sampler": loader.sampler, "drop_last": loader.drop_last}
        return DataLoader(
            relabelled,
            **batching,
            num_workers=loader.num_workers,
            collate_fn=loader.collate_fn,
            pin_memory=loader.pin_memory,
            worker_init_fn=loader.worker_init_fn,
            generator=loader.generator,
            persistent_workers=loader.persistent_workers,
        )
