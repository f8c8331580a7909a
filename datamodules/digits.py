"""scikit-learn's bundled 8x8 handwritten digits: the embedded default dataset (no download).

Example:
    >>> dm = Digits(batch_size=32)
    >>> dm.setup()
    >>> x, y = next(iter(dm.train_dataloader()))
    >>> x.shape, float(x.min()) >= 0.0, float(x.max()) <= 1.0
    (torch.Size([32, 1, 8, 8]), True, True)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from ..validation import check_fraction, check_int, check_list
from .base import ImageTensors, TensorDataModule


class Digits(TensorDataModule):
    """1,797 8x8 grey-level digits (10 classes) as ``1x8x8`` tensors in [0, 1].

    A fixed seeded split: ``test_fraction`` of the images for test, then ``val_fraction`` of the
    rest for validation. ``label_noise`` flips that fraction of *training* labels to another class
    (validation and test stay clean), for robustness experiments.

    Args:
        batch_size: samples per batch.
        val_fraction: fraction of the non-test images held out for validation.
        test_fraction: fraction of all images held out for test.
        label_noise: fraction of training labels flipped, in [0, 1).
        seed: seed of the split, the label noise and the shuffling.
        num_workers: DataLoader workers.
    """

    num_classes = 10
    input_shape = (1, 8, 8)
    mean = (0.0,)
    std = (1.0,)

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        label_noise: float = 0.0,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size, val_fraction, label_noise, seed, num_workers)
        check_fraction("test_fraction", test_fraction, low_open=True)
        self.test_fraction = test_fraction

    def load(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float]:
        from sklearn.datasets import load_digits

        data = load_digits()
        x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1)
        y = torch.tensor(data.target, dtype=torch.long)
        # The split seed is fixed (not `seed`) so every run and every label-noise level is scored
        # on the same test images.
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(1234))
        n_test = int(round(self.test_fraction * len(y)))
        test_idx, train_idx = perm[:n_test], perm[n_test:]
        return x[train_idx], y[train_idx], x[test_idx], y[test_idx], 1.0 / 16.0


class DigitsTasks(Digits):
    """Digits as tasks, one per group of classes: the data of multi-task merging, e.g.
    :class:`~litplug.modules.ModelMerge` with ``recipe="map"``, whose fine-tune ``t`` is scored on
    validation dataloader ``t``.

    With ``train_task=None`` training uses every task's classes and validation and test give one
    dataloader per task, in the order of ``tasks`` (what a merge is scored on). With
    ``train_task=t`` every split holds task ``t``'s classes only (what its fine-tune trains and is
    validated on). Labels keep their digit, so every task shares the 10-way head. The split of
    images is :class:`Digits`'.

    Args:
        tasks: the classes of each task, disjoint, e.g. ``[[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]``.
        train_task: the task whose classes the training set holds; ``None``: every task's.
        batch_size: samples per batch.
        val_fraction: fraction of the non-test images held out for validation.
        test_fraction: fraction of all images held out for test.
        seed: seed of the split and the shuffling.
        num_workers: DataLoader workers.

    Example:
        >>> fine_tune = DigitsTasks(tasks=[[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]], train_task=1)
        >>> int(next(iter(fine_tune.train_dataloader()))[1].min())
        5
        >>> len(DigitsTasks(tasks=[[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]).val_dataloader())
        2
    """

    def __init__(
        self,
        tasks: Sequence[Sequence[int]] = ((0, 1, 2, 3, 4), (5, 6, 7, 8, 9)),
        train_task: int | None = None,
        batch_size: int = 64,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size, val_fraction, test_fraction, 0.0, seed, num_workers)
        classes = lambda name, value: check_list(  # noqa: E731
            name, value, lambda n, v: check_int(n, v, low=0, high=self.num_classes - 1), nonempty=True
        )
        self.tasks = check_list("tasks", tasks, classes, nonempty=True)
        seen = [c for task in self.tasks for c in task]
        if len(seen) != len(set(seen)):
            raise ValueError(f"`tasks` must be disjoint groups of classes, got {self.tasks!r}")
        self.train_task = check_int("train_task", train_task, low=0, high=len(self.tasks) - 1, allow_none=True)

    def _of(self, dataset: ImageTensors, task: Sequence[int]) -> Subset:
        return Subset(dataset, torch.isin(dataset.y, torch.tensor(task)).nonzero().flatten().tolist())

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        super().setup(stage)
        if self.train_task is None:
            self.train_set = self._of(self.train_set, [c for task in self.tasks for c in task])
        else:
            task = self.tasks[self.train_task]
            self.train_set, self.val_set, self.test_set = (
                self._of(d, task) for d in (self.train_set, self.val_set, self.test_set)
            )

    def _per_task(self, dataset: Dataset) -> DataLoader | list[DataLoader]:
        if self.train_task is not None:
            return self._loader(dataset, shuffle=False)
        return [self._loader(self._of(dataset, task), shuffle=False) for task in self.tasks]

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        self.setup()
        return self._per_task(self.val_set)

    def test_dataloader(self) -> DataLoader | list[DataLoader]:
        self.setup()
        return self._per_task(self.test_set)
