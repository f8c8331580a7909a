"""Per-example data scores for pruning: EL2N and GraNd (Paul et al. 2021, "Deep Learning on a Data
Diet") and forgetting events (Toneva et al. 2019, "An Empirical Study of Example Forgetting").

* ``el2n_scores(model, loader)``: ``||softmax(f(x)) - onehot(y)||_2`` per sample (one forward);
* ``grand_scores(model, loader)``: ``||grad_w loss(f(x), y)||_2`` per sample over every trainable
  parameter, in closed form from one forward+backward per batch for linear, convolution and
  BatchNorm layers, else with ``torch.func`` (``vmap`` of ``grad`` over the batch);
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
    and every trainable parameter belongs to a layer with a closed form called once per forward
    (``nn.Linear``; ``nn.Conv1d``/``nn.Conv2d`` with ``groups=1`` and zero padding; the affine
    parameters of ``BatchNorm`` with running statistics), the per-sample norms come from that
    backward's layer inputs and output gradients without a per-sample gradient of the whole
    model. A linear or convolution weight's per-sample gradient is ``sum_t g_it a_it^T`` over the
    output positions ``t`` (``a_it`` the input patch, ``torch.nn.functional.unfold`` for a
    convolution): its squared norm is ``||g_i||^2 ||a_i||^2`` for one position, else
    ``sum_ts (g_it . g_is)(a_it . a_is)`` (``T^2 (in + out)`` flops) or the formed ``[out, in]``
    gradient (``T in out`` flops), whichever takes fewer; bias ``||sum_t g_it||^2``; BatchNorm
    weight ``sum_c (sum_t g_itc xhat_itc)^2`` and bias ``sum_c (sum_t g_itc)^2``. On the first
    batch the parameters' batch gradient is checked against these terms summed over the batch
    (on a fixed probe vector for weights), so a parameter also used outside its layer falls back
    to the general path. Any other model (grouped or non-zero-padded convolutions, Conv3d, other
    layers): ``torch.func`` (``vmap`` of ``grad`` over the batch, one norm per parameter tensor,
    never a concatenated gradient). Both paths work in chunks of samples holding at most
    ``max_memory`` bytes of per-sample tensors. Buffers are read, not updated (normalisation
    layers in train mode would use per-sample statistics: use eval mode)."""
    check_int("max_memory", max_memory, low=1)
    loss = loss or F.cross_entropy
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("grand_scores needs a model with parameters that require grad")
    layers = _closed_form_layers(model)
    ghost = _GhostNorms(model, layers, loss, max_memory) if layers is not None else None
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


_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _has_closed_form(module: nn.Module) -> bool:
    cls = type(module)
    if isinstance(module, nn.Linear):
        return cls.forward is nn.Linear.forward
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        base = nn.Conv1d if isinstance(module, nn.Conv1d) else nn.Conv2d
        return cls.forward is base.forward and module.groups == 1 and module.padding_mode == "zeros"
    if isinstance(module, _BATCH_NORMS):
        return cls.forward is nn.BatchNorm1d.forward and module.running_mean is not None  # the shared forward
    return False


def _closed_form_layers(model: nn.Module) -> list[nn.Module] | None:
    """The layers holding every trainable parameter, or None where the closed form does not apply:
    a module in train mode, a trainable parameter elsewhere or shared, a layer without a closed
    form (see ``_has_closed_form``), a subclass with its own forward."""
    if any(m.training for m in model.modules()):
        return None
    layers = []
    for module in model.modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        if not _has_closed_form(module):
            return None
        layers.append(module)
    counted = [p for _, p in model.named_parameters(remove_duplicate=False) if p.requires_grad]
    return layers if len({id(p) for p in counted}) == len(counted) else None


def _input_dims(module: nn.Module) -> tuple[int, ...]:
    """The input dimensions (batch included) a layer's closed form handles."""
    if isinstance(module, nn.Conv1d):
        return (3,)
    if isinstance(module, nn.Conv2d):
        return (4,)
    if isinstance(module, _BATCH_NORMS):
        return (2, 3, 4, 5)
    return tuple(range(2, 64))


def _patches(module: nn.Module, x: Tensor) -> Tensor:
    """The input rows ``a_t`` of a linear layer or the unfolded input patches of a convolution:
    ``[batch, positions, in]``, ordered like ``weight.flatten(1)``."""
    if isinstance(module, nn.Linear):
        return x.reshape(x.shape[0], -1, x.shape[-1])
    one_d = isinstance(module, nn.Conv1d)
    if one_d:
        x = x.unsqueeze(2)
    kernel, dilation, stride = ((1, *v) if one_d else v for v in (module.kernel_size, module.dilation, module.stride))
    if not isinstance(module.padding, str):
        padding = (0, *module.padding) if one_d else module.padding
        return F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride).transpose(1, 2)
    if module.padding == "same":  # stride 1; an odd total padding puts the extra zero on the right
        pad = []
        for d, k in zip(reversed(module.dilation), reversed(module.kernel_size)):
            pad += [d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2]
        x = F.pad(x, pad)
    return F.unfold(x, kernel, dilation=dilation, stride=stride).transpose(1, 2)


