"""What litplug's callbacks need from a LightningModule or a datamodule, as ``typing.Protocol``s.

A callback checks its contract at ``setup`` with :func:`require`; the error names the Protocol and
lists the members the object lacks. Any object with the members satisfies a Protocol: no base
class to inherit from, no registration.

==========================  =====================================================================
Protocol                    needed by
==========================  =====================================================================
:class:`HasBatchLoss`       optional everywhere a callback needs a loss on a batch
                            (``UnlearningMask`` scoring, ``SharpnessMonitor``): when a module lacks
                            it, :func:`litplug.plumbing.loss.module_loss` runs its ``training_step`` muted
:class:`CertifiedModule`    ``IBPWarmup`` (the module)
:class:`ForgetRetainData`   ``UnlearningMask("saliency" | "attribution")`` (the datamodule)
:class:`OfflineDesignsData` ``GradientAscentSearch`` (the datamodule)
:class:`IndexedData`        ``DataPruning``, ``ELR``, ``PSKD`` (the datamodule)
==========================  =====================================================================

Example:
    >>> import torch
    >>> from torch import nn
    >>> class Tiny(nn.Module):
    ...     def batch_loss(self, batch):
    ...         x, y = batch
    ...         return (x.sum(1) - y).square().mean()
    >>> isinstance(Tiny(), HasBatchLoss)
    True
    >>> require(nn.Linear(1, 1), CertifiedModule, "IBPWarmup")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    TypeError: IBPWarmup needs the module to satisfy CertifiedModule (...); Linear lacks ['backbone', ...]
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn
from typing_extensions import get_protocol_members

__all__ = [
    "CertifiedModule",
    "FORGET_RETAIN_HINT",
    "ForgetRetainData",
    "HasBatchLoss",
    "IndexedData",
    "OfflineDesignsData",
    "missing_members",
    "require",
]


@runtime_checkable
class HasBatchLoss(Protocol):
    """A module that gives the loss of its own objective on one batch.

    ``batch_loss(batch)`` returns the mean loss over the samples of ``batch``, a batch exactly as
    the module's dataloader yields it (already on the module's device), as a differentiable scalar.
    It must not log, step an optimizer or change state other than through autograd. Callbacks
    call it in the module's current mode (mask scoring and the monitor put it in eval mode first).

    A module without it still works with every callback: :func:`litplug.plumbing.loss.module_loss`
    falls back to its ``training_step`` with logging muted. Define it when ``training_step`` does
    more than compute a loss (manual optimisation, a batch of another shape, extra terms that are
    no objective).
    """

    def batch_loss(self, batch: Any) -> Tensor: ...


@runtime_checkable
class CertifiedModule(Protocol):
    """The module ``IBPWarmup`` drives (``litplug.modules.CertifiedClassifier`` is one).

    Attributes:
        eps: target radius (read by the callback).
        current_eps: radius of the next ``training_step`` (set at every batch start).
        regularizer_weight: weight of the warmup regularizers in the next step (set).
        regularizer_tolerance: their tolerance ``tau`` (set).
        backbone: the network that IBP initialisation re-initialises.
    """

    eps: float
    current_eps: float
    regularizer_weight: float
    regularizer_tolerance: float
    backbone: nn.Module


@runtime_checkable
class ForgetRetainData(Protocol):
    """A datamodule that splits its training data into a forget and a retain set
    (``litplug.datamodules.ForgetRetain`` is one). Each loader yields batches the module's
    :func:`litplug.plumbing.loss.module_loss` accepts."""

    def forget_dataloader(self) -> Iterable[Any]: ...

    def retain_dataloader(self) -> Iterable[Any]: ...


FORGET_RETAIN_HINT = (
    "To use UnlearningMask on your own module, keep your own datamodule and add the two loaders the mask "
    "reads (litplug.protocols.ForgetRetainData):\n"
    "    def forget_dataloader(self):\n"
    "        return DataLoader(self.forget_set, batch_size=self.batch_size)\n"
    "    # retain_dataloader: the same over the retain set"
)


@runtime_checkable
class OfflineDesignsData(Protocol):
    """Offline model-based optimisation data for ``GradientAscentSearch``
    (``litplug.datamodules.OfflineDesigns`` is one): standardised ``designs`` with their
    ``scores``, the box ``[lower, upper]`` the designs live in, the true objective ``score(x)`` of
    raw designs and ``unstandardise(x)``. The module maps a batch of standardised designs to
    predicted scores with its ``forward``."""

    designs: Tensor
    scores: Tensor
    lower: Tensor
    upper: Tensor

    def score(self, x: Tensor) -> Tensor: ...

    def unstandardise(self, x: Tensor) -> Tensor: ...


@runtime_checkable
class IndexedData(Protocol):
    """A datamodule whose training samples carry their training-set index
    (``litplug.datamodules.Indexed`` wraps any datamodule into one): ``batch_index`` holds the
    indices of the current training batch from ``on_train_batch_start`` on, ``num_examples`` is the
    training-set size, ``labels()`` the training labels, ``keep(indices)`` restricts the next
    training loader to ``indices`` and ``subset_loader(indices, batch_size)`` loads training samples
    in a given order (batches as the module sees them)."""

    batch_index: Tensor | None
    num_examples: int

    def labels(self) -> Tensor: ...

    def keep(self, indices: Tensor | None) -> None: ...

    def subset_loader(self, indices: Any, batch_size: int) -> Iterable[Any]: ...


def missing_members(obj: Any, protocol: type) -> list[str]:
    """Sorted names of ``protocol``'s members that ``obj`` lacks (``[]``: it satisfies it)."""
    return sorted(name for name in get_protocol_members(protocol) if not hasattr(obj, name))


def require(obj: Any, protocol: type, by: str, what: str = "module") -> None:
    """Raise a ``TypeError`` naming ``protocol`` and the missing members unless ``obj`` has them all.

    Args:
        obj: the module or datamodule checked (``None`` counts as lacking everything).
        protocol: a Protocol of this file.
        by: who needs it, for the message (e.g. ``"IBPWarmup"``).
        what: ``"module"`` or ``"datamodule"``, for the message.
    """
    missing = missing_members(obj, protocol)
    if missing:
        raise TypeError(
            f"{by} needs the {what} to satisfy {protocol.__name__} (litplug.protocols); "
            f"{type(obj).__name__} lacks {missing}"
        )
