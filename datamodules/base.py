"""In-memory datamodule base: subclasses load tensors once, this class splits, adds label noise,
normalises and serves seeded loaders."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader

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


class EpochShuffle(DistributedSampler):
    """This rank's share of a random order of ``items`` (``range(items)`` for an int) drawn from
    ``(seed, epoch)``, resumable in the middle of an epoch.

    Rank ``r`` of ``W`` takes every ``W``-th index of the epoch's order from ``r`` (the order padded
    with its own head to a multiple of ``W``, as ``DistributedSampler`` pads), so ``W`` ranks with
    batch ``B`` see, batch by batch, the samples one process sees with batch ``W * B``. The ranks
    come from the initialised process group (one rank without one). Being a ``DistributedSampler``,
    Lightning leaves it in place under DDP/FSDP2 and calls ``set_epoch`` every epoch.

    ``state_dict`` holds the epoch and how many samples of it all ranks have been served;
    ``torchdata``'s ``StatefulDataLoader`` saves it in Lightning's checkpoints, and a loader whose
    sampler loaded it skips those samples when it starts the same epoch again. The next epoch
    starts from its beginning.

    Example:
        >>> sampler = EpochShuffle(6, seed=0)
        >>> first = list(sampler)
        >>> sorted(first)
        [0, 1, 2, 3, 4, 5]
        >>> it = iter(sampler); _ = next(it), next(it)
        >>> state = sampler.state_dict()
        >>> resumed = EpochShuffle(6, seed=0)
        >>> resumed.load_state_dict(state)
        >>> list(resumed) == first[2:]
        True
    """

    def __init__(self, items: int | torch.Tensor, seed: int) -> None:
        import torch.distributed as dist

        if not isinstance(items, torch.Tensor):
            check_positive_int("items", items)
        check_int("seed", seed)
        self.items = torch.arange(items) if isinstance(items, int) else torch.as_tensor(items)
        distributed = dist.is_available() and dist.is_initialized()
        world, rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)
        super().__init__(range(len(self.items)), num_replicas=world, rank=rank, shuffle=True, seed=seed)
        self.served = 0  # samples of this rank served in epoch `self.epoch`
        self._resume: tuple[int, int] | None = None  # (epoch, samples per rank to skip) from load_state_dict

    def order(self) -> list[int]:
        """The whole epoch's order (every rank's samples), drawn from ``(seed, epoch)``."""
        # base 100_003, not mix_seed's default: the orders litplug's published results were measured with
        gen = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch, prime=100_003))
        return self.items[torch.randperm(len(self.items), generator=gen)].tolist()

    def __iter__(self) -> Iterator[int]:
        resume, self._resume = self._resume, None
        self.served = 0
        return self._serve(resume)

    def _serve(self, resume: tuple[int, int] | None) -> Iterator[int]:
        # Runs at the first `next`, after Lightning's `set_epoch`: a position saved in another epoch
        # (an epoch-end checkpoint) does not skip anything.
        order = self.order()
        order = (order * math.ceil(self.total_size / len(order)))[: self.total_size]
        mine = order[self.rank : self.total_size : self.num_replicas]
        skip = resume[1] if resume is not None and resume[0] == self.epoch else 0
        self.served = skip
        for index in mine[skip:]:
            self.served += 1
            yield index

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "samples": self.served * self.num_replicas}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self._resume = (int(state_dict["epoch"]), int(state_dict["samples"]) // self.num_replicas)


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
        # Training loaders are StatefulDataLoaders: Lightning saves their position in checkpoints.
        return (StatefulDataLoader if shuffle else DataLoader)(
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
    """The base of litplug's in-memory tensor datamodules.

    Base class. Subclasses set ``num_classes``, ``input_shape``, ``mean``, ``std`` and
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


class WrappedDataModule(LightningDataModule):
    """Base of the datamodules that wrap another one (``self.datamodule``): data preparation,
    setup (with the trainer handed down), teardown and checkpoint state go to the wrapped one."""

    datamodule: LightningDataModule

    def prepare_data(self) -> None:
        self.datamodule.prepare_data()

    def setup(self, stage: str) -> None:
        self.datamodule.trainer = self.trainer
        self.datamodule.setup(stage)

    def teardown(self, stage: str) -> None:
        self.datamodule.teardown(stage)

    def state_dict(self) -> dict[str, Any]:
        return self.datamodule.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.datamodule.load_state_dict(state_dict)
