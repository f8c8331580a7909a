"""The fused autograd functions of the engine: the interval rules of ``Linear``, ``ReLU`` and
train-mode batch norm, and the ReLU statistics of the warmup regularizers, with hand-written
backward passes that avoid the weight-sized and activation-sized temporaries autograd would
create. Each is checked against autograd on the plain formula (gradcheck, and whole-network
comparisons with ``fused=False``)."""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.nn.functional as F

from ..plumbing import is_sharded
from ..plumbing.third_party_private import version

_SCRATCH: dict[int, dict[str, Any]] = {}  # id(weight) -> buffers, dropped with the weight


def _scratch(weight: torch.Tensor, name: str) -> torch.Tensor:
    """A buffer shaped like ``weight`` that lives as long as the weight (reused across steps)."""
    buffers = _buffers(weight)
    buf = buffers.get(name)
    if buf is None or buf.shape != weight.shape or buf.dtype != weight.dtype or buf.device != weight.device:
        with torch.inference_mode(False):  # a normal tensor, writable in and outside inference mode
            buf = buffers[name] = torch.empty_like(weight, memory_format=torch.contiguous_format)
    return buf


def _buffers(weight: torch.Tensor) -> dict[str, Any]:
    buffers = _SCRATCH.get(id(weight))
    if buffers is None:
        buffers = _SCRATCH[id(weight)] = {}
        weakref.finalize(weight, _SCRATCH.pop, id(weight), None)
    return buffers


def cached_abs(weight: torch.Tensor) -> torch.Tensor:
    """``|weight|`` without gradient, kept in the weight's scratch buffer (the one
    :class:`IntervalLinear` uses) and recomputed only when the weight has changed since: another
    version (any in-place write such as an optimizer step or ``load_state_dict`` bumps it), storage,
    offset, shape, stride or dtype. Bounding a network twice with the same weights (evaluation)
    then skips a pass over every weight and a weight-sized allocation.

    Memory: one weight-sized buffer per weight, freed with the weight (training with
    :class:`IntervalLinear` keeps the same buffer anyway). Writes through ``weight.data``, which
    autograd's version counter does not see, are not noticed: write under ``torch.no_grad()``.
    For use where no gradient flows through the result (``torch.no_grad``, or an autograd
    function's forward); inference-mode weights get a plain ``weight.abs()``.
    """
    return _abs_into_scratch(weight, reuse=True)


def _abs_into_scratch(weight: torch.Tensor, reuse: bool) -> torch.Tensor:
    """``|weight|`` written into the weight's ``"abs"`` scratch buffer (skipped when ``reuse`` and
    the buffer already holds it), recording which weight state the buffer holds."""
    if weight.is_inference():  # no version counter
        return weight.abs()
    buf = _scratch(weight, "abs")
    storage = weight.untyped_storage()  # a preserved Python object: the same one while the storage lives
    key = (version(weight), weight.storage_offset(), weight.shape, weight.stride(), weight.dtype)
    buffers = _buffers(weight)
    seen = buffers.get("abs_of")
    if not reuse or seen is None or seen[0] is not buf or seen[1]() is not storage or seen[2] != key:
        torch.abs(weight, out=buf)
        buffers["abs_of"] = (buf, weakref.ref(storage), key)
    return buf


def can_fuse(x: torch.Tensor, weight: torch.Tensor | None = None) -> bool:
    """Whether the fused functions apply: gradients on, float32/64 tensors of one dtype, no
    DTensor weight, autocast off (elsewhere plain autograd is as good)."""
    return (
        torch.is_grad_enabled()
        and x.dtype in (torch.float32, torch.float64)
        and (weight is None or (weight.dtype == x.dtype and not is_sharded(weight)))
        and not torch.is_autocast_enabled(x.device.type)
    )


