"""The one owner of writes to a parameter's storage outside the optimizer.

Several callbacks change where or what a parameter stores: EMA/SWA re-lay the weights into one flat
buffer (an update is one ``lerp_``), SAM/IGNITE/the sharpness monitor swap perturbed weights in
and out, and the unlearning mask writes frozen entries back. They compose because every such write
goes through this module and keeps its contract:

1. A parameter stays the same ``Parameter`` object; only its storage or values change, so the
   optimizer's state, hooks and DDP's buckets keep pointing at it.
2. :func:`flatten_` re-lays parameters into one contiguous buffer, values unchanged: each becomes
   a view of the buffer, until another :func:`flatten_`.
3. :func:`swap_` puts another tensor in as the storage and returns the one it replaces; swapping
   that one back restores the parameter exactly, including being a view of a flat buffer, so a
   perturbation never undoes a re-layout. Every swap bumps the parameter's version counter, as an
   in-place write does, so caches keyed on it (``litplug.bounds.cached_abs``) and autograd see it.
4. In-place writes of values (:func:`writable`) go to the local shard of a sharded (FSDP2
   DTensor) parameter, whose storage FSDP2 owns and which is never swapped or re-laid.
5. Writes run under ``torch.no_grad()`` and between optimizer steps or inside a closure, never
   during another callback's swap (callbacks restore before returning from their hook).

Example:
    >>> import torch
    >>> from torch import nn
    >>> a, b = nn.Parameter(torch.ones(2)), nn.Parameter(torch.zeros(3))
    >>> flat = flatten_([a, b]); flat
    tensor([1., 1., 0., 0., 0.])
    >>> own = swap_(a, torch.full((2,), 5.0)); a.data
    tensor([5., 5.])
    >>> _ = swap_(a, own); a.data.data_ptr() == flat.data_ptr()
    True
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from . import is_sharded, local

__all__ = ["flatten_", "swap_", "writable"]


@torch.no_grad()
def flatten_(params: Sequence[nn.Parameter]) -> Tensor:
    """Re-lay ``params`` (plain, one dtype and device) into one new contiguous buffer, in place:
    same ``Parameter`` objects and values, each a view of the returned buffer. One tensor at a
    time, each old storage freed as soon as it is copied (the peak holds one tensor twice)."""
    sizes = [p.numel() for p in params]
    flat = torch.empty(sum(sizes), dtype=params[0].dtype, device=params[0].device)
    for param, view in zip(params, flat.split(sizes)):
        view = view.view_as(param)
        view.copy_(param.detach())
        param.data = view
    return flat


@torch.no_grad()
def swap_(param: nn.Parameter, tensor: Tensor) -> Tensor:
    """Make ``tensor`` the storage of ``param`` (plain, same shape and dtype) and return the one it
    replaces; the version counter is bumped."""
    own = param.data
    param.data = tensor
    torch.autograd.graph.increment_version(param)
    return own


def writable(param: Tensor) -> Tensor:
    """The tensor to write ``param``'s values into in place: its local shard when sharded."""
    return local(param) if is_sharded(param) else param
