"""Linear-relaxation rules of the operator table: what backward linear bound propagation (CROWN,
Zhang et al. 2018; :mod:`.crown`) does at each operator.

A backward pass carries, for every node, coefficients ``A`` of shape ``[S, B, *node_shape]`` (``S``
specification rows, ``B`` samples) of a linear function of the node's value. At an affine operator
``y = M x + m`` the coefficients of the input are ``M^T A`` (:attr:`Linear.transpose`) and the
constant ``<A, m>`` (:attr:`Linear.offset`) is added to the bound. At ReLU (:attr:`Linear.relax`)
each neuron with pre-activation bounds ``l < 0 < u`` is enclosed by ``a z <= relu(z) <= d z + b``
with ``d = u / (u - l)``, ``b = -l d`` and the adaptive lower slope ``a = 1 if u > -l else 0``; a
lower bound takes ``a`` for positive and ``d, b`` for negative coefficients (an upper bound the
reverse).

``transpose(step, A, absolute)`` with ``absolute=True`` returns ``|M|^T A`` (for ``A >= 0``): the
radius of an interval pushed backwards through the operator (the Jacobian bound of
:mod:`.lipschitz`).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..plumbing.third_party_private import BatchNorm, adaptive_avg_pool2d_backward, tree_leaves
from .interval import Interval, UnsupportedOperationError


class Step(NamedTuple):
    """One operator as the backward pass sees it: the target (module, function or method name),
    its arguments (:class:`~.interval.Interval` where perturbed) and ``call(*tensors)``, the
    operator evaluated with plain tensors in place of the perturbed arguments (in the order of
    ``leaves``)."""

    target: Any
    args: tuple
    kwargs: dict
    call: Callable[..., torch.Tensor]

    @property
    def leaves(self) -> list[Interval]:
        return [v for v in tree_leaves((self.args, self.kwargs)) if isinstance(v, Interval)]


class Linear(NamedTuple):
    """The linear relaxation of one operator (an entry's ``linear`` field).

    Attributes:
        transpose: ``(step, A, absolute) -> [A_i]``: coefficients of each perturbed argument (in
            the order of ``step.leaves``) of an affine operator; ``absolute``: through ``|M|``.
        offset: ``(step, A) -> [S, B]``: the constant part ``<A, m>`` (None: no constant part).
        relax: ``(x) -> (a, d, b)``: lower slope, upper slope and upper intercept of an
            elementwise activation given its input bounds ``x``.
    """

    transpose: Callable[[Step, torch.Tensor, bool], list[torch.Tensor]] | None = None
    offset: Callable[[Step, torch.Tensor], torch.Tensor] | None = None
    relax: Callable[[Interval], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None


def _sum(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(2).sum(2)


# -- affine maps with weights --------------------------------------------------------------------


def _linear_transpose(step: Step, a: torch.Tensor, absolute: bool) -> list[torch.Tensor]:
    weight = _weight(step)
    return [a @ (weight.abs() if absolute else weight)]


def _linear_offset(step: Step, a: torch.Tensor) -> torch.Tensor:
    bias = _bias(step)
    if bias is None:
        return a.new_zeros(a.shape[:2])
    return _sum(a * bias)


def _weight(step: Step) -> torch.Tensor:
    if isinstance(step.target, nn.Module):
        return step.target.weight
    return step.args[1] if len(step.args) > 1 else step.kwargs["weight"]


def _bias(step: Step) -> torch.Tensor | None:
    if isinstance(step.target, nn.Module):
        return step.target.bias
    return step.args[2] if len(step.args) > 2 else step.kwargs.get("bias")


def _conv_transpose(step: Step, a: torch.Tensor, absolute: bool) -> list[torch.Tensor]:
    m: nn.Conv1d | nn.Conv2d = step.target
    weight = m.weight.abs() if absolute else m.weight
    return [conv_transpose(m, weight, a, step.args[0].radius.shape)]


def conv_transpose(m: nn.Conv1d | nn.Conv2d, weight: torch.Tensor, a: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``M^T A`` of the convolution ``m`` (with ``weight``) for coefficients ``a`` (``[S, B, *out]``)
    of its output, on an input of ``shape``: a transposed convolution (its autograd backward is
    about 1.6x faster on CPU than that of ``torch.nn.grad.conv2d_input``). 2-d coefficients go
    channels-last (and come out so): on CPU the transposed convolution and its backward run about
    1.2x faster at stride 1 and 2x at stride 2 in that layout."""
    flat, args = _transpose_args(m, a, shape)
    transposed = F.conv_transpose1d if isinstance(m, nn.Conv1d) else F.conv_transpose2d
    return transposed(flat, weight, None, *args).unflatten(0, a.shape[:2])


def conv_transpose_offset(
    m: nn.Conv1d | nn.Conv2d, weight: torch.Tensor, a: torch.Tensor, shape: torch.Size, shift: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`conv_transpose` and the constant ``<A, shift>`` (``shift`` per output channel, ``[S,
    B]``) of one affine layer, as one autograd function: its backward adds ``g_const shift`` to the
    transposed convolution's input gradient in place, where autograd would add two ``A``-sized
    gradients into a third."""
    flat, args = _transpose_args(m, a, shape)
    out, const = _ConvTransposeOffset.apply(flat, weight, shift, args)
    return out.unflatten(0, a.shape[:2]), const.view(a.shape[:2])


def _transpose_args(m: nn.Conv1d | nn.Conv2d, a: torch.Tensor, shape: torch.Size) -> tuple[torch.Tensor, tuple]:
    """``A`` as one batch (channels-last when 2-d) and the transposed convolution's ``(stride,
    padding, output_padding, groups, dilation)`` back to an input of ``shape``."""
    flat = a.flatten(0, 1)
    if flat.dim() == 4:
        flat = flat.contiguous(memory_format=torch.channels_last)
    padding = m.padding
    if isinstance(padding, str):  # "valid": none; "same" (stride 1): half the kernel's reach each side
        reach = [d * (k - 1) for d, k in zip(m.dilation, m.kernel_size)]
        if padding == "same" and any(r % 2 for r in reach):
            raise UnsupportedOperationError(f"Conv with padding='same' and an even kernel reach {reach}")
        padding = tuple(r // 2 if padding == "same" else 0 for r in reach)
    output_padding = tuple(  # the rows and columns the strided convolution never reached
        size - ((o - 1) * s - 2 * p + d * (k - 1) + 1)
        for size, o, s, p, d, k in zip(shape[2:], flat.shape[2:], m.stride, padding, m.dilation, m.kernel_size)
    )
    return flat, (tuple(m.stride), tuple(padding), output_padding, m.groups, tuple(m.dilation))


class _ConvTransposeOffset(torch.autograd.Function):
    """``(A, W, shift) -> (conv_transpose(A, W), sum over positions of A . shift)`` for ``A`` of shape
    ``[N, C, *spatial]``; the backward calls ``convolution_backward`` as autograd does."""

    @staticmethod
    def forward(ctx: Any, flat: torch.Tensor, weight: torch.Tensor, shift: torch.Tensor, args: tuple) -> Any:
        stride, padding, output_padding, groups, dilation = args
        transposed = F.conv_transpose1d if flat.dim() == 3 else F.conv_transpose2d
        out = transposed(flat, weight, None, stride, padding, output_padding, groups, dilation)
        sums = flat.sum(tuple(range(2, flat.dim())))
        ctx.save_for_backward(flat, weight, shift, sums)
        ctx.args = args
        ctx.set_materialize_grads(False)
        return out, sums @ shift

    @staticmethod
    def backward(ctx: Any, g_out: Any, g_const: Any) -> Any:
        flat, weight, shift, sums = ctx.saved_tensors
        stride, padding, output_padding, groups, dilation = ctx.args
        grad_flat = grad_weight = grad_shift = None
        need_flat, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if g_out is not None and (need_flat or need_weight):
            grad_flat, grad_weight, _ = torch.ops.aten.convolution_backward(
                g_out.contiguous(memory_format=_layout(flat)), flat, weight, None, list(stride), list(padding),
                list(dilation), True, list(output_padding), groups, [need_flat, need_weight, False],
            )  # fmt: skip
        if g_const is not None:
            spread = [1] * (flat.dim() - 2)
            if need_flat:
                if grad_flat is None:
                    grad_flat = torch.zeros_like(flat)
                grad_flat.addcmul_(shift.view(1, -1, *spread), g_const.view(-1, 1, *spread))
            if ctx.needs_input_grad[2]:
                grad_shift = g_const @ sums
        return grad_flat, grad_weight, grad_shift, None


def _layout(t: torch.Tensor) -> torch.memory_format:
    return (
        torch.channels_last
        if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)
        else torch.contiguous_format
    )


def _conv_offset(step: Step, a: torch.Tensor) -> torch.Tensor:
    bias = step.target.bias
    if bias is None:
        return a.new_zeros(a.shape[:2])
    return a.flatten(3).sum(3) @ bias


def batch_norm_statistics(m: BatchNorm, x: Interval) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, var)`` a batch norm normalises with under the interval rule: running statistics in
    eval mode, those of the clean batch (else of the box centres) in train mode."""
    if m.training or m.running_mean is None:
        ref = x.clean if x.tracked else x.centre
        var, mean = torch.var_mean(ref, [0, *range(2, ref.dim())], unbiased=False)  # one pass over the batch
        return mean, var
    return m.running_mean, m.running_var


def batch_norm_affine(
    m: BatchNorm, x: Interval, statistics: tuple[torch.Tensor, torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(factor, offset)`` of a batch norm as the interval rule applies it, from
    ``statistics`` (default: :func:`batch_norm_statistics`)."""
    mean, var = statistics if statistics is not None else batch_norm_statistics(m, x)
    factor = torch.rsqrt(var + m.eps)
    if m.weight is not None:
        factor = factor * m.weight
    offset = -mean * factor
    if m.bias is not None:
        offset = offset + m.bias
    return factor, offset


def _channels(t: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return t.view([-1] + [1] * (a.dim() - 3))


def _batch_norm_transpose(step: Step, a: torch.Tensor, absolute: bool) -> list[torch.Tensor]:
    factor, _ = batch_norm_affine(step.target, step.args[0])
    return [a * _channels(factor.abs() if absolute else factor, a)]


def _batch_norm_offset(step: Step, a: torch.Tensor) -> torch.Tensor:
    _, offset = batch_norm_affine(step.target, step.args[0])
    return _sum(a * _channels(offset, a))


# -- maps without weights ------------------------------------------------------------------------


def _reshape_transpose(step: Step, a: torch.Tensor, absolute: bool) -> list[torch.Tensor]:
    """Any reshape (view, flatten, squeeze, ...) keeps the order of the elements."""
    return [a.reshape(a.shape[0], *step.leaves[0].radius.shape)]


def _avg_pool_transpose(step: Step, a: torch.Tensor, absolute: bool) -> list[torch.Tensor]:
    x = step.leaves[0]
    flat = a.flatten(0, 1)
    like = x.radius.new_zeros(()).expand(flat.shape[0], *x.radius.shape[1:])
    m = step.target
    if isinstance(m, nn.AdaptiveAvgPool2d) or (not isinstance(m, nn.Module) and "adaptive" in m.__name__):
        out = adaptive_avg_pool2d_backward(flat, like)
    else:
        if isinstance(m, nn.AvgPool2d):
            k, st, pad, ceil, include, div = (
                m.kernel_size,
                m.stride,
                m.padding,
                m.ceil_mode,
                m.count_include_pad,
                m.divisor_override,
            )
        else:
            names = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")
            defaults = dict(zip(names, (None, None, 0, False, True, None)))
            given = {**defaults, **dict(zip(names, step.args[1:])), **step.kwargs}
            k, st, pad, ceil, include, div = (given[n] for n in names)
        st = k if st is None or st == [] else st
        out = torch.ops.aten.avg_pool2d_backward(flat, like, _pair(k), _pair(st), _pair(pad), ceil, include, div)
    return [out.unflatten(0, a.shape[:2])]


def _pair(v: Any) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _signs(step: Step) -> list[float]:
    """Sign of each perturbed argument of ``+``, ``-`` or negation."""
    target = step.target
    if target is operator.neg:
        return [-1.0]
    subtract = target in (operator.sub, torch.sub)
    return [-1.0 if subtract and i == 1 else 1.0 for i, v in enumerate(step.args[:2]) if isinstance(v, Interval)]


def _add_transpose(step: Step, a: torch.Tensor, absolute: bool) -> list[torch.Tensor]:
    out = []
    for sign, x in zip(_signs(step), step.leaves):
        out.append(_unbroadcast(a if absolute or sign > 0 else -a, x.radius.shape))
    return out


def _add_offset(step: Step, a: torch.Tensor) -> torch.Tensor:
    if step.target is operator.neg or all(isinstance(v, Interval) for v in step.args[:2]):
        return a.new_zeros(a.shape[:2])
    if isinstance(step.args[0], Interval):  # z + c, z - c
        const = step.args[1]
        return _sum(a * const) if step.target not in (operator.sub, torch.sub) else -_sum(a * const)
    return _sum(a * step.args[0])  # c + z, c - z (the sign of z is in the transpose)


def _getitem_transpose(step: Step, a: torch.Tensor, absolute: bool) -> list[torch.Tensor]:
    index = step.args[1] if isinstance(step.args[1], tuple) else (step.args[1],)
    out = a.new_zeros(a.shape[0], *step.leaves[0].radius.shape)
    out[(slice(None), *index)] += a
    return [out]


def _cat_transpose(step: Step, a: torch.Tensor, absolute: bool) -> list[torch.Tensor]:
    dim = step.kwargs.get("dim", step.args[1] if len(step.args) > 1 else 0)
    sizes = [x.radius.shape[dim] for x in step.leaves]
    dim = dim % step.leaves[0].radius.dim()
    return list(a.split(sizes, dim + 1))


def _mul_transpose(step: Step, a: torch.Tensor, absolute: bool) -> list[torch.Tensor]:
    x, k = step.args[0], step.args[1]
    if not isinstance(x, Interval):
        x, k = k, x
    k_abs = k.abs() if torch.is_tensor(k) else abs(k)
    out = a * (k_abs if absolute else k)
    return [_unbroadcast(out, x.radius.shape)]


def _unbroadcast(a: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum ``a`` ([S, *broadcast shape]) down to ``[S, *shape]``."""
    extra = a.dim() - 1 - len(shape)
    if extra > 0:
        a = a.sum(tuple(range(1, 1 + extra)))
    dims = [i + 1 for i, n in enumerate(shape) if n == 1 and a.shape[i + 1] != 1]
    return a.sum(dims, keepdim=True) if dims else a


# -- activations -----------------------------------------------------------------------------------


def relu_relaxation(x: Interval) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(a, d, b)`` with ``a z <= relu(z) <= d z + b`` on ``[l, u]``: ``d = u+ / (u+ - l-)``,
    ``b = -l- d`` (``l- = min(l, 0)``, ``u+ = max(u, 0)``), adaptive ``a = [d > 1/2]``; stable
    neurons get ``a = d = 1, b = 0`` (active) or ``a = d = b = 0`` (inactive)."""
    lower, upper = x.lower, x.upper
    neg = lower.clamp(max=0)
    pos = torch.maximum(upper.clamp(min=0), neg + 1e-8)  # ``l = u = 0``: slope 1, not 0/0
    d = pos / (pos - neg)
    return (d > 0.5).to(d.dtype), d, -neg * d


RELU = Linear(relax=relu_relaxation)
LINEAR = Linear(_linear_transpose, _linear_offset)
CONV = Linear(_conv_transpose, _conv_offset)
BATCH_NORM = Linear(_batch_norm_transpose, _batch_norm_offset)
ADD = Linear(_add_transpose, _add_offset)
"""``+``/``-`` of boxes or a box and a constant, negation."""
RESHAPE = Linear(_reshape_transpose)
AVG_POOL = Linear(_avg_pool_transpose)
GETITEM = Linear(_getitem_transpose)
CAT = Linear(_cat_transpose)
MUL = Linear(_mul_transpose)


def _dropout_transpose(step: Step, a: torch.Tensor, absolute: bool) -> list[torch.Tensor]:
    if isinstance(step.target, nn.Module):
        rate, training = step.target.p, step.target.training
    else:
        rate = step.kwargs.get("p", step.args[1] if len(step.args) > 1 else 0.5)
        training = step.kwargs.get("training", step.args[2] if len(step.args) > 2 else True)
    if training and rate > 0:
        raise UnsupportedOperationError(
            "dropout in train mode has no linear relaxation (its mask is random); call model.eval() or use IBP"
        )
    return [a]


DROPOUT = Linear(_dropout_transpose)
"""The identity in eval mode; refused in train mode."""


__all__ = ["ADD", "AVG_POOL", "BATCH_NORM", "CAT", "CONV", "DROPOUT", "GETITEM", "LINEAR", "MUL", "RELU", "RESHAPE"]
