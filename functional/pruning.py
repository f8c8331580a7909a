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

from ..validation import check_int

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
    _check_logits(out, y)
    return out


def _check_logits(out: Any, y: Tensor) -> None:
    if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != y.shape[0] or y.dim() != 1:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(
            f"data scores need a model mapping inputs to logits [batch, classes] and class targets [batch]; "
            f"got output {got} for targets {tuple(y.shape)}"
        )


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


def grand_scores(
    model: nn.Module, loader: Iterable[Any], loss: Loss | None = None, max_memory: int = 256 * 2**20
) -> Tensor:
    """GraNd: the L2 norm of the gradient of the per-sample loss (``loss(logits, targets)`` on a
    batch of one, mean cross-entropy unless given) with respect to every parameter that requires
    grad, in loader order (float64).

    One forward and one backward per batch, no graph kept after it. When the model is in eval mode
    and every trainable parameter belongs to an ``nn.Linear`` called once per forward (MLPs), the
    per-sample norms come from that backward's layer inputs ``a_i`` and output gradients ``g_i``
    without forming any per-sample gradient: ``||g_i a_i^T||^2 = ||g_i||^2 ||a_i||^2`` (inputs
    with extra dimensions: ``sum_ts (g_it . g_is)(a_it . a_is)``), bias ``||sum_t g_it||^2``. On
    the first batch the parameters' batch gradient is checked against ``sum_i g_i a_i^T`` on a
    fixed probe vector, so a parameter also used outside its layer falls back to the general
    path. Any other model: ``torch.func`` (``vmap`` of ``grad`` over the batch, in chunks of at
    most ``max_memory`` bytes of per-sample gradients, one norm per parameter tensor, never a
    concatenated gradient). Buffers are read, not updated (normalisation layers in
    train mode would use per-sample statistics: use eval mode)."""
    check_int("max_memory", max_memory, low=1)
    loss = loss or F.cross_entropy
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("grand_scores needs a model with parameters that require grad")
    layers = _linear_layers(model)
    ghost = _GhostNorms(model, layers, loss) if layers is not None else None
    general = None
    scores = []
    try:
        for x, y in _batches(loader):
            got = ghost(x, y) if ghost is not None else None
            if got is None:
                if ghost is not None:  # the general path for the rest of the loader
                    ghost.remove()
                    ghost = None
                general = general or _per_sample_norms(model, trainable, loss, max_memory)
                got = general(x, y)
            scores.append(got)
    finally:
        if ghost is not None:
            ghost.remove()
    return torch.cat(scores) if scores else torch.zeros(0, dtype=torch.float64)


def _linear_layers(model: nn.Module) -> list[nn.Linear] | None:
    """The ``nn.Linear`` layers holding every trainable parameter, or None where the closed form does
    not apply: a module in train mode, a trainable parameter elsewhere or shared, a subclass with its
    own forward."""
    if any(m.training for m in model.modules()):
        return None
    layers = []
    for module in model.modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        if not isinstance(module, nn.Linear) or type(module).forward is not nn.Linear.forward:
            return None
        layers.append(module)
    counted = [p for _, p in model.named_parameters(remove_duplicate=False) if p.requires_grad]
    return layers if len({id(p) for p in counted}) == len(counted) else None