class _GhostNorms:
    """Per-sample gradient norms of a model whose trainable parameters are all in layers with a
    closed form, from one forward and one backward to the layers' outputs (no parameter gradient,
    no per-sample gradient of the whole model). The first batch also takes the parameters' batch
    gradient and checks it against the per-sample terms summed over the batch: a parameter used
    outside its layer returns None (the caller falls back)."""

    def __init__(self, model: nn.Module, layers: list[nn.Module], loss: Loss, max_memory: int) -> None:
        self.model, self.layers, self.loss, self.max_memory, self.checked = model, layers, loss, max_memory, False
        self.calls: dict[nn.Module, list[tuple[Tensor, Tensor]]] = {m: [] for m in layers}
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
        if any(
            len(c) != 1 or c[0][0].dim() not in _input_dims(m) or c[0][0].shape[0] != batch
            for m, c in zip(self.layers, calls)
        ):
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
            weight = m.weight is not None and m.weight.requires_grad
            bias = m.bias is not None and m.bias.requires_grad
            check = [p for p, used in ((m.weight, weight), (m.bias, bias)) if used and params]
            got += [batch_grads[id(p)].flatten(1) @ _probe(p) if p.dim() > 1 else batch_grads[id(p)] for p in check]
            if isinstance(m, _BATCH_NORMS):
                terms = self._batch_norm(m, a, g, weight, bias)
            else:
                terms = self._outer(m, a, g, weight, bias, bool(params))
            squares += terms[0]
            want += terms[1]
        if params:
            got_all, want_all = torch.cat(got), torch.cat(want)
            if not torch.allclose(got_all, want_all, rtol=1e-4, atol=1e-6 * float(want_all.abs().max())):
                return None  # a parameter is also used outside its layer's forward
            self.checked = True
        return squares.sqrt()

    @staticmethod
    def _batch_norm(m: nn.Module, x: Tensor, g: Tensor, weight: bool, bias: bool) -> tuple[Tensor, list[Tensor]]:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        x_hat = (x - m.running_mean.view(shape)) * torch.rsqrt(m.running_var.view(shape) + m.eps)
        g, x_hat = g.reshape(*g.shape[:2], -1), x_hat.reshape(*x_hat.shape[:2], -1)  # [B, C, positions]
        per_sample = ([(g * x_hat).sum(2)] if weight else []) + ([g.sum(2)] if bias else [])
        return sum(t.double().square().sum(1) for t in per_sample), [t.sum(0) for t in per_sample]

    def _outer(
        self, m: nn.Module, x: Tensor, g: Tensor, weight: bool, bias: bool, check: bool
    ) -> tuple[Tensor, list[Tensor]]:
        """``sum_t g_t a_t^T`` (weight) and ``sum_t g_t`` (bias) per sample, in chunks of samples."""
        g = g.reshape(g.shape[0], -1, g.shape[-1]) if isinstance(m, nn.Linear) else g.flatten(2).transpose(1, 2)
        positions, n_out = g.shape[1:]
        n_in = m.weight[0].numel()
        ghost = positions * (n_in + n_out) <= n_in * n_out  # fewer flops, and then less memory too
        per_sample = positions * n_in + (2 * positions**2 if ghost else n_in * n_out)
        chunk = max(1, self.max_memory // (per_sample * g.element_size()))
        squares, probed, biases = [], [], []
        for s in range(0, g.shape[0], chunk):
            gc = g[s : s + chunk]
            g_bias = gc.sum(1)
            biases.append(g_bias)
            if not weight:
                continue
            a = _patches(m, x[s : s + chunk])
            if check:
                probed.append(torch.einsum("bto,bt->o", gc, a @ _probe(m.weight)))
            if positions == 1:
                squares.append(g_bias.square().sum(1) * a[:, 0].square().sum(1))
            elif ghost:
                squares.append(((gc @ gc.transpose(1, 2)) * (a @ a.transpose(1, 2))).sum((1, 2)))
            else:
                squares.append(torch.linalg.vector_norm(torch.einsum("bto,bti->boi", gc, a).flatten(1), dim=1).square())
        g_bias = torch.cat(biases)
        total = torch.cat(squares).double() if weight else torch.zeros(g.shape[0], dtype=torch.float64)
        if bias:
            total = total + g_bias.square().sum(1).double()
        want = ([sum(probed)] if weight and check else []) + ([g_bias.sum(0)] if bias and check else [])
        return total.to(g.device), want


def _probe(weight: Tensor) -> Tensor:
    """A fixed vector over a weight's input dimension (``weight.flatten(1)``'s columns)."""
    n = weight[0].numel()
    return torch.linspace(-1, 1, n, dtype=weight.dtype, device=weight.device).cos()


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