class IntervalLinear(torch.autograd.Function):
    """``(stack, r) -> (stack W^T + b, r |W|^T)`` with one weight-sized gradient buffer.

    Autograd's path materialises ``|W|``'s gradient, ``sign(W)``, their product and the sum with
    the centre path's weight gradient: five fresh weight-sized tensors per step, which dominate the
    step for a wide layer (CNN7's 32768 x 512 ``Linear``). Here ``dL/dW = sign(W) * (g_r^T r) + g_s^T
    s`` is accumulated in place in the one gradient buffer, and ``|W|``, ``sign(W)`` are written
    into scratch buffers kept per weight (fresh large tensors cost page faults on every step).
    The scratch ``|W|`` is read again in backward: the weight is a saved tensor, so autograd has
    checked that it was not modified since; any call in between wrote ``|W|`` of the same values.
    """

    @staticmethod
    def forward(
        ctx: Any, stack: torch.Tensor, radius: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> Any:
        # Always written here: a step changes the weights anyway, and gradcheck perturbs them
        # through ``.data``, which the version counter does not see.
        abs_weight = _abs_into_scratch(weight, reuse=False)
        ctx.save_for_backward(stack, radius, weight)
        ctx.has_bias = bias is not None
        return F.linear(stack, weight, bias), F.linear(radius, abs_weight)

    @staticmethod
    def backward(ctx: Any, g_stack: torch.Tensor, g_radius: torch.Tensor) -> Any:
        stack, radius, weight = ctx.saved_tensors
        abs_weight = _scratch(weight, "abs")
        grad_stack = g_stack @ weight if ctx.needs_input_grad[0] else None
        grad_radius = g_radius @ abs_weight if ctx.needs_input_grad[1] else None
        grad_weight = grad_bias = None
        gs, s = g_stack.reshape(-1, g_stack.shape[-1]), stack.reshape(-1, stack.shape[-1])
        if ctx.needs_input_grad[2]:
            gr, r = g_radius.reshape(-1, g_radius.shape[-1]), radius.reshape(-1, radius.shape[-1])
            sign = torch.sign(weight, out=_scratch(weight, "sign"))
            grad_weight = torch.mm(gr.t(), r).mul_(sign).addmm_(gs.t(), s)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_bias = gs.sum(0)
        return grad_stack, grad_radius, grad_weight, grad_bias


class IntervalReLU(torch.autograd.Function):
    """ReLU of a box and of the clean batch: ``(stack, r) -> (stack', r', l, u)`` with ``l, u = c
    -+ r`` (returned for the warmup regularizers), ``c' = (relu(u) + relu(l)) / 2``, ``r' = (relu(u)
    - relu(l)) / 2`` and the clean half ``relu(clean)``, written straight into one output stack.

    Autograd would slice the stack (each slice's backward is a zero-filled stack-sized tensor) and
    re-stack the result; the hand-written backward writes one stack-sized gradient.
    """

    @staticmethod
    def forward(ctx: Any, stack: torch.Tensor, radius: torch.Tensor, tracked: bool) -> Any:
        n = radius.shape[0]
        centre = stack[:n]
        lower, upper = centre - radius, centre + radius
        f_lower = lower.clamp_min(0)
        out = torch.empty_like(stack)
        out_radius = upper.clamp_min(0).sub_(f_lower).mul_(0.5)
        torch.add(f_lower, out_radius, out=out[:n])
        if tracked:
            torch.clamp_min(stack[n:], 0, out=out[n:])
        ctx.save_for_backward(stack, lower, upper)
        ctx.set_materialize_grads(False)
        return out, out_radius, lower, upper

    @staticmethod
    def backward(ctx: Any, g_out: Any, g_radius: Any, g_lower: Any, g_upper: Any) -> Any:
        stack, lower, upper = ctx.saved_tensors
        n = lower.shape[0]
        # in the box's layout: a channels-last box can get a row-major gradient (through a Flatten)
        g_out = torch.zeros_like(stack) if g_out is None else g_out.contiguous(memory_format=_fmt(stack))
        g_centre = g_out[:n]
        g_radius = torch.zeros_like(lower) if g_radius is None else g_radius.contiguous(memory_format=_fmt(lower))
        # dL/du = [u > 0] (g_c' + g_r') / 2 + g_u, dL/dl = [l > 0] (g_c' - g_r') / 2 + g_l
        g_u = torch.ops.aten.threshold_backward(g_centre + g_radius, upper, 0).mul_(0.5)
        g_l = torch.ops.aten.threshold_backward(g_centre - g_radius, lower, 0).mul_(0.5)
        if g_upper is not None:
            g_u.add_(g_upper)
        if g_lower is not None:
            g_l.add_(g_lower)
        grad = torch.empty_like(stack)
        torch.add(g_u, g_l, out=grad[:n])
        if n < stack.shape[0]:
            torch.ops.aten.threshold_backward.grad_input(g_out[n:], stack[n:], 0, grad_input=grad[n:])
        return grad, g_u.sub_(g_l), None


def relu_box(
    stack: torch.Tensor, radius: torch.Tensor, tracked: bool, inplace: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """ReLU of a box without gradients, in centre/radius form: with ``h = relu(c + r) / 2``,
    ``c' = max(c, h)`` and ``r' = min(r, h)`` (and ``relu`` of the clean half of the stack).

    The same box as :class:`IntervalReLU`'s ``((relu(u) + relu(l)) / 2, (relu(u) - relu(l)) / 2)``:
    for ``l >= 0`` it is ``(c, r)`` itself, for ``u <= 0`` zero, else ``(u / 2, u / 2)``; the
    comparisons pick the case (also in floating point, as rounding is monotone). It takes five
    passes and two allocations instead of seven and five, and for ``l >= 0`` it returns ``(c, r)``
    exactly where the difference of the two clamped ends rounds. ``inplace``: overwrite ``stack``
    and ``radius`` (one allocation instead of two).
    """
    n = radius.shape[0]
    centre = stack[:n]
    half = torch.add(centre, radius).clamp_min_(0).mul_(0.5)
    if inplace:
        torch.minimum(radius, half, out=radius)
        torch.maximum(centre, half, out=centre)
        if tracked:
            stack[n:].clamp_min_(0)
        return stack, radius
    out_radius = torch.minimum(radius, half)
    if not tracked:
        return torch.maximum(centre, half, out=half), out_radius
    out = torch.empty_like(stack)
    torch.maximum(centre, half, out=out[:n])
    torch.clamp_min(stack[n:], 0, out=out[n:])
    return out, out_radius


class IntervalBatchNorm(torch.autograd.Function):
    """Train-mode batch norm of a box and the clean batch, with the statistics of the clean batch
    (of the centres when it is not tracked): ``(stack, r) -> (stack', r', mean, var)``.

    The backward takes its per-channel sums from ``native_batch_norm_backward`` (in eval form, with
    the batch's statistics given) and adds the statistics' own terms to the clean half in place:
    about ten passes over the activations fewer than autograd's graph of the same formula.
    """

    @staticmethod
    def forward(
        ctx: Any,
        stack: torch.Tensor,
        radius: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        eps: float,
        tracked: bool,
    ) -> Any:
        n = radius.shape[0]
        ref = stack[n:] if tracked else stack
        var, mean = torch.var_mean(ref, [0, *range(2, stack.dim())], unbiased=False)
        invstd = torch.rsqrt(var + eps)
        scale = invstd if weight is None else invstd * weight
        shift = -mean * scale if bias is None else bias - mean * scale
        shape = [1, -1] + [1] * (stack.dim() - 2)
        out = torch.addcmul(shift.view(shape), stack, scale.view(shape))
        out_radius = radius * scale.abs().view(shape)
        ctx.save_for_backward(stack, radius, weight, mean, var, invstd, scale)
        ctx.eps, ctx.tracked, ctx.has_bias = eps, tracked, bias is not None
        ctx.mark_non_differentiable(mean, var)
        ctx.set_materialize_grads(False)
        return out, out_radius, mean, var

    @staticmethod
    def backward(ctx: Any, g_out: Any, g_radius: Any, _g_mean: Any, _g_var: Any) -> Any:
        stack, radius, weight, mean, var, invstd, scale = ctx.saved_tensors
        g_out = torch.zeros_like(stack) if g_out is None else g_out.contiguous(memory_format=_fmt(stack))
        g_radius = torch.zeros_like(radius) if g_radius is None else g_radius.contiguous(memory_format=_fmt(radius))
        bn_backward = torch.ops.aten.native_batch_norm_backward
        # grad of the stack at fixed statistics, sum(g (x - mean) invstd), sum(g) per channel
        g_stack, sum_g_xhat, sum_g = bn_backward(
            g_out, stack, weight, mean, var, None, None, False, ctx.eps, [True, True, True]
        )
        # grad of the radius (g |scale|) and sum(g r): batch norm "backward" with mean 0, std 1
        abs_scale = scale.abs()
        g_rad, sum_g_r, _ = bn_backward(
            g_radius,
            radius,
            abs_scale,
            torch.zeros_like(mean),
            torch.ones_like(var),
            None,
            None,
            False,
            0.0,
            [True, True, False],
        )
        gamma = weight if weight is not None else torch.ones_like(invstd)
        g_weight = None
        if weight is not None and ctx.needs_input_grad[2]:
            g_weight = sum_g_xhat + gamma.sign() * invstd * sum_g_r
        g_bias = sum_g if ctx.has_bias and ctx.needs_input_grad[3] else None
        # the statistics' terms: scale = gamma invstd and shift = beta - mean scale depend on them
        g_invstd = gamma * sum_g_xhat / invstd + gamma.abs() * sum_g_r
        g_mean = -scale * sum_g
        g_var = -0.5 * invstd.pow(3) * g_invstd
        n = radius.shape[0]
        start = n if ctx.tracked else 0
        ref, g_ref = stack[start:], g_stack[start:]
        count = ref.numel() // ref.shape[1]
        k1 = 2 * g_var / count
        k0 = g_mean / count - k1 * mean
        shape = [1, -1] + [1] * (stack.dim() - 2)
        g_ref.addcmul_(ref, k1.view(shape)).add_(k0.view(shape))
        return g_stack, g_rad, g_weight, g_bias, None, None


def relu_statistics(lower: torch.Tensor, upper: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What the regularizers need of one ReLU's box (centres ``c``, radii ``r``, ``N`` entries):
    ``[mean(r), sum(c [l > 0]) / N, sum(c [u < 0]) / N, sum((c - mean c)^2 [l > 0]),
    sum((c - mean c)^2 [u < 0])]`` and the two group sizes."""
    centre, radius = (upper + lower) / 2, (upper - lower) / 2
    active, inactive = (lower > 0).to(centre.dtype), (upper < 0).to(centre.dtype)
    spread = (centre - centre.mean()) ** 2
    stats = [radius.mean(), (centre * active).mean(), (centre * inactive).mean()]
    stats = torch.stack(stats + [(spread * active).sum(), (spread * inactive).sum()])
    return stats, torch.stack([active.sum(), inactive.sum()])


class ReLUStatistics(torch.autograd.Function):
    """:func:`relu_statistics` with a hand-written backward: a few passes over the box instead
    of autograd's two dozen (the regularizers cost a fifth of an IBP step otherwise).

    With ``d = c - mean(c)``, ``S_a = sum(d [l > 0])`` (``S_i`` likewise) and the gradients ``g_0 ..
    g_4`` of the five statistics: ``dL/dc = [l > 0] (g_1 / N + 2 g_3 d) + [u < 0] (g_2 / N + 2 g_4 d)
    - 2 (g_3 S_a + g_4 S_i) / N`` (the groups are disjoint), and ``dL/du, dL/dl = dL/dc / 2 +- g_0 / (2 N)``.
    Only ``l`` and ``u`` are saved (the ReLU keeps them anyway); the backward recomputes the rest.
    """

    @staticmethod
    def forward(ctx: Any, lower: torch.Tensor, upper: torch.Tensor) -> Any:
        n = lower.numel()
        sum_upper, sum_lower = upper.sum(), lower.sum()
        mean = (sum_upper + sum_lower) / (2 * n)
        deviation, active, inactive = deviation_and_groups(lower, upper, mean)
        flat, square = _memory_order(deviation), _memory_order(deviation.square())
        masks = _memory_order(active), _memory_order(inactive)
        sums = torch.stack([torch.dot(flat, mask) for mask in masks])
        spreads = [torch.dot(square, mask) for mask in masks]
        counts = torch.stack([active.sum(), inactive.sum()])  # float sums: count_nonzero of floats is slow
        mean_radius = (sum_upper - sum_lower) / (2 * n)
        means = (sums + mean * counts) / n
        ctx.save_for_backward(lower, upper, mean, sums)
        ctx.mark_non_differentiable(counts)
        return torch.stack([mean_radius, *means.unbind(), *spreads]), counts

    @staticmethod
    def backward(ctx: Any, g_stats: torch.Tensor, _g_counts: Any) -> Any:
        lower, upper, mean, sums = ctx.saved_tensors
        n = lower.numel()
        deviation, active, inactive = deviation_and_groups(lower, upper, mean)
        # Python scalars: products with 0-dim tensors are several times slower on CPU than with
        # numbers (this costs one small device sync per layer on GPU).
        g_radius, g_mean_a, g_mean_i, g_spread_a, g_spread_i = g_stats.tolist()
        sum_a, sum_i = sums.tolist()
        slope = torch.mul(active, g_spread_a).add_(inactive, alpha=g_spread_i)
        g_half = torch.mul(active, g_mean_a / (2 * n)).add_(inactive, alpha=g_mean_i / (2 * n))
        g_half.addcmul_(deviation, slope).sub_((g_spread_a * sum_a + g_spread_i * sum_i) / n)
        shift = g_radius / (2 * n)
        return g_half - shift, g_half.add_(shift)


def deviation_and_groups(lower: torch.Tensor, upper: torch.Tensor, mean: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``c - mean(c)`` and the 0/1 masks ``l > 0``, ``u < 0`` in the box's dtype (products with
    float masks are about 3x faster than with bool ones on CPU)."""
    deviation = torch.add(upper, lower).mul_(0.5)
    deviation.sub_(mean)
    active = torch.gt(lower, 0, out=torch.empty_like(lower))
    inactive = torch.lt(upper, 0, out=torch.empty_like(upper))
    return deviation, active, inactive


class ReLURelaxation(torch.autograd.Function):
    """One ReLU of a backward (CROWN) pass: coefficients ``A`` (``[S, B, *shape]``) of the ReLU's
    output become ``A' = A * (s_pos where A >= 0 else s_neg)`` of its input, and the constant
    ``sum(A_sel * b)`` per row (``A_sel`` the negative part of ``A`` for a lower bound, the
    positive part for an upper bound) is added to the bound.

    The same values as the plain formula ``pos * s_pos + neg * s_neg`` and ``sum(neg * b)``;
    autograd's graph of it makes about 20 passes over ``A``-sized tensors (clamps, products, sums
    and their masks and zero-filled gradients), this one about 10. The backward selects with
    0/1 masks in ``A``'s dtype, not ``torch.where`` (several times slower on CPU), and sums over
    the rows with ``sum(0)``, not an ``einsum`` (which becomes a batched product of 1-element
    matrices).
    """

    @staticmethod
    def forward(
        ctx: Any, a: torch.Tensor, s_pos: torch.Tensor, s_neg: torch.Tensor, b: torch.Tensor, lower: bool
    ) -> Any:
        last = a.dim() == 5 and _last(a[0])
        if last:  # the layout of ``a`` (what a transposed convolution returns)
            s_pos, s_neg, b = (t.contiguous(memory_format=torch.channels_last) for t in (s_pos, s_neg, b))
        neg = a.clamp(max=0)
        out = torch.mul(a, s_pos).addcmul_(neg, s_neg - s_pos)
        sel = neg if lower else a - neg
        const = torch.einsum("sbn,bn->sb", _flat(sel, 2, last), _flat(b, 1, last))
        ctx.save_for_backward(a, neg, s_pos, s_neg, b)
        ctx.lower, ctx.last = lower, last
        ctx.set_materialize_grads(False)
        return out, const

    @staticmethod
    def backward(ctx: Any, g_out: Any, g_const: Any) -> Any:
        a, neg, s_pos, s_neg, b = ctx.saved_tensors
        lower, last = ctx.lower, ctx.last
        grad_a = g_s_pos = g_s_neg = g_b = None
        gc = None if g_const is None else g_const.view(*g_const.shape, *[1] * (a.dim() - 2))
        # Few fresh A-sized tensors: on CPU each costs about a pass of page faults on top of its pass.
        scratch = torch.empty_like(a)
        if ctx.needs_input_grad[0]:
            # [A < 0] (g (s_neg - s_pos) + b g_const) + g s_pos (lower); the upper bound takes b on [A > 0]
            negative = torch.lt(a, 0, out=scratch)
            grad_a = torch.zeros_like(a) if g_out is None else torch.mul(g_out, s_neg - s_pos)
            if gc is not None and lower:
                grad_a.addcmul_(b, gc)
            grad_a.mul_(negative)
            if g_out is not None:
                grad_a.addcmul_(g_out, s_pos)
            if gc is not None and not lower:
                grad_a.addcmul_(torch.gt(a, 0, out=scratch).mul_(b), gc)
        if g_out is not None and ctx.needs_input_grad[1]:
            g_s_pos = _row_sum(torch.sub(a, neg, out=scratch).mul_(g_out), last).view_as(s_pos)
        if g_out is not None and ctx.needs_input_grad[2]:
            g_s_neg = _row_sum(torch.mul(g_out, neg, out=scratch), last).view_as(s_neg)
        if gc is not None and ctx.needs_input_grad[3]:
            sel = neg if lower else torch.sub(a, neg, out=scratch)
            g_b = _unflat(torch.einsum("sb,sbn->bn", g_const, _flat(sel, 2, last)), b, last)
        return grad_a, g_s_pos, g_s_neg, g_b, None


def _last(t: torch.Tensor) -> bool:
    """Whether the 4-d tensor ``t`` is channels-last (and not also contiguous)."""
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def _row_sum(t: torch.Tensor, last: bool) -> torch.Tensor:
    """Sum of ``[S, B, ...]`` over the rows, as ``[B, ...]`` in ``t``'s layout (a reduction over
    the leading dimension of a channels-last tensor is several times slower than of its flat view)."""
    return _unflat(_flat(t, 2, last).sum(0), t[0], last)


def _unflat(flat: torch.Tensor, like: torch.Tensor, last: bool) -> torch.Tensor:
    """``[B, N]`` back to the shape of ``like`` (``[B, C, ...]``), from channels-last order when ``last``."""
    if last:
        return flat.view(like.shape[0], *like.shape[2:], like.shape[1]).movedim(-1, 1)
    return flat.view_as(like)


def _flat(t: torch.Tensor, start: int, last: bool) -> torch.Tensor:
    """``t`` flattened from dim ``start``, channels last when ``last`` (``[..., C, H, W]`` in
    channels-last layout: a view, where ``flatten`` would copy)."""
    return (t.movedim(start, -1) if last else t).flatten(start)


def _fmt(t: torch.Tensor) -> torch.memory_format:
    """``t``'s layout (for gradients that may arrive in another)."""
    return torch.channels_last if _last(t) else torch.contiguous_format


def _memory_order(t: torch.Tensor) -> torch.Tensor:
    """``t`` as 1-d in the order of its memory: a view also of a channels-last tensor (for sums over
    all elements, where ``reshape(-1)`` would copy it)."""
    return (t.movedim(1, -1) if _last(t) else t).reshape(-1)
