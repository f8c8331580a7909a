"""The operator table: every operation the engine can bound, one :class:`Op` entry each.

An entry is keyed by what a traced graph calls: a module type (``nn.Linear``) for
``call_module`` nodes, the function (``F.relu``, ``operator.add``) for ``call_function`` nodes,
``"Tensor.<name>"`` for ``call_method`` nodes. Module types match exactly: a subclass may change
``forward``. Every entry's functions take the same arguments: the :class:`~.interval.Pass` of the
current computation, the target (the module instance, the function, or the method name), and the
node's ``args``/``kwargs`` with :class:`~.interval.Interval` in place of perturbed tensors (for
modules, ``args == (x,)``). A node whose arguments are all constants never reaches the table's
rules: the engine evaluates it as the network would.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..plumbing import is_sharded
from ..plumbing.third_party_private import BatchNorm
from .fused import IntervalBatchNorm, IntervalLinear, IntervalReLU, cached_abs, can_fuse, relu_box
from .interval import Interval, Pass, UnsupportedOperationError, name_of, where
from .relaxation import (
    ADD,
    AVG_POOL,
    BATCH_NORM,
    CAT,
    CONV,
    DROPOUT,
    GETITEM,
    LINEAR,
    MUL,
    RELU,
    RESHAPE,
    Linear,
    batch_norm_affine,
    batch_norm_statistics,
)

Rule = Callable[[Pass, Any, tuple, dict], Any]
Check = Callable[[Any, fx.Node, "set[fx.Node]"], None]


class Op(NamedTuple):
    """One operator.

    Attributes:
        rule: the interval rule: maps the input box(es) to the output box (plain torch
            operations, differentiated by autograd).
        check: run once when a network is traced, with the target, the node and the set of
            perturbed nodes (those depending on the network input; for modules, checked on every
            call, an empty set); raises :class:`UnsupportedOperationError` naming the node for
            arguments the rule cannot bound.
        fused: the same rule through a hand-written autograd function (:mod:`.fused`), used when
            the engine runs fused; returns None where it does not apply (the engine then runs
            ``rule``). Its values and gradients must equal ``rule``'s.
        linear: the linear relaxation for backward bounds (CROWN, :mod:`.relaxation`); None:
            the operator is bounded by intervals only and :func:`~.crown.crown_bounds` refuses it.
    """

    rule: Rule
    check: Check | None = None
    fused: Rule | None = None
    linear: Linear | None = None


# -- shared interval maps -----------------------------------------------------------------------


def affine(x: Interval, fn: Callable, weight: torch.Tensor, bias: torch.Tensor | None) -> Interval:
    """``(W c + b, |W| r)``; centre and clean batch share one call. Without gradients, ``|W|`` is
    kept per weight and recomputed only when the weight changes (:func:`~.fused.cached_abs`)."""
    return Interval(fn(x.stack, weight, bias), fn(x.radius, abs_of(weight), None), x.tracked)


def abs_of(weight: torch.Tensor) -> torch.Tensor:
    """``|weight|``: the cached copy where no gradient can flow through it (gradients off), a
    contiguous plain tensor (no DTensor), else ``weight.abs()`` (differentiable)."""
    if torch.is_grad_enabled() or not weight.is_contiguous() or is_sharded(weight):
        return weight.abs()
    return cached_abs(weight)


def same(x: Interval, fn: Callable[[torch.Tensor], torch.Tensor], per_sample: bool = False) -> Interval:
    """A map that is linear with non-negative weights (reshape, average pooling): apply to all.
    ``per_sample``: ``fn`` maps each sample on its own (a module such as ``Flatten`` or pooling),
    so it can run on the stacked centre and clean batch at once."""
    return Interval(fn(x.stack) if per_sample else x.pairs(fn), fn(x.radius), x.tracked)


def shift(x: Interval, k: Any) -> Interval:
    return Interval(x.broadcast(lambda t: t + k), x.radius, x.tracked)


def scale(x: Interval, k: Any) -> Interval:
    k_abs = k.abs() if torch.is_tensor(k) else abs(k)
    return Interval(x.broadcast(lambda t: t * k), x.radius * k_abs, x.tracked)


def monotone(p: Pass, x: Interval, fn: Callable[[torch.Tensor], torch.Tensor], relu: bool = False) -> Interval:
    """The box of ``[fn(l), fn(u)]`` for a monotone ``fn`` (linearised at the clean input when
    ``p.linearize``); ``relu``: record the pre-activation bounds in ``p.relu``."""
    lower, upper = x.lower, x.upper
    if relu and p.relu is not None:
        p.relu.append((lower, upper))
    clean = fn(x.clean) if x.clean is not None else None
    if p.linearize:
        return Interval.of(fn(x.centre), linearized(fn, x), clean)
    f_lower, f_upper = fn(lower), fn(upper)
    return Interval.of((f_upper + f_lower) / 2, (f_upper - f_lower) / 2, clean)


def linearized(fn: Callable[[torch.Tensor], torch.Tensor], x: Interval) -> torch.Tensor:
    """Radius through ``fn`` linearised at the clean input: ``fn'(clean) * r`` for elementwise
    activations, the radius at the selected input for max-pooling."""
    assert x.clean is not None
    if isinstance(fn, nn.MaxPool2d):
        _, idx = F.max_pool2d(
            x.clean, fn.kernel_size, fn.stride, fn.padding, fn.dilation, fn.ceil_mode, return_indices=True
        )
        return x.radius.flatten(2).gather(2, idx.flatten(2)).view_as(idx)
    with torch.enable_grad():
        point = x.clean.detach().requires_grad_(True)
        (slope,) = torch.autograd.grad(fn(point).sum(), point)
    return slope * x.radius


def dropout(x: Interval, p: float, training: bool) -> Interval:
    if not training or p == 0:
        return x
    mask = F.dropout(torch.ones_like(x.centre), p, True)  # one mask for centre, radius and clean
    return scale(x, mask)


def _hit(a: Any, perturbed: set[fx.Node]) -> bool:
    return isinstance(a, fx.Node) and a in perturbed


def _shown(fn: Any, node: fx.Node) -> str:
    """``node 'mul' (mul(relu, relu))``: the node and its call, for error messages."""
    args = [a.name if isinstance(a, fx.Node) else repr(a) for a in node.args if not isinstance(a, (list, tuple))]
    return f"node {node.name!r} ({name_of(fn)}({', '.join(args)}))" if args else f"node {node.name!r}"


# -- modules ------------------------------------------------------------------------------------


def _linear_module(p: Pass, m: nn.Linear, args: tuple, kwargs: dict) -> Interval:
    return affine(args[0], F.linear, m.weight, m.bias)


def _linear_fused(x: Interval, weight: torch.Tensor, bias: torch.Tensor | None) -> Interval | None:
    if not can_fuse(x.stack, weight):
        return None
    stack, radius = IntervalLinear.apply(x.stack, x.radius, weight, bias)
    return Interval(stack, radius, x.tracked)


def _conv_module(p: Pass, m: nn.Conv1d | nn.Conv2d, args: tuple, kwargs: dict) -> Interval:
    conv = F.conv1d if isinstance(m, nn.Conv1d) else F.conv2d
    return affine(args[0], lambda t, w, b: conv(t, w, b, m.stride, m.padding, m.dilation, m.groups), m.weight, m.bias)


def _check_conv(m: nn.Conv1d | nn.Conv2d, node: fx.Node, perturbed: set[fx.Node]) -> None:
    if m.padding_mode != "zeros":
        raise UnsupportedOperationError(f"unsupported padding_mode={m.padding_mode!r} of Conv at {where(node)}")


def _batch_norm(p: Pass, m: BatchNorm, args: tuple, kwargs: dict) -> Interval:
    x: Interval = args[0]
    batch_stats = m.training or m.running_mean is None
    shape = [1, -1] + [1] * (x.stack.dim() - 2)
    mean, var = batch_norm_statistics(m, x)
    factor, offset = batch_norm_affine(m, x, (mean, var))
    if p.owned and not torch.is_grad_enabled() and factor.dtype == x.stack.dtype == x.radius.dtype:
        # In place, no new activation-sized tensors. Two passes (x f, then + offset) are several
        # times faster than addcmul's broadcasting kernel on CPU; they round x f before the sum,
        # which addcmul fuses: at most an ulp apart.
        stack = x.stack.mul_(factor.view(shape)).add_(offset.view(shape))
        radius = x.radius.mul_(factor.abs().view(shape))
    else:
        stack = torch.addcmul(offset.view(shape), x.stack, factor.view(shape))
        radius = x.radius * factor.abs().view(shape)
    out = Interval(stack, radius, x.tracked)
    return _after_batch_norm(m, x, out, mean, var, batch_stats)


def _batch_norm_fused(p: Pass, m: BatchNorm, args: tuple, kwargs: dict) -> Interval | None:
    x: Interval = args[0]
    batch_stats = m.training or m.running_mean is None
    if not (batch_stats and can_fuse(x.stack, m.weight)):
        return None
    stack, radius, mean, var = IntervalBatchNorm.apply(x.stack, x.radius, m.weight, m.bias, m.eps, x.tracked)
    return _after_batch_norm(m, x, Interval(stack, radius, x.tracked), mean, var, batch_stats)


def _after_batch_norm(
    m: BatchNorm, x: Interval, out: Interval, mean: torch.Tensor, var: torch.Tensor, batch: bool
) -> Interval:
    # The clean batch goes through the same affine map (its own statistics in train mode: what the
    # module computes), and the running statistics are updated once per step as the module would,
    # without computing the batch statistics a second time.
    if x.tracked and batch and m.training:
        _update_running_stats(m, mean, var, x.clean.numel() // x.clean.shape[1])
    return out


@torch.no_grad()
def _update_running_stats(m: BatchNorm, mean: torch.Tensor, var: torch.Tensor, n: int) -> None:
    """What ``m.forward`` does to the running statistics in train mode (unbiased running variance,
    cumulative average when ``momentum`` is None)."""
    if not m.track_running_stats:
        return
    factor = 0.0 if m.momentum is None else m.momentum
    if m.num_batches_tracked is not None:
        m.num_batches_tracked.add_(1)
        if m.momentum is None:
            factor = 1.0 / float(m.num_batches_tracked)
    if m.running_mean is None:
        return
    m.running_mean.mul_(1 - factor).add_(mean.detach(), alpha=factor)
    m.running_var.mul_(1 - factor).add_(var.detach() * (n / max(n - 1, 1)), alpha=factor)


def _relu_fused(p: Pass, x: Interval) -> Interval | None:
    if p.linearize:
        return None
    if p.relu is None and not torch.is_grad_enabled():
        inplace = p.owned and x.stack.dtype == x.radius.dtype
        return Interval(*relu_box(x.stack, x.radius, x.tracked, inplace), x.tracked)
    stack, radius, lower, upper = IntervalReLU.apply(x.stack, x.radius, x.tracked)
    if p.relu is not None:
        p.relu.append((lower, upper))
    return Interval(stack, radius, x.tracked)


def monotone_module(p: Pass, m: nn.Module, args: tuple, kwargs: dict) -> Interval:
    return monotone(p, args[0], m, relu=isinstance(m, nn.ReLU))


def _check_max_pool(m: nn.MaxPool2d, node: fx.Node, perturbed: set[fx.Node]) -> None:
    if m.return_indices:
        raise UnsupportedOperationError(f"unsupported MaxPool2d(return_indices=True) at {where(node)}")


def positive_linear_module(p: Pass, m: nn.Module, args: tuple, kwargs: dict) -> Interval:
    # linear with non-negative weights, sample by sample (except a Flatten over the batch)
    return same(args[0], m, per_sample=not (isinstance(m, nn.Flatten) and m.start_dim == 0))


def _dropout_module(p: Pass, m: nn.Dropout, args: tuple, kwargs: dict) -> Interval:
    return dropout(args[0], m.p, m.training)


# -- functions and methods ----------------------------------------------------------------------


def monotone_function(p: Pass, fn: Callable, args: tuple, kwargs: dict) -> Interval:
    return monotone(p, args[0], lambda t: fn(t, *args[1:], **kwargs), relu=fn in (F.relu, torch.relu))


def shape_function(p: Pass, fn: Callable, args: tuple, kwargs: dict) -> Interval:
    return same(args[0], lambda t: fn(t, *args[1:], **kwargs))


def _dropout_function(p: Pass, fn: Callable, args: tuple, kwargs: dict) -> Interval:
    rate = kwargs.get("p", args[1] if len(args) > 1 else 0.5)
    training = kwargs.get("training", args[2] if len(args) > 2 else True)
    return dropout(args[0], rate, training)


def _linear_args(args: tuple, kwargs: dict) -> tuple[Interval, torch.Tensor, torch.Tensor | None, list, dict]:
    x, weight, bias, *rest = (*args, None) if len(args) == 2 else args
    kwargs = dict(kwargs)
    bias = kwargs.pop("bias", bias)
    return x, weight, bias, rest, kwargs


def _linear_function(p: Pass, fn: Callable, args: tuple, kwargs: dict) -> Interval:
    x, weight, bias, rest, kwargs = _linear_args(args, kwargs)
    return affine(x, lambda t, w, b: fn(t, w, b, *rest, **kwargs), weight, bias)


def _f_linear_fused(p: Pass, fn: Callable, args: tuple, kwargs: dict) -> Interval | None:
    x, weight, bias, rest, kwargs = _linear_args(args, kwargs)
    return None if rest or kwargs else _linear_fused(x, weight, bias)


def _check_linear_function(fn: Callable, node: fx.Node, perturbed: set[fx.Node]) -> None:
    weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    if _hit(weight, perturbed) or _hit(bias, perturbed):
        raise UnsupportedOperationError(
            f"unsupported operation {name_of(fn)} with a perturbed weight or bias at {_shown(fn, node)}"
        )


def _add_or_sub(p: Pass, fn: Callable, args: tuple, kwargs: dict) -> Interval:
    a, b = args[0], args[1]
    add = fn in (operator.add, torch.add, operator.iadd)
    if isinstance(a, Interval) and isinstance(b, Interval):
        if a.tracked != b.tracked:
            a, b = Interval.of(a.centre, a.radius), Interval.of(b.centre, b.radius)
        return Interval(a.stack + b.stack if add else a.stack - b.stack, a.radius + b.radius, a.tracked)
    if isinstance(a, Interval):
        return shift(a, b if add else -b)
    return shift(b, a) if add else shift(scale(b, -1.0), a)


def _check_add_or_sub(fn: Callable, node: fx.Node, perturbed: set[fx.Node]) -> None:
    if node.kwargs.get("alpha", 1) != 1:
        raise UnsupportedOperationError(
            f"unsupported argument alpha of {name_of(fn)} at {_shown(fn, node)}: write `a + alpha * b`"
        )


def _mul(p: Pass, fn: Callable, args: tuple, kwargs: dict) -> Interval:
    a, b = args[0], args[1]
    return scale(a, b) if isinstance(a, Interval) else scale(b, a)


def _check_mul(fn: Callable, node: fx.Node, perturbed: set[fx.Node]) -> None:
    if len(node.args) >= 2 and _hit(node.args[0], perturbed) and _hit(node.args[1], perturbed):
        raise UnsupportedOperationError(
            f"unsupported operation {name_of(fn)} of two perturbed tensors (a product of activations) at "
            f"{_shown(fn, node)}"
        )


def _neg(p: Pass, fn: Callable, args: tuple, kwargs: dict) -> Interval:
    return scale(args[0], -1.0)


def _getitem(p: Pass, fn: Callable, args: tuple, kwargs: dict) -> Interval:
    return same(args[0], lambda t: t[args[1]])  # slicing: a selection, linear with 0/1 weights


def _cat(p: Pass, fn: Callable, args: tuple, kwargs: dict) -> Interval:
    parts, rest = args[0], args[1:]
    clean = fn([q.clean for q in parts], *rest, **kwargs) if all(q.tracked for q in parts) else None
    centre = fn([q.centre for q in parts], *rest, **kwargs)
    return Interval.of(centre, fn([q.radius for q in parts], *rest, **kwargs), clean)


def _check_cat(fn: Callable, node: fx.Node, perturbed: set[fx.Node]) -> None:
    parts = node.args[0] if node.args else node.kwargs.get("tensors", ())
    hits = [_hit(q, perturbed) for q in parts]
    if any(hits) and not all(hits):
        raise UnsupportedOperationError(
            f"unsupported operation {name_of(fn)} of perturbed and constant tensors at {_shown(fn, node)}"
        )


def monotone_method(p: Pass, name: str, args: tuple, kwargs: dict) -> Interval:
    return monotone(p, args[0], lambda t: getattr(t, name)(*args[1:], **kwargs), relu=name == "relu")


def shape_method(p: Pass, name: str, args: tuple, kwargs: dict) -> Interval:
    # ``view`` as ``reshape``: the same values, and boxes may be laid out channels-last
    # (:meth:`~.interval.Interval.input`), where the network's own tensors allow a view
    method = "reshape" if name == "view" else name
    return same(args[0], lambda t: getattr(t, method)(*args[1:], **kwargs))


def _centre_method(p: Pass, name: str, args: tuple, kwargs: dict) -> Any:
    return getattr(args[0].centre, name)(*args[1:], **kwargs)  # a plain value read off the centre


def _centre_attribute(p: Pass, fn: Callable, args: tuple, kwargs: dict) -> Any:
    return getattr(args[0].centre, args[1])  # x.shape, x.dtype, ...: a plain value read off the centre


def _check_attribute(fn: Callable, node: fx.Node, perturbed: set[fx.Node]) -> None:
    if node.args[1] not in CENTRE_ATTRIBUTES:
        raise UnsupportedOperationError(
            f"unsupported attribute {node.args[1]!r} of a perturbed tensor at {_shown(fn, node)}"
        )


def _relu_module_fused(p: Pass, m: nn.Module, args: tuple, kwargs: dict) -> Interval | None:
    return _relu_fused(p, args[0])


def _relu_call_fused(p: Pass, target: Any, args: tuple, kwargs: dict) -> Interval | None:
    return _relu_fused(p, args[0])


def _linear_module_fused(p: Pass, m: nn.Linear, args: tuple, kwargs: dict) -> Interval | None:
    return _linear_fused(args[0], m.weight, m.bias)


# -- the table ----------------------------------------------------------------------------------

_MONOTONE = Op(monotone_module)
_RESHAPE = Op(positive_linear_module, linear=RESHAPE)
_AVG_POOL = Op(positive_linear_module, linear=AVG_POOL)
_MONOTONE_FUNCTION = Op(monotone_function)
_SHAPE_FUNCTION = Op(shape_function, linear=RESHAPE)
_AVG_POOL_FUNCTION = Op(shape_function, linear=AVG_POOL)
_ADD_OR_SUB = Op(_add_or_sub, check=_check_add_or_sub, linear=ADD)
_MUL = Op(_mul, check=_check_mul, linear=MUL)
_CAT = Op(_cat, check=_check_cat, linear=CAT)
_LINEAR_FUNCTION = Op(_linear_function, check=_check_linear_function)
_SHAPE_METHOD = Op(shape_method, linear=RESHAPE)

OPERATORS: dict[Any, Op] = {
    # modules (exact types)
    nn.Linear: Op(_linear_module, fused=_linear_module_fused, linear=LINEAR),
    nn.Conv1d: Op(_conv_module, check=_check_conv, linear=CONV),
    nn.Conv2d: Op(_conv_module, check=_check_conv, linear=CONV),
    nn.BatchNorm1d: Op(_batch_norm, fused=_batch_norm_fused, linear=BATCH_NORM),
    nn.BatchNorm2d: Op(_batch_norm, fused=_batch_norm_fused, linear=BATCH_NORM),
    nn.ReLU: Op(monotone_module, fused=_relu_module_fused, linear=RELU),
    nn.LeakyReLU: _MONOTONE,
    nn.Sigmoid: _MONOTONE,
    nn.Tanh: _MONOTONE,
    nn.MaxPool2d: Op(monotone_module, check=_check_max_pool),
    nn.AvgPool2d: _AVG_POOL,
    nn.AdaptiveAvgPool2d: _AVG_POOL,
    nn.Flatten: _RESHAPE,
    nn.Identity: _RESHAPE,
    nn.Dropout: Op(_dropout_module, linear=DROPOUT),
    # functions
    F.relu: Op(monotone_function, fused=_relu_call_fused, linear=RELU),
    torch.relu: Op(monotone_function, fused=_relu_call_fused, linear=RELU),
    F.leaky_relu: _MONOTONE_FUNCTION,
    torch.sigmoid: _MONOTONE_FUNCTION,
    F.sigmoid: _MONOTONE_FUNCTION,
    torch.tanh: _MONOTONE_FUNCTION,
    F.tanh: _MONOTONE_FUNCTION,
    F.max_pool2d: _MONOTONE_FUNCTION,
    torch.flatten: _SHAPE_FUNCTION,
    torch.reshape: _SHAPE_FUNCTION,
    F.avg_pool2d: _AVG_POOL_FUNCTION,
    F.adaptive_avg_pool2d: _AVG_POOL_FUNCTION,
    F.dropout: Op(_dropout_function, linear=DROPOUT),
    F.linear: Op(_linear_function, check=_check_linear_function, fused=_f_linear_fused, linear=LINEAR),
    F.conv1d: _LINEAR_FUNCTION,
    F.conv2d: _LINEAR_FUNCTION,
    operator.add: _ADD_OR_SUB,
    operator.iadd: _ADD_OR_SUB,
    torch.add: _ADD_OR_SUB,
    operator.sub: _ADD_OR_SUB,
    torch.sub: _ADD_OR_SUB,
    operator.mul: _MUL,
    torch.mul: _MUL,
    operator.neg: Op(_neg, linear=ADD),
    operator.getitem: Op(_getitem, linear=GETITEM),
    torch.cat: _CAT,
    torch.concat: _CAT,
    # tensor methods
    "Tensor.relu": Op(monotone_method, fused=_relu_call_fused, linear=RELU),
    "Tensor.sigmoid": Op(monotone_method),
    "Tensor.tanh": Op(monotone_method),
    **{f"Tensor.{name}": _SHAPE_METHOD for name in ("view", "reshape", "flatten", "contiguous", "squeeze")},
    "Tensor.unsqueeze": _SHAPE_METHOD,
    "Tensor.size": Op(_centre_method),
    getattr: Op(_centre_attribute, check=_check_attribute),
    "Tensor.dim": Op(_centre_method),
}
"""The operator table (see the module docstring for keys and signatures)."""

CENTRE_METHODS = frozenset({"size", "dim"})
"""Methods whose result is a plain value read off the centre, not a perturbed tensor."""
CENTRE_ATTRIBUTES = frozenset({"shape", "ndim", "dtype", "device"})
"""Attributes read the same way (``getattr`` nodes)."""


def reads_centre(node: fx.Node) -> bool:
    """A node reading a plain value off a tensor (``x.size(0)``, ``x.shape``): not perturbed, and
    evaluated on the box centre."""
    if node.op == "call_method":
        return node.target in CENTRE_METHODS
    return node.op == "call_function" and node.target is getattr and node.args[1] in CENTRE_ATTRIBUTES


def lookup(node: fx.Node, model: nn.Module) -> tuple[Any, Op]:
    """The target of a ``call_*`` node (module instance, function or method name) and its entry.

    Raises:
        UnsupportedOperationError: the operation has no entry; names it and where it occurs.
    """
    if node.op == "call_module":
        target = model.get_submodule(node.target)
        op = OPERATORS.get(type(target))
        shown = type(target).__name__
    elif node.op == "call_method":
        target, op, shown = node.target, OPERATORS.get(f"Tensor.{node.target}"), f"Tensor.{node.target}"
    else:
        target, shown = node.target, name_of(node.target)
        try:
            op = OPERATORS.get(target)
        except TypeError:  # an unhashable target
            op = None
    if op is None:
        raise UnsupportedOperationError(f"unsupported operation {shown} at {where(node)}")
    return target, op
