"""Per-example identity for any datamodule: every training sample carries its index into the
training set, so callbacks can keep per-example state (scores, forgetting counts, ELR targets)
on datamodules litplug did not write.

Example:
    >>> from litplug.datamodules import Digits, Indexed
    >>> dm = Indexed(Digits(batch_size=4))
    >>> batch = next(iter(dm.train_dataloader()))
    >>> x, y = dm.on_before_batch_transfer(batch, 0)
    >>> x.shape, dm.batch_index.shape
    (torch.Size([4, 1, 8, 8]), torch.Size([4]))
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple
from weakref import WeakSet

import torch
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
    Subset,
    SubsetRandomSampler,
    WeightedRandomSampler,
)
from torch.utils.data.dataloader import default_collate
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import BatchSampler as StatefulBatchSampler

from ..plumbing import mix_seed, warn
from ..validation import check_int
from .base import EpochShuffle, WrappedDataModule
from .forgetting import LABEL_ATTRIBUTES, dataset_labels

__all__ = ["Indexed", "IndexedBatch", "KeptSampler", "KeptShuffle", "training_labels"]

_HOOKS = ("on_before_batch_transfer", "transfer_batch_to_device", "on_after_batch_transfer")


class IndexedBatch(NamedTuple):
    """A training batch of :class:`Indexed`: the wrapped loader's batch and the training-set
    index of each of its samples (int64, on the CPU)."""

    batch: Any
    index: Tensor


class _IndexedDataset(Dataset):
    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        return self.dataset[i], int(i)


class _IndexedCollate:
    def __init__(self, collate: Callable[[list[Any]], Any] | None) -> None:
        self.collate = collate or default_collate

    def __call__(self, samples: list[tuple[Any, int]]) -> IndexedBatch:
        return IndexedBatch(self.collate([s for s, _ in samples]), torch.tensor([i for _, i in samples]))


class KeptShuffle(EpochShuffle):
    """``base``'s epoch order (every rank's samples, drawn from ``(seed, epoch)``) restricted to
    ``kept``, sharded and resumable as :class:`EpochShuffle` is: rank ``r`` takes every ``W``-th
    kept index from ``r`` (padded with the head), and a loader restarted mid-epoch from its
    ``state_dict`` skips the samples already served. Being a ``DistributedSampler``, Lightning
    leaves it in place under DDP."""

    def __init__(self, base: EpochShuffle, kept: Tensor) -> None:
        kept = torch.as_tensor(kept, dtype=torch.long)
        super().__init__(len(kept), base.seed)
        self.base = base
        self.mask = torch.zeros(len(base.items), dtype=torch.bool)
        self.mask[kept] = True

    def order(self) -> list[int]:
        self.base.set_epoch(self.epoch)
        return [i for i in self.base.order() if self.mask[i]]


class KeptSampler(Sampler[int]):
    """The samples of ``base`` restricted to ``kept`` (training-set indices), in ``base``'s order:
    a ``RandomSampler`` becomes a shuffle of the kept indices drawn from ``(seed, epoch)`` (the same
    on every rank and after a resume), a ``SequentialSampler`` their sorted order, any other
    sampler's stream is filtered (it must yield each index once per epoch); litplug's
    ``EpochShuffle`` is restricted by :class:`KeptShuffle` instead. Under DDP Lightning
    shards it with its ``DistributedSamplerWrapper``; a ``DistributedSampler`` of the user's own
    (``use_distributed_sampler=False``) is applied to the kept set: its global order restricted to
    the kept indices, padded (or cut with ``drop_last``) and sharded as it does. Either way the
    ranks' samples together are the kept set, with a ``DistributedSampler``'s padding."""

    def __init__(self, base: Sampler[int] | Sequence[int], kept: Tensor, num_samples: int, seed: int = 0) -> None:
        self.base, self.seed, self.epoch = base, seed, 0
        self.kept = torch.as_tensor(kept, dtype=torch.long).sort().values
        self.mask = torch.zeros(num_samples, dtype=torch.bool)
        self.mask[self.kept] = True
        if isinstance(base, EpochShuffle):
            raise TypeError("KeptSampler does not restrict an EpochShuffle: use KeptShuffle(base, kept)")
        if isinstance(base, DistributedSampler) and type(base) is not DistributedSampler:
            raise ValueError(
                f"KeptSampler restricts torch's DistributedSampler, not its subclass {type(base).__name__}: let "
                "Lightning shard the training loader (use_distributed_sampler=True)"
            )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if callable(getattr(self.base, "set_epoch", None)):
            self.base.set_epoch(epoch)

    def __len__(self) -> int:
        if isinstance(self.base, DistributedSampler):
            n, world = len(self.kept), self.base.num_replicas
            return n // world if self.base.drop_last else -(-n // world)
        return len(self.kept)

    def __iter__(self) -> Iterator[int]:
        if isinstance(self.base, DistributedSampler):
            b = self.base
            full = DistributedSampler(b.dataset, num_replicas=1, rank=0, shuffle=b.shuffle, seed=b.seed)
            full.set_epoch(b.epoch)
            order = [i for i in full if self.mask[i]]
            world = b.num_replicas
            if b.drop_last:
                order = order[: len(order) // world * world]
            else:
                order += (order * world)[: -len(order) % world]
            return iter(order[b.rank :: world])
        if isinstance(self.base, RandomSampler):
            gen = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
            return iter(self.kept[torch.randperm(len(self.kept), generator=gen)].tolist())
        if isinstance(self.base, SequentialSampler):
            return iter(self.kept.tolist())
        return (int(i) for i in self.base if self.mask[int(i)])


_WARNED: WeakSet[Any] = WeakSet()  # samplers already warned about: a wrapper of a wrapper warns once


def resumes_exactly(sampler: Any) -> bool | None:
    """Whether a ``StatefulDataLoader`` over ``sampler`` finishes a cut epoch in that epoch's own
    order after a resume: True for a sampler with ``state_dict``/``load_state_dict``, torch's
    ``DistributedSampler`` (``EpochShuffle`` and ``KeptShuffle`` included: the order comes from
    ``(seed, epoch)``), ``SequentialSampler`` and a ``KeptSampler`` over a ``RandomSampler`` or an
    exact sampler; False for torch's random samplers (``RandomSampler``, i.e.
    ``DataLoader(shuffle=True)``, ``SubsetRandomSampler``, ``WeightedRandomSampler``), which draw
    a new order at every ``iter`` from their generator or the global RNG, neither restored, so the
    loader skips the samples already served in another draw; None (unknown) for other samplers."""
    if callable(getattr(sampler, "state_dict", None)) and callable(getattr(sampler, "load_state_dict", None)):
        return True
    if isinstance(sampler, (DistributedSampler, SequentialSampler)):
        return True
    if isinstance(sampler, (RandomSampler, SubsetRandomSampler, WeightedRandomSampler)):
        return False
    if isinstance(sampler, KeptSampler):
        return True if isinstance(sampler.base, RandomSampler) else resumes_exactly(sampler.base)
    return None


def warn_unless_resumable(loader: DataLoader, who: str, datamodule: LightningDataModule) -> bool:
    """Warn (once per sampler) when the order of ``loader`` is not restored at a mid-epoch resume:
    ``who`` hands Lightning a ``StatefulDataLoader``, so Lightning's own warning about a loader
    that cannot resume is not given. Returns whether this sampler was warned about."""
    sampler = loader.sampler if loader.batch_sampler is None else getattr(loader.batch_sampler, "sampler", None)
    exact = resumes_exactly(sampler)
    if sampler is None or exact:
        return False
    if sampler in _WARNED:
        return True
    _WARNED.add(sampler)
    does = "does not restore" if exact is False else "is not known to restore"
    warn(
        f"{who}: the training sampler of {type(datamodule).__name__} ({type(sampler).__name__}) {does} its order at "
        "a mid-epoch resume: a run resumed from a checkpoint saved inside an epoch finishes that epoch in another "
        "order (samples repeat or are skipped; with DataPruning the kept set can differ). For an exact resume use "
        "EpochShuffle(len(dataset), seed) from litplug.datamodules.base as the training sampler (docs/long_runs.md), "
        "or resume from epoch-end checkpoints only"
    )
    return True


def training_labels(dataset: Dataset, who: str) -> Tensor:
    """The label of every sample of ``dataset``: its ``targets``/``labels``/``y`` attribute (through
    ``Subset``s), else the second element of each ``(inputs, target)`` sample."""
    try:
        return dataset_labels(dataset).long()
    except ValueError:
        pass
    first = dataset[0]
    if not isinstance(first, (tuple, list)) or len(first) != 2:
        raise ValueError(
            f"{who} needs the labels of the training set: {type(dataset).__name__} has none of the attributes "
            f"{list(LABEL_ATTRIBUTES)} and its samples are not (inputs, target) pairs"
        )
    return torch.as_tensor([int(torch.as_tensor(dataset[i][1])) for i in range(len(dataset))])


class Indexed(WrappedDataModule):
    """Wrap ``datamodule`` so that its training batches carry each sample's index.

    The training loader yields :class:`IndexedBatch` ``(batch, index)`` built around the wrapped
    training loader (its dataset, sampler, batch size, collate function and workers, unchanged);
    this datamodule's ``on_before_batch_transfer`` hook takes the index off before the batch
    reaches the module, so the module sees exactly the wrapped datamodule's batches, and keeps it
    as :attr:`batch_index` for callbacks (``on_train_batch_start`` onwards). The batch-transfer
    hooks of the wrapped datamodule (or, where it defines none, the module's) still run.

    The index travels inside the batch, so each sample carries its own index under any sampler,
    ``DistributedSampler`` sharding and worker count. :meth:`keep` restricts training to a subset of
    indices from the next training loader on (through :class:`KeptShuffle` for litplug's
    ``EpochShuffle``, :class:`KeptSampler` for other samplers); ``DataPruning`` uses it. The
    training loader is a ``StatefulDataLoader``: Lightning saves its position in checkpoints, and
    with a resumable sampler (litplug's datamodules') a run resumed from a mid-epoch checkpoint
    continues the epoch exactly; over a sampler that draws a new order at every epoch start
    (``DataLoader(shuffle=True)``) it does not, and a warning (once) names the sampler.
    Validation, test and predict loaders are the wrapped datamodule's.

    The training set must be map-style (``__getitem__`` and ``__len__``): an ``IterableDataset``
    has no stable index and raises a ``TypeError`` when the training loader is built.

    Args:
        datamodule: any ``LightningDataModule`` whose ``train_dataloader()`` returns a
            ``DataLoader`` over a map-style dataset.
        seed: seed of the shuffle of the kept indices when the wrapped sampler is a
            ``RandomSampler``.
    """

    def __init__(self, datamodule: LightningDataModule, seed: int = 0) -> None:
        super().__init__()
        if not isinstance(datamodule, LightningDataModule):
            raise TypeError(f"`datamodule` must be a LightningDataModule, got {type(datamodule).__name__}")
        check_int("seed", seed)
        self.datamodule = datamodule
        self.seed = seed
        self.batch_index: Tensor | None = None
        self.kept: Tensor | None = None
        self.train_dataset: Dataset | None = None
        self._collate: Callable[[list[Any]], Any] | None = None
        self._resume_warned = False
        for name in ("val_dataloader", "test_dataloader", "predict_dataloader"):
            if is_overridden(name, datamodule, LightningDataModule):
                setattr(self, name, getattr(datamodule, name))
        for name in ("num_classes", "input_shape", "batch_size"):
            if hasattr(datamodule, name):
                setattr(self, name, getattr(datamodule, name))

    def keep(self, indices: Tensor | None) -> None:
        """Train on ``indices`` (training-set indices) from the next ``train_dataloader()`` call on;
        ``None`` trains on every sample."""
        self.kept = None if indices is None else torch.as_tensor(indices, dtype=torch.long).cpu()

    @property
    def num_examples(self) -> int:
        """The size of the training set (known once the training loader is built)."""
        if self.train_dataset is None:
            self.train_dataloader()
        return len(self.train_dataset)

    def labels(self) -> Tensor:
        """The label of every training sample: the dataset's ``targets``/``labels``/``y`` attribute
        (through ``Subset``s), else the second element of each ``(inputs, target)`` sample."""
        if self.train_dataset is None:
            self.train_dataloader()
        return training_labels(self.train_dataset, "Indexed")

    def subset_loader(self, indices: Sequence[int], batch_size: int) -> DataLoader:
        """A loader over the training samples ``indices``, in that order, with the wrapped loader's
        collate function and no index (for scoring)."""
        if self.train_dataset is None:
            self.train_dataloader()
        return DataLoader(Subset(self.train_dataset, list(indices)), batch_size=batch_size, collate_fn=self._collate)

    def train_dataloader(self) -> DataLoader:
        loader = self._train_dataloader()
        if not self._resume_warned:
            self._resume_warned = warn_unless_resumable(loader, "Indexed", self.datamodule)
        return loader

    def _train_dataloader(self) -> DataLoader:
        loader = self.datamodule.train_dataloader()
        dataset = getattr(loader, "dataset", None)
        if not isinstance(loader, DataLoader) or isinstance(dataset, IterableDataset):
            what = "an IterableDataset" if isinstance(dataset, IterableDataset) else f"a {type(loader).__name__}"
            raise TypeError(
                f"Indexed needs the training loader of {type(self.datamodule).__name__} to be a DataLoader over a "
                f"map-style dataset (samples addressed by index), got {what}; per-example state needs a stable index"
            )
        self.train_dataset = dataset
        self._collate = loader.collate_fn
        common = dict(
            num_workers=loader.num_workers,
            collate_fn=_IndexedCollate(loader.collate_fn),
            pin_memory=loader.pin_memory,
            timeout=loader.timeout,
            worker_init_fn=loader.worker_init_fn,
            multiprocessing_context=loader.multiprocessing_context,
            generator=loader.generator,
            persistent_workers=loader.persistent_workers,
        )
        if loader.num_workers > 0:
            common["prefetch_factor"] = loader.prefetch_factor
        indexed = _IndexedDataset(dataset)
        batch_sampler = loader.batch_sampler
        if batch_sampler is None or type(batch_sampler) not in (BatchSampler, StatefulBatchSampler):
            if self.kept is not None:
                raise ValueError(
                    f"Indexed.keep needs a training loader with a `batch_size` (a torch BatchSampler) to restrict; "
                    f"{type(self.datamodule).__name__}'s uses {type(batch_sampler).__name__}"
                )
            if batch_sampler is None:
                return StatefulDataLoader(indexed, batch_size=None, sampler=loader.sampler, **common)
            return StatefulDataLoader(indexed, batch_sampler=batch_sampler, **common)
        sampler = loader.sampler
        if self.kept is not None and isinstance(sampler, EpochShuffle):
            sampler = KeptShuffle(sampler, self.kept)
        elif self.kept is not None:
            sampler = KeptSampler(sampler, self.kept, len(dataset), self.seed)
        return StatefulDataLoader(
            indexed, batch_size=batch_sampler.batch_size, sampler=sampler, drop_last=batch_sampler.drop_last, **common
        )

    def _delegate(self, hook: str, batch: Any, *args: Any) -> Any:
        if is_overridden(hook, self.datamodule, LightningDataModule):
            return getattr(self.datamodule, hook)(batch, *args)
        module = self.trainer.lightning_module if self.trainer is not None else None
        if module is not None and is_overridden(hook, module, LightningModule):
            return getattr(module, hook)(batch, *args)
        return getattr(super(), hook)(batch, *args)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if isinstance(batch, IndexedBatch):
            self.batch_index = batch.index
            batch = batch.batch
        return self._delegate("on_before_batch_transfer", batch, dataloader_idx)

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        return self._delegate("transfer_batch_to_device", batch, device, dataloader_idx)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return self._delegate("on_after_batch_transfer", batch, dataloader_idx)
