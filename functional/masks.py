"""Weight masks for unlearning, pure torch: scores (SalUn's saliency, WAGLE's attribution), the
exact top-k selection (radix select, shard-aware), and the bit-exact enforcement of frozen
entries on gradients and weights. :class:`litplug.callbacks.UnlearningMask` wires them in."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__ = [
    "attribution_scores",
    "enforce_masked_grads_",
    "frozen_bits",
    "keep_bits",
    "kth_largest_key",
    "restore_frozen_",
    "saliency_scores",
    "topk_masks",
]

Reduce = Callable[[torch.Tensor], torch.Tensor]


def _sortable_keys(score: torch.Tensor) -> torch.Tensor:
    # For non-negative float32 the int32 bit pattern orders like the value (+inf on top).
    return score.detach().float().abs().nan_to_num(nan=0.0).contiguous().view(torch.int32)


def kth_largest_key(keys: Sequence[torch.Tensor], k: int, all_reduce: Reduce | None = None) -> tuple[int, int]:
    """Radix select (8 bits per pass) of the ``k``-th largest int32 key (keys >= 0) over the
    tensors ``keys``, summed over processes by ``all_reduce`` (a 256-count histogram per pass).
    Returns ``(t, m)``: the key ``t`` and how many entries equal to ``t`` complete the top k."""
    prefix, need = 0, k
    for shift in (24, 16, 8, 0):
        hist = torch.zeros(256, dtype=torch.long)
        for key in keys:
            cand = key if shift == 24 else key[(key >> (shift + 8)) == prefix]
            hist += torch.bincount(((cand >> shift) & 0xFF).long().flatten(), minlength=256).cpu()
        if all_reduce is not None:
            hist = all_reduce(hist)
        at_least = hist.flip(0).cumsum(0)  # at_least[j] = entries whose digit >= 255 - j
        j = int(torch.nonzero(at_least >= need)[0])
        digit = 255 - j
        need -= int(at_least[j] - hist[digit])
        prefix = (prefix << 8) | digit
    return prefix, need


def topk_masks(
    scores: Sequence[torch.Tensor],
    k: int,
    all_reduce: Reduce | None = None,
    all_gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
    rank: int = 0,
) -> list[torch.Tensor]:
    """Boolean masks selecting exactly the ``k`` highest scores over all tensors of ``scores``.

    Ties at the threshold go to the lower global index: tensor order, then rank order (the
    ``Shard(0)`` row blocks of one parameter), then row-major order. In a sharded setting, each
    process passes its local shards; ``all_reduce`` sums a tensor over processes and
    ``all_gather`` stacks one per process (``[world, ...]``); ``rank`` is this process's index
    in that stack. Scores are compared as float32
    after ``abs``; NaN counts as 0.

    Example:
        >>> [m.tolist() for m in topk_masks([torch.tensor([1.0, 3.0]), torch.tensor([3.0, 2.0])], 2)]
        [[False, True], [True, False]]
    """
    keys = [_sortable_keys(s) for s in scores]
    if k <= 0:
        return [torch.zeros_like(key, dtype=torch.bool) for key in keys]
    threshold, need = kth_largest_key(keys, k, all_reduce)
    ties = torch.tensor([int((key == threshold).sum()) for key in keys], dtype=torch.long)
    table = all_gather(ties) if all_gather is not None else ties.view(1, -1)  # [world, tensors]
    # quota[r, i]: ties taken from tensor i on process r, in (tensor, rank) order
    quota = torch.zeros_like(table)
    for i in range(table.shape[1]):
        for r in range(table.shape[0]):
            quota[r, i] = min(int(table[r, i]), need)
            need -= int(quota[r, i])
    masks = []
    for i, key in enumerate(keys):
        eq = key == threshold
        take = eq & (eq.flatten().cumsum(0) <= quota[rank, i]).view_as(eq)
        masks.append((key > threshold) | take)
    return masks


def saliency_scores(grads_forget: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """SalUn: ``|g_f|``."""
    return [g.abs() for g in grads_forget]


def attribution_scores(
    params: Sequence[torch.Tensor], grads_forget: Sequence[torch.Tensor], grads_retain: Sequence[torch.Tensor], mu: float
) -> list[torch.Tensor]:
    """WAGLE: ``|(theta - g_r / mu) * g_f|``."""
    return [((p - gr / mu) * gf).abs() for p, gf, gr in zip(params, grads_forget, grads_retain)]


_INT_OF_WIDTH = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """``t``'s memory seen as integers of the same width (a view: writes go to ``t``)."""
    return t.view(_INT_OF_WIDTH[t.element_size()])


def keep_bits(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """0/1 integers of ``like``'s width (1 where ``mask``: updatable), to multiply the *bits* of
    tensors of ``like``'s dtype with: integer arithmetic on the bit patterns is exact, so a frozen
    entry becomes +0.0 even if it held inf or NaN, and a free entry keeps its bits."""
    return mask.to(device=like.device, dtype=_INT_OF_WIDTH[like.element_size()])


def frozen_bits(original: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The bits of ``original`` at frozen entries, 0 at free ones (for :func:`restore_frozen_`)."""
    return _bits(original) * (1 - keep)


def enforce_masked_grads_(grads: Sequence[torch.Tensor | None], keep: Sequence[torch.Tensor]) -> None:
    """Set the gradients' frozen entries to +0.0 in place, inf/NaN included: their bits times
    :func:`keep_bits` (exact, and about 6x faster on CPU than ``masked_fill_``)."""
    for g, k in zip(grads, keep):
        if g is not None:
            _bits(g).mul_(k)


def restore_frozen_(params: Sequence[torch.Tensor], frozen: Sequence[torch.Tensor], keep: Sequence[torch.Tensor]) -> None:
    """Put the original values back into the frozen entries of ``params`` in place, bit-exact, in
    one pass: ``bits(p) = frozen + bits(p) * keep`` (:func:`frozen_bits`, :func:`keep_bits`)."""
    for p, o, k in zip(params, frozen, keep):
        b = _bits(p)
        torch.addcmul(o, b, k, out=b)

