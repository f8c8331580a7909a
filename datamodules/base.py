"""In-memory datamodule base: subclasses load tensors once, this class splits, adds label noise,
normalises and serves seeded loaders."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, Sampler

from ..plumbing import mix_seed
from ..validation import check_fraction, check_int, check_positive_int


class ImageTensors(Dataset):
    """Images kept as stored (e.g. uint8), scaled to [0, 1] and normalised per item.

    ``x`` has shape [N, C, H, W] (or [N, D] for tabular data with ``scale=1``)."""

    def __init__(
        self, x: torch.Tensor, y: torch.Tensor, mean: Sequence[float], std: Sequence[float], scale: float
    ) -> None:
        self.x, self.y, self.scale = x, y, scale
        view = (-1,) + (1,) * (x.dim() - 2) if x.dim() > 2 else (-1,)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(view)
        self.std = torch.tensor(std, dtype=torch.float32).view(view)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.x[i].float() * self.scale - self.mean) / self.std, self.y[i]


class EpochShuffle(Sampler[int]):
    """Random order drawn from ``(seed, epoch)``. Lightning calls ``set_epoch`` every epoch, so a
    run resumed from a checkpoint sees the same order as an uninterrupted one (a plain
    ``RandomSampler`` restarts its generator instead)."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        # base 100_003 (not mix_seed's default): the same shuffles as earlier versions of litplug
        gen = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch, prime=100_003))
        return iter(torch.randperm(self.n, generator=gen).tolist())


def flip_labels(y: torch.Tensor, rate: float, num_classes: int, generator: torch.Generator) -> torch.Tensor:
    """Replace a ``rate`` fraction of labels by a uniformly drawn *different* class."""
    y = y.clone()
    n_flip = int(round(rate * len(y)))
    idx = torch.randperm(len(y), generator=generator)[:n_flip]
    offset = torch.randint(1, num_classes, (n_flip,), generator=generator)
    y[idx] = (y[idx] + offset) % num_classes
    return y


class SeededDataModule(LightningDataModule):
    """Validated loader settings and seeded loaders over ``train_set``/``val_set``/``test_set``,
    which subclasses build in ``setup``. Training order comes from :class:`EpochShuffle`."""

    train_set: Dataset | None = None
    val_set: Dataset | None = None
    test_set: Dataset | None = None

    def __init__(self, batch_size: int, val_fraction: float, seed: int, num_workers: int) -> None:
        super().__init__()
        check_positive_int("batch_size", batch_size)
        check_fraction("val_fraction", val_fraction, low_open=True)
        check_int("seed", seed)
        check_int("num_workers", num_workers, low=0)
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.seed = seed
        self.num_workers = num_workers

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=EpochShuffle(len(dataset), self.seed) if shuffle else None,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.val_set, shuffle=False)


class TensorDataModule(SeededDataModule):
    """Base class. Subclasses set ``num_classes``, ``input_shape``, ``mean``, ``std`` and
    ``pixel_range`` (the valid range of raw inputs before normalisation) and implement
    :meth:`load` returning ``(x_train, y_train, x_test, y_test, scale)``.

    Batches are ``(x, y)`` with ``x = (raw * scale - mean) / std``.
    """

    num_classes: int
    input_shape: tuple[int, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    pixel_range: tuple[float, float] = (0.0, 1.0)

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.1,
        label_noise: float = 0.0,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size, val_fraction, seed, num_workers)
        check_fraction("label_noise", label_noise)
        self.label_noise = label_noise

    def load(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float]:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        x_train, y_train, x_test, y_test, scale = self.load()
        gen = torch.Generator().manual_seed(self.seed)
        perm = torch.randperm(len(y_train), generator=gen)
        n_val = max(1, int(round(self.val_fraction * len(y_train))))
        val_idx, train_idx = perm[:n_val], perm[n_val:]
        y_fit = y_train[train_idx]
        if self.label_noise > 0:
            y_fit = flip_labels(y_fit, self.label_noise, self.num_classes, gen)
        make = lambda x, y: ImageTensors(x, y, self.mean, self.std, scale)  # noqa: E731
        self.train_set = make(x_train[train_idx], y_fit)
        self.val_set = make(x_train[val_idx], y_train[val_idx])
        self.test_set = make(x_test, y_test)

    def test_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.test_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()