class _GhostNorms:
    """Per-sample gradient norms of a model whose trainable parameters are all in ``nn.Linear``
    layers, from one forward and one backward to the layers' outputs (no parameter gradient, no
    per-sample gradient formed). The first batch also takes the parameters' batch gradient and
    checks it against ``sum_i g_i a_i^T`` on a probe vector: a weight used outside its layer
    returns None (the caller falls back)."""

    def __init__(self, model: nn.Module, layers: list[nn.Linear], loss: Loss) -> None:
        self.model, self.layers, self.loss, self.checked = model, layers, loss, False
        self.calls: dict[nn.Linear, list[tuple[Tensor, Tensor]]] = {m: [] for m in layers}
        self.handles = [m.register_forward_hook(self._keep) for m in layers]

    def _keep(self, module: nn.Module, args: tuple[Any, ...], out: Tensor) -> None:
        self.calls[module].append((args[0].detach(), out))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def __call__(self, x: Tensor, y: Tensor) -> Tensor | None:
        for calls in self.calls.values():
            calls.clear()
        with torch.enable_grad():
            logits = _logits(self.model, x, y)
            total = _summed_loss(self.loss, logits, y)
        calls = [self.calls[m] for m in self.layers]
        self.calls = {m: [] for m in self.layers}  # the graph goes with the last reference
        batch = y.shape[0]
        if any(len(c) != 1 or c[0][0].dim() < 2 or c[0][0].shape[0] != batch for c in calls):
            return None  # a layer called twice (its contributions would add inside the norm) or unbatched
        outs = [c[0][1] for c in calls]
        params = [] if self.checked else [p for m in self.layers for p in (m.weight, m.bias) if p is not None]
        params = [p for p in params if p.requires_grad]
        grads = torch.autograd.grad(total, outs + params, allow_unused=True)
        grads = [torch.zeros_like(t) if g is None else g for t, g in zip(outs + params, grads)]
        batch_grads = dict(zip(map(id, params), grads[len(outs) :]))
        squares = torch.zeros(batch, dtype=torch.float64, device=logits.device)
        got, want = [], []
        for m, (a, _), g in zip(self.layers, [c[0] for c in calls], grads[: len(outs)]):
            a, g = a.reshape(batch, -1, a.shape[-1]), g.reshape(batch, -1, g.shape[-1])  # [B, T, in], [B, T, out]
            g_bias = g.sum(1)
            if m.weight.requires_grad:
                if params:
                    probe = torch.linspace(-1, 1, a.shape[-1], dtype=a.dtype, device=a.device).cos()
                    got.append(batch_grads[id(m.weight)] @ probe)
                    want.append(torch.einsum("bto,bt->o", g, a @ probe))
                if a.shape[1] == 1:
                    squares += (g_bias.square().sum(1) * a[:, 0].square().sum(1)).double()
                elif a.shape[1] ** 2 * (a.shape[-1] + g.shape[-1]) <= a.shape[-1] * g.shape[-1]:
                    squares += ((g @ g.transpose(1, 2)) * (a @ a.transpose(1, 2))).sum((1, 2)).double()
                else:
                    squares += torch.einsum("bto,bti->boi", g, a).square().sum((1, 2)).double()
            if m.bias is not None and m.bias.requires_grad:
                if params:
                    got.append(batch_grads[id(m.bias)])
                    want.append(g_bias.sum(0))
                squares += g_bias.square().sum(1).double()
        if params:
            got_all, want_all = torch.cat(got), torch.cat(want)
            if not torch.allclose(got_all, want_all, rtol=1e-4, atol=1e-6 * float(want_all.abs().max())):
                return None  # a parameter is also used outside its layer's forward
            self.checked = True
        return squares.sqrt()


def _summed_loss(loss: Loss, logits: Tensor, y: Tensor) -> Tensor:
    """The sum over the batch of ``loss`` on each sample as a batch of one."""
    if loss is F.cross_entropy:
        return F.cross_entropy(logits, y, reduction="sum")
    from torch.func import vmap

    try:
        return vmap(lambda z, t: loss(z.unsqueeze(0), t.unsqueeze(0)))(logits, y).sum()
    except RuntimeError:  # a loss vmap cannot batch (data-dependent control flow)
        return sum(loss(logits[i : i + 1], y[i : i + 1]) for i in range(len(y)))


def _per_sample_norms(
    model: nn.Module, trainable: list[tuple[str, Tensor]], loss: Loss, max_memory: int
) -> Callable[[Tensor, Tensor], Tensor]:
    from torch.func import functional_call, grad, vmap

    params = {n: p.detach() for n, p in trainable}
    frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    size = sum(p.numel() * p.element_size() for p in params.values())
    chunk = max(1, max_memory // size)

    def one(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        out = functional_call(model, (p, frozen, buffers), (x.unsqueeze(0),))
        _check_logits(out, y.unsqueeze(0))
        return loss(out, y.unsqueeze(0))

    per_sample = vmap(grad(one), in_dims=(None, 0, 0), randomness="different")

    def norms(x: Tensor, y: Tensor) -> Tensor:
        out = []
        for start in range(0, y.shape[0], chunk):  # per-sample gradients of `chunk` samples at a time
            grads = per_sample(params, x[start : start + chunk], y[start : start + chunk]).values()
            out.append(sum(torch.linalg.vector_norm(g.flatten(1), dim=1).double().square() for g in grads))
        return torch.cat(out).sqrt()

    return norms


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
