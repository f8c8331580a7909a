"""Task vectors and the steps the task-vector merges share (TIES, DARE, breadcrumbs): exact-k
magnitude masks over a tensor or the whole model, sign election and the (disjoint) mean."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor

from .states import AnyWeights, State, check_states, state_of, states_of, work_dtype

Trim = Literal["model", "tensor"]
TRIMS = ("model", "tensor")


def task_vector(base: AnyWeights, finetuned: AnyWeights) -> State:
    """``finetuned - base`` for every floating tensor (float32, float64 for float64 tensors).

    Example:
        >>> import torch
        >>> task_vector({"w": torch.ones(2)}, {"w": torch.tensor([3.0, 1.0])})["w"]
        tensor([2., 0.])
    """
    b, f = state_of(base, "base"), state_of(finetuned, "finetuned")
    check_states([b, f], "states")
    return {k: f[k].to(work_dtype(v)) - v.to(work_dtype(v)) for k, v in b.items() if v.is_floating_point()}


def stacked_deltas(
    base: AnyWeights, finetuned: Sequence[AnyWeights]
) -> tuple[Mapping[str, Tensor], list[Mapping[str, Tensor]], dict[str, Tensor]]:
    """The base state, the fine-tuned states and, per floating tensor, the task vectors stacked
    along a new first axis (one row per fine-tune), in the base tensor's dtype."""
    base_state = state_of(base, "base")
    states = states_of(finetuned, "finetuned")
    if not states:
        raise ValueError("`finetuned` must hold at least one model or state dict")
    check_states([base_state, *states], "states")
    # in the models' own dtype, as mergekit's task-vector merges: bf16 models merge in bf16
    deltas = {}
    for name, b in base_state.items():
        if b.is_floating_point():
            deltas[name] = torch.stack([s[name].to(b.dtype) - b for s in states])
    if not deltas:
        raise ValueError("`base` has no floating tensors to merge")
    return base_state, states, deltas


def top_k_mask(magnitudes: Tensor, k: int) -> Tensor:
    """A boolean mask keeping exactly ``k`` entries of each row of ``magnitudes`` (``(rows, d)``):
    the ``k`` largest, and among entries tied with the ``k``-th largest the earliest ones."""
    d = magnitudes.shape[1]
    if k >= d:
        return torch.ones_like(magnitudes, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(magnitudes, dtype=torch.bool)
    threshold = magnitudes.kthvalue(d - k + 1, dim=1, keepdim=True).values  # the k-th largest
    above = magnitudes > threshold
    tied = magnitudes == threshold
    room = k - above.sum(1, keepdim=True)
    return above | (tied & (tied.cumsum(1) <= room))


def _rows(deltas: Mapping[str, Tensor], trim: Trim) -> list[list[str]]:
    """The groups of tensors that are trimmed together: all of them, or one at a time."""
    return [list(deltas)] if trim == "model" else [[name] for name in deltas]


def _flat(deltas: Mapping[str, Tensor], names: list[str]) -> Tensor:
    """``|delta|`` of ``names`` as one ``(tasks, d)`` float64 matrix (exact for float32 inputs)."""
    return torch.cat([deltas[n].abs().flatten(1).double() for n in names], 1)


def _unflat(mask: Tensor, deltas: Mapping[str, Tensor], names: list[str]) -> dict[str, Tensor]:
    out, offset = {}, 0
    for n in names:
        size = deltas[n][0].numel()
        out[n] = mask[:, offset : offset + size].reshape(deltas[n].shape)
        offset += size
    return out


def magnitude_masks(deltas: Mapping[str, Tensor], density: float, trim: Trim) -> dict[str, Tensor]:
    """Keep exactly ``int(density * d)`` largest magnitudes of every task vector, ``d`` counted
    over the whole model or per tensor (``trim``)."""
    masks: dict[str, Tensor] = {}
    for names in _rows(deltas, trim):
        mags = _flat(deltas, names)
        masks.update(_unflat(top_k_mask(mags, int(density * mags.shape[1])), deltas, names))
    return masks


def outlier_masks(deltas: Mapping[str, Tensor], density: float, gamma: float, trim: Trim) -> dict[str, Tensor]:
    """Model breadcrumbs' mask: drop the ``int(gamma * d)`` largest magnitudes, keep the next
    ``int(density * d)`` (fewer large ones dropped when both do not fit in ``d``)."""
    masks: dict[str, Tensor] = {}
    for names in _rows(deltas, trim):
        mags = _flat(deltas, names)
        d = mags.shape[1]
        keep = int(density * d)
        top = min(int(gamma * d), d - keep)
        upto = top_k_mask(mags, top + keep)
        masks.update(_unflat(upto & ~top_k_mask(mags, top), deltas, names))
    return masks


def combine(
    base: Mapping[str, Tensor],
    deltas: Mapping[str, Tensor],
    weights: Sequence[float],
    consensus: bool,
    normalize: bool,
    scale: float,
) -> State:
    """``base + scale * mix(weights_t * delta_t)`` per tensor, in the deltas' dtype.

    Without ``consensus`` the mix is the weighted sum (divided by the sum of weights when
    ``normalize``). With it, each entry's sign is elected as ``sign(sum_t w_t delta_t)`` (an
    exact 0 takes the sign of the sum of the elected signs over the model, the TIES authors'
    "majority" rule) and only the entries agreeing with it are summed (and divided by the sum of
    their weights when ``normalize``: TIES' disjoint mean). Integer tensors come from ``base``.
    """
    weighted = {}
    for name, d in deltas.items():
        w = torch.tensor(list(weights), dtype=d.dtype).view(-1, *([1] * (d.dim() - 1)))
        weighted[name] = (d * w, w)
    elected = {}
    if consensus:
        elected = {name: torch.sign(wd.sum(0)) for name, (wd, _) in weighted.items()}
        majority = torch.sign(sum(e.sum().double() for e in elected.values()))
        elected = {name: torch.where(e == 0, majority.to(e.dtype), e) for name, e in elected.items()}
    out: State = {}
    for name, b in base.items():
        if name not in weighted:
            out[name] = b.clone()
            continue
        wd, w = weighted[name]
        if consensus:
            agree = (torch.sign(wd) == elected[name]).to(wd.dtype)
            mixed = (wd * agree).sum(0)
            divisor = (w * agree).sum(0)
            divisor[divisor == 0] = 1
        else:
            mixed = wd.sum(0)
            divisor = w.sum(0)
        if normalize:
            mixed = mixed / divisor
        if scale != 1:
            mixed = mixed * scale
        out[name] = (b.to(wd.dtype) + mixed).to(b.dtype)
    return out
