"""Model stock (see :mod:`litplug.merging` for the method card)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .states import AnyWeights, Weights, check_states, returned_as, state_of, states_of


def model_stock_tensor(w0: Tensor, ws: Sequence[Tensor]) -> Tensor:
    """Model stock of one tensor: ``t = N cos / (1 + (N - 1) cos)`` from the mean pairwise cosine
    of the fine-tunes' offsets from ``w0``, then ``t * mean(ws) + (1 - t) * w0`` (``t = 0`` where
    the denominator vanishes), in ``w0``'s dtype as mergekit."""
    base = w0.reshape(-1)
    flat = [w.to(w0.dtype).reshape(-1) for w in ws]
    offsets = [w - base for w in flat]
    cosines = []
    for i, u in enumerate(offsets):
        for v in offsets[i + 1 :]:
            norms = torch.linalg.vector_norm(u, dim=-1) * torch.linalg.vector_norm(v, dim=-1)
            cosines.append(((u * v).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(flat)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos), n * cos / torch.where(singular, 1, denominator))
    average = sum(flat) / n
    return (t * average + (1 - t) * base).reshape(w0.shape).to(w0.dtype)


def model_stock(base: Weights, finetuned: Sequence[AnyWeights]) -> Weights:
    """Model stock (Jang et al. 2024, "Model Stock: All we need is just a few fine-tuned models",
    Eq. 2): per tensor, with ``theta`` the mean pairwise angle between the fine-tunes' offsets
    ``w_i - w_0`` from the pre-trained ``w_0``, ``t = N cos(theta) / (1 + (N - 1) cos(theta))``
    and ``w = t * mean_i w_i + (1 - t) * w_0``. Needs at least two fine-tunes. Where
    ``1 + (N - 1) cos`` is (numerically) 0 the tensor keeps ``w_0``, as mergekit does. Integer
    tensors come from ``base``. Returns the kind of ``base`` (module or state dict).

    Example:
        >>> import torch
        >>> base = {"w": torch.zeros(2)}
        >>> model_stock(base, [{"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, 1.0])}])["w"]
        tensor([0., 0.])
    """
    base_state = state_of(base, "base")
    states = states_of(finetuned, "finetuned")
    if len(states) < 2:
        raise ValueError(f"`finetuned` must hold at least two models for model stock, got {len(states)}")
    check_states([base_state, *states], "states")
    out = {}
    for name, w0 in base_state.items():
        out[name] = model_stock_tensor(w0, [s[name] for s in states]) if w0.is_floating_point() else w0.clone()
    return returned_as(base, out)
