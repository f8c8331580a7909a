"""The loss of a module's own objective on one batch, for callbacks that need one.

:func:`module_loss` is what SAM's extra passes, the sharpness monitor and the mask's scoring call:
the module's ``batch_loss`` (:class:`litplug.protocols.HasBatchLoss`) when it has one, else its
``training_step`` run muted (:func:`litplug.plumbing.third_party_private.muted`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from ..protocols import HasBatchLoss

__all__ = ["loss_of", "module_loss", "require_loss"]


def loss_of(output: Any) -> Tensor:
    """The loss in what ``training_step`` returned: the tensor itself or the ``"loss"`` of a dict.

    Example:
        >>> import torch
        >>> loss_of({"loss": torch.tensor(1.0)})
        tensor(1.)
    """
    loss = output.get("loss") if isinstance(output, Mapping) else output
    if not isinstance(loss, Tensor):
        raise TypeError(
            f"`training_step` must return a loss tensor (or a dict with 'loss'), got {type(output).__name__}"
        )
    return loss


def module_loss(pl_module: Any, batch: Any, batch_idx: int = 0) -> Tensor:
    """The loss of ``pl_module``'s own objective on ``batch``: ``pl_module.batch_loss(batch)``
    (:class:`~litplug.protocols.HasBatchLoss`) if it defines one, else its
    ``training_step(batch, batch_idx)`` run with ``self.log`` muted and torchmetrics states put
    back (once: inside a caller's :func:`~litplug.plumbing.third_party_private.muted` it runs as
    is). ``training_step`` must return the loss (or a dict with ``"loss"``). Callers that must not
    update normalisation statistics put the module in eval mode first (in eval mode those
    statistics are part of the graph, so they cannot be put back before the backward).

    A module with ``automatic_optimization = False`` steps its optimizers inside
    ``training_step``, so it must define ``batch_loss``; without it this raises (callbacks check
    this at setup with :func:`require_loss`).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> class Tiny(nn.Module):
        ...     def batch_loss(self, batch):
        ...         return batch.square().mean()
        >>> module_loss(Tiny(), torch.ones(3))
        tensor(1.)
    """
    if isinstance(pl_module, HasBatchLoss):
        return pl_module.batch_loss(batch)
    _check_automatic(pl_module, "module_loss")
    from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature

    from .third_party_private import is_muted, muted

    takes_idx = is_param_in_hook_signature(pl_module.training_step, "batch_idx", min_args=2)
    step = pl_module.training_step
    if is_muted(pl_module):  # inside a caller's `muted` (the monitor, the held-out loss): mute once
        return loss_of(step(batch, batch_idx) if takes_idx else step(batch))
    with muted(pl_module, None, freeze_bn_stats=False):
        return loss_of(step(batch, batch_idx) if takes_idx else step(batch))


def require_loss(pl_module: Any, by: str) -> None:
    """Check at setup that :func:`module_loss` can run on ``pl_module`` (it can, unless the module
    uses manual optimisation and defines no ``batch_loss``)."""
    if not isinstance(pl_module, HasBatchLoss):
        _check_automatic(pl_module, by)


def _check_automatic(pl_module: Any, by: str) -> None:
    if not getattr(pl_module, "automatic_optimization", True):
        raise TypeError(
            f"{by} needs a loss on a batch; {type(pl_module).__name__} uses manual optimisation "
            "(`automatic_optimization = False`), so its `training_step` steps optimizers and cannot be re-run: "
            "define `batch_loss(self, batch) -> Tensor` (Protocol HasBatchLoss of litplug.protocols)"
        )
