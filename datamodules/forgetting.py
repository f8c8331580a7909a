"""Forget/retain splits for machine unlearning, around any datamodule or map-style dataset.

Example:
    >>> from litplug.datamodules import Digits
    >>> dm = ForgetRetain(Digits(batch_size=32), scenario="class", forget_classes=[3])
    >>> dm.setup()
    >>> batch, _, _ = next(iter(dm.train_dataloader()))
    >>> sorted(batch), bool((batch["forget"][1] == 3).all())
    (['forget', 'retain'], True)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset
from torchdata.stateful_dataloader import StatefulDataLoader

from ..protocols import FORGET_RETAIN_HINT
from ..validation import check_choice, check_int, check_list, check_number
from .base import EpochShuffle, TensorDataModule

Scenario = Literal["class", "random"]
LABEL_ATTRIBUTES = ("targets", "labels", "y")


def dataset_labels(dataset: Dataset, label_fn: Callable[[Any], Any] | None = None) -> torch.Tensor:
    """The labels of every sample of ``dataset``: ``label_fn(sample)`` for each sample if given,
    else the dataset's ``targets``, ``labels`` or ``y`` attribute (torchvision, Hugging Face style
    and litplug datasets; through ``Subset`` wrappers). A ``ValueError`` names the options when
    there is none."""
    if label_fn is not None:
        return torch.as_tensor([int(torch.as_tensor(label_fn(dataset[i]))) for i in range(len(dataset))])
    if isinstance(dataset, Subset):
        return dataset_labels(dataset.dataset)[torch.as_tensor(dataset.indices, dtype=torch.long)]
    for name in LABEL_ATTRIBUTES:
        labels = getattr(dataset, name, None)
        if labels is not None:
            return torch.as_tensor(labels)
    raise ValueError(
        f"ForgetRetain(scenario='class') needs the labels of the samples, but the dataset "
        f"{type(dataset).__name__} has no `targets` or `labels` attribute; pass `label_fn` (a function "
        "sample -> label), or use scenario='random', which needs no labels"
    )


def _require_split_aware(module: Any) -> None:
    """Refuse a module that cannot take ForgetRetain's several validation loaders."""
    from lightning.pytorch import LightningModule
    from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature

    step = getattr(type(module), "validation_step", None)
    if step is None or step is LightningModule.validation_step:
        return
    if not is_param_in_hook_signature(module.validation_step, "dataloader_idx"):
        raise TypeError(
            f"ForgetRetain feeds Unlearner (or a module written for its batches): training batches are "
            f"{{'forget': batch, 'retain': batch}} dicts and validation has one loader per split (forget, retain, "
            f"test), so `validation_step` needs a `dataloader_idx` argument, which "
            f"{type(module).__name__}.validation_step lacks.\n{FORGET_RETAIN_HINT}"
        )


