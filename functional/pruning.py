"""Per-example data scores for pruning: EL2N and GraNd (Paul et al. 2021, "Deep Learning on a Data
Diet") and forgetting events (Toneva et al. 2019, "An Empirical Study of Example Forgetting").

* ``el2n_scores(model, loader)``: ``||softmax(f(x)) - onehot(y)||_2`` per sample (one forward);
* ``grand_scores(model, loader)``: ``||grad_w loss(f(x), y)||_2`` per sample over every trainable
  parameter, computed with ``torch.func`` (``vmap`` of ``grad`` over the batch, one
  forward+backward per batch);
* ``forgetting_events(previous, correct)``: which samples were classified correctly at their last
  presentation and are not now (one event each); ``forgetting_scores`` turns counts into scores.

Batches are ``(inputs, targets)`` on the model's device; scores come in loader order. Both score
functions run the model as it is (call ``model.eval()`` first for scores free of dropout and
batch statistics) and leave its parameters and buffers untouched.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from litplug.functional import el2n_scores, grand_scores
    >>> model = nn.Linear(3, 2)
    >>> loader = [(torch.randn(4, 3), torch.tensor([0, 1, 1, 0]))]
    >>> el2n_scores(model, loader).shape, grand_scores(model, loader).shape
    (torch.Size([4]), torch.Size([4]))
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["el2n_scores", "forgetting_events", "forgetting_scores", "grand_scores"]

Loss = Callable[[Tensor, Tensor], Tensor]


def _batches(loader: Iterable[Any]) -> Iterable[tuple[Tensor, Tensor]]:
    for batch in loader:
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise ValueError(
                f"data scores need (inputs, targets) batches, got a {type(batch).__name__}"
                + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
            )
        yield batch[0], batch[1]


def _logits(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    out = model(x)
    if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != y.shape[0] or y.dim() != 1:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(
            f"data scores need a model mapping inputs to logits [batch, classes] and class targets [batch]; "
            f"got output {got} for targets {tuple(y.shape)}"
        )
    return out


@torch.no_grad()
def el2n_scores(model: nn.Module, loader: Iterable[Any]) -> Tensor:
    """EL2N: the L2 norm of the error ``softmax(f(x)) - onehot(y)`` of every sample, in loader
    order (float64 on the model's output device)."""
    scores = []
    for x, y in _batches(loader):
        logits = _logits(model, x, y)
        p = logits.double().softmax(-1)
        p[torch.arange(len(y), device=p.device), y] -= 1.0
        scores.append(p.norm(dim=-1))
    return torch.cat(scores) if scores else torch.zeros(0, dtype=torch.float64)


def grand_scores(model: nn.Module, loader: Iterable[Any], loss: Loss | None = None) -> Tensor:
    """GraNd: the L2 norm of the gradient of the per-sample loss (``loss(logits, targets)`` on a
    batch of one, mean cross-entropy unless given) with respect to every parameter that requires
    grad, in loader order (float64). Batched with ``torch.func.vmap(grad(...))``: one forward and
    backward per batch, memory one gradient per sample of the batch. Buffers are read, not
    updated (normalisation layers in train mode would use per-sample statistics: use eval mode)."""
    from torch.func import functional_call, grad, vmap

    loss = loss or F.cross_entropy
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    if not names:
        raise ValueError("grand_scores needs a model with parameters that require grad")

    def one(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        out = functional_call(model, (p, frozen, buffers), (x.unsqueeze(0),))
        return loss(out, y.unsqueeze(0))

    per_sample = vmap(grad(one), in_dims=(None, 0, 0), randomness="different")
    scores = []
    for x, y in _batches(loader):
        with torch.no_grad():
            _logits(model, x[:1], y[:1])  # the shape check, on one sample
        grads = per_sample(params, x, y)
        squares = sum(torch.linalg.vector_norm(grads[n].flatten(1), dim=1).double().square() for n in names)
        scores.append(squares.sqrt())
    return torch.cat(scores) if scores else torch.zeros(0, dtype=torch.float64)


def forgetting_events(previous: Tensor, correct: Tensor) -> Tensor:
    """Forgetting events of one presentation: ``previous`` holds each sample's correctness at its
    last presentation (1 correct, 0 wrong, -1 never presented), ``correct`` the correctness now
    (bool). An event is a sample correct before and wrong now (Toneva et al.'s definition).

    Example:
        >>> import torch
        >>> forgetting_events(torch.tensor([1, 1, 0, -1]), torch.tensor([False, True, False, False]))
        tensor([ True, False, False, False])
    """
    return (previous == 1) & ~correct.bool()


def forgetting_scores(counts: Tensor, learned: Tensor) -> Tensor:
    """Scores from forgetting counts: the number of events of each sample, ``inf`` for samples
    never classified correctly (Toneva et al. count them as forgotten infinitely often).

    Example:
        >>> import torch
        >>> forgetting_scores(torch.tensor([0, 2, 0]), torch.tensor([True, True, False]))
        tensor([0., 2., inf], dtype=torch.float64)
    """
    scores = counts.double().clone()
    scores[~learned.bool()] = float("inf")
    return scores