class ForgetRetain(LightningDataModule):
    """Split the training set of ``datamodule`` into a *forget* and a *retain* set.

    - ``scenario="class"``: every training sample of ``forget_classes`` is forgotten; the labels
      come from ``label_fn`` or the dataset's ``targets``/``labels`` attribute;
    - ``scenario="random"``: a seeded ``forget_fraction`` of the training samples is forgotten
      (needs nothing from the samples).

    ``datamodule`` is a litplug ``TensorDataModule``, any other ``LightningDataModule`` (its training
    set is its ``train_dataloader().dataset``, which must be map-style, the held-out sets those
    of ``val_dataloader()``/``test_dataloader()`` where it defines them; the collate function
    and worker count of its training loader are reused) or a map-style ``Dataset`` (held-out
    data from ``held_out``).

    The split is deterministic (``seed``) and its indices into the wrapped training set are saved
    in checkpoints (``state_dict``). Training batches are ``{"forget": batch, "retain": batch}``
    from a ``CombinedLoader`` in ``max_size_cycle`` mode (an epoch is one pass over the larger
    split, the smaller one cycles). Validation and test loaders are a dict, in this order:

    - ``forget``: the forget set (training samples), giving UA = 100 - accuracy;
    - ``retain``: the retain set, giving RA;
    - ``test``: held-out data (the wrapped validation split for ``validate``, the test split for
      ``test``), without the forgotten classes in the class scenario, giving TA; absent when
      there is no held-out data;
    - ``forget_test`` (class scenario only, when the held-out data has samples of the forgotten
      classes): held-out samples of the forgotten classes.

    Under DDP/FSDP2 Lightning shards every loader with a ``DistributedSampler``.

    Contract: these batches and loaders are for ``Unlearner`` (or a module written for them: a
    ``training_step`` reading ``batch["forget"]``/``batch["retain"]`` and a ``validation_step``
    taking ``dataloader_idx``); ``fit`` with a module whose ``validation_step`` has no
    ``dataloader_idx`` is refused, saying so. To put ``UnlearningMask`` on your own module, keep
    your datamodule and add the two loaders the mask reads (:class:`litplug.protocols.ForgetRetainData`)::

        def forget_dataloader(self):
            return DataLoader(self.forget_set, batch_size=self.batch_size)
        # retain_dataloader: the same over the retain set

    Args:
        datamodule: a ``LightningDataModule`` (``Digits``, ``MNIST``, ``CIFAR10``, ``MarkovText``, any
            other) or a map-style ``Dataset``.
        scenario: ``"class"`` or ``"random"`` forgetting.
        forget_classes: classes forgotten in the class scenario (in ``[0, num_classes)`` where the
            datamodule says ``num_classes``).
        forget_fraction: fraction of training samples forgotten in the random scenario.
        seed: seed of the random split and of the shuffling.
        label_fn: the label of one sample (``sample -> int``), for datasets without a ``targets``
            or ``labels`` attribute (class scenario).
        held_out: held-out data when ``datamodule`` is a ``Dataset`` (the ``test`` loaders of both
            validation and test).
        batch_size: batch size of every loader (None: the datamodule's ``batch_size`` or its
            training loader's; 64 for a ``Dataset``).
    """

    def __init__(
        self,
        datamodule: LightningDataModule | Dataset,
        scenario: Scenario = "class",
        forget_classes: Sequence[int] = (0,),
        forget_fraction: float = 0.1,
        seed: int = 0,
        label_fn: Callable[[Any], Any] | None = None,
        held_out: Dataset | None = None,
        batch_size: int | None = None,
    ) -> None:
        super().__init__()
        if isinstance(datamodule, IterableDataset) or not isinstance(datamodule, (LightningDataModule, Dataset)):
            raise TypeError(
                f"`datamodule` must be a LightningDataModule or a map-style Dataset, got {type(datamodule).__name__}"
            )
        if held_out is not None and (isinstance(datamodule, LightningDataModule) or not isinstance(held_out, Dataset)):
            raise TypeError(
                f"`held_out` must be None or, when `datamodule` is a Dataset, a Dataset; got {type(held_out).__name__} "
                f"with a {type(datamodule).__name__}"
            )
        check_choice("scenario", scenario, ("class", "random"))
        forget_classes = check_list("forget_classes", forget_classes, check_int)
        check_number("forget_fraction", forget_fraction, 0, 1, low_open=True, high_open=True)
        check_int("seed", seed)
        if label_fn is not None and not callable(label_fn):
            raise TypeError(f"`label_fn` must be None or a callable sample -> label, got {label_fn!r}")
        check_int("batch_size", batch_size, low=1, allow_none=True)
        num_classes = getattr(datamodule, "num_classes", None)
        if scenario == "class":
            bad = [c for c in forget_classes if c < 0 or (num_classes is not None and c >= num_classes)]
            if bad or not forget_classes:
                accepted = f"[0, {num_classes})" if num_classes is not None else "[0, inf)"
                raise ValueError(
                    f"`forget_classes` must be a non-empty list of classes in {accepted}, got {forget_classes}"
                )
            if num_classes is not None and len(set(forget_classes)) == num_classes:
                raise ValueError(f"`forget_classes` must leave at least one class to retain, got {forget_classes}")
        self.datamodule = datamodule
        self.scenario = scenario
        self.forget_classes = forget_classes
        self.forget_fraction = forget_fraction
        self.seed = seed
        self.label_fn = label_fn
        self.held_out = held_out
        self.num_classes = num_classes
        self.input_shape = getattr(datamodule, "input_shape", None)
        self.batch_size = batch_size or getattr(datamodule, "batch_size", None)
        self.forget_indices: torch.Tensor | None = None
        self.retain_indices: torch.Tensor | None = None
        self._sets: dict[str, Dataset | None] | None = None
        self._collate: Callable[[list[Any]], Any] | None = None
        self._num_workers = int(getattr(datamodule, "num_workers", 0))
        self._label_cache: dict[int, torch.Tensor] = {}

    def _split(self, labels: torch.Tensor | None, n: int) -> tuple[torch.Tensor, torch.Tensor]:
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

    def _labels(self, dataset: Dataset) -> torch.Tensor:
        key = id(dataset)
        if key not in self._label_cache:  # label_fn may be slow: once per dataset
            self._label_cache[key] = dataset_labels(dataset, self.label_fn)
        return self._label_cache[key]

    def prepare_data(self) -> None:
        if isinstance(self.datamodule, LightningDataModule):
            self.datamodule.prepare_data()

    def _wrapped_sets(self) -> dict[str, Dataset | None]:
        """The wrapped training, validation and test sets (validation and test may be None)."""
        dm = self.datamodule
        if isinstance(dm, TensorDataModule):
            dm.setup()
            return {"train": dm.train_set, "val": dm.val_set, "test": dm.test_set}
        if not isinstance(dm, LightningDataModule):
            return {"train": dm, "val": self.held_out, "test": self.held_out}
        dm.setup("fit")
        train = dm.train_dataloader()
        if not isinstance(train, DataLoader) or isinstance(train.dataset, IterableDataset):
            raise TypeError(
                f"ForgetRetain needs {type(dm).__name__}.train_dataloader() to be one DataLoader over a map-style "
                f"Dataset, got {type(train).__name__}"
                + (f" over {type(train.dataset).__name__}" if isinstance(train, DataLoader) else "")
            )
        self._collate, self._num_workers = train.collate_fn, train.num_workers
        if self.batch_size is None:
            self.batch_size = train.batch_size
        sets: dict[str, Dataset | None] = {"train": train.dataset}
        for stage, name in (("validate", "val"), ("test", "test")):
            hook = getattr(type(dm), f"{name}_dataloader")
            if hook is getattr(LightningDataModule, f"{name}_dataloader"):  # not defined by the datamodule
                sets[name] = None
                continue
            dm.setup(stage)
            loader = getattr(dm, f"{name}_dataloader")()
            sets[name] = loader.dataset if isinstance(loader, DataLoader) else None
        return sets

    def setup(self, stage: str | None = None) -> None:
        if self._sets is None:
            self._sets = self._wrapped_sets()
            if self.batch_size is None:
                self.batch_size = 64
        if self.forget_indices is None:
            train = self._sets["train"]
            labels = self._labels(train) if self.scenario == "class" else None
            self.forget_indices, self.retain_indices = self._split(labels, len(train))

    @property
    def train_set(self) -> Dataset:
        """The wrapped training set (forget and retain sets index into it)."""
        self.setup()
        return self._sets["train"]

    @property
    def forget_set(self) -> Subset:
        return Subset(self.train_set, self.forget_indices.tolist())

    @property
    def retain_set(self) -> Subset:
        return Subset(self.train_set, self.retain_indices.tolist())

    def _loader(self, dataset: Dataset, shuffle: bool, offset: int = 0) -> DataLoader:
        # Training loaders are StatefulDataLoaders: Lightning saves their position in checkpoints.
        return (StatefulDataLoader if shuffle else DataLoader)(
            dataset,
            batch_size=self.batch_size,
            sampler=EpochShuffle(len(dataset), self.seed + offset) if shuffle else None,
            num_workers=self._num_workers,
            persistent_workers=self._num_workers > 0,
            collate_fn=self._collate,
        )

    def forget_dataloader(self, shuffle: bool = False) -> DataLoader:
        """The forget set alone (used by ``UnlearningMask`` to score weights)."""
        return self._loader(self.forget_set, shuffle)

    def retain_dataloader(self, shuffle: bool = False) -> DataLoader:
        """The retain set alone."""
        return self._loader(self.retain_set, shuffle, offset=1)

    def train_dataloader(self) -> CombinedLoader:
        module = self.trainer.lightning_module if self.trainer is not None else None
        if module is not None:
            _require_split_aware(module)
        loaders = {"forget": self.forget_dataloader(shuffle=True), "retain": self.retain_dataloader(shuffle=True)}
        return CombinedLoader(loaders, mode="max_size_cycle")

    def _held_out(self, dataset: Dataset | None) -> dict[str, DataLoader]:
        loaders = {"forget": self.forget_dataloader(), "retain": self.retain_dataloader()}
        if dataset is None:
            return loaders
        if self.scenario == "class":
            forgotten = torch.isin(self._labels(dataset), torch.tensor(self.forget_classes))
            loaders["test"] = self._loader(Subset(dataset, (~forgotten).nonzero().flatten().tolist()), False)
            if forgotten.any():
                loaders["forget_test"] = self._loader(Subset(dataset, forgotten.nonzero().flatten().tolist()), False)
        else:
            loaders["test"] = self._loader(dataset, False)
        return loaders

    def val_dataloader(self) -> dict[str, DataLoader]:
        self.setup()
        return self._held_out(self._sets["val"])

    def test_dataloader(self) -> dict[str, DataLoader]:
        self.setup()
        return self._held_out(self._sets["test"])

    def loader_names(self, stage: Literal["validate", "test"] = "validate") -> list[str]:
        """Names of the validation (or test) loaders, in ``dataloader_idx`` order."""
        self.setup()
        held_out = self._sets["val" if stage == "validate" else "test"]
        names = ["forget", "retain"]
        if held_out is not None:
            names.append("test")
            if self.scenario == "class" and torch.isin(self._labels(held_out), torch.tensor(self.forget_classes)).any():
                names.append("forget_test")
        return names

    @property
    def eval_names(self) -> list[str]:
        """Names of the validation loaders, in ``dataloader_idx`` order."""
        return self.loader_names("validate")

    def state_dict(self) -> dict[str, Any]:
        self.setup()
        return {"forget_indices": self.forget_indices.clone(), "retain_indices": self.retain_indices.clone()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.forget_indices = state_dict["forget_indices"].clone()
        self.retain_indices = state_dict["retain_indices"].clone()
