"""Interval bound propagation (IBP) for any ``torch.fx``-traceable network.

Method card: Gowal et al. 2018, "On the Effectiveness of Interval Bound Propagation for Training
Verifiably Robust Models". An input box ``[l, u]`` is carried through the network in centre/radius
form ``(c, r) = ((u + l) / 2, (u - l) / 2)``: an affine layer maps it to ``(W c + b, |W| r)``, a
monotone activation ``f`` to the box of ``[f(c - r), f(c + r)]``. The result contains the output of
every input inside the box. One batched pass computes centre and radius (two matmuls per layer, no
per-sample loop); optionally the clean batch is carried along (batch-norm statistics in train mode).

Margins ``z_y - z_j`` are bounded with last-layer elision: the specification matrix ``C`` (rows
``e_y - e_j``) is folded into the last linear layer, ``(C W) h + C b``, which is never looser than
subtracting the output intervals because ``|C W| <= |C| |W|``.

Supported: ``Linear``, ``Conv1d``/``Conv2d`` (zero padding), ``BatchNorm1d``/``BatchNorm2d``,
``ReLU``, ``LeakyReLU``, ``Sigmoid``, ``Tanh``, ``Flatten``, ``AvgPool2d``, ``AdaptiveAvgPool2d``,
``MaxPool2d``, ``Dropout``, ``Identity``, residual ``+``/``-``, multiplication by constants,
``torch.cat``, ``view``/``reshape``/``flatten`` and their functional forms. Anything else raises
:class:`UnsupportedOperationError` naming the operation and the node where it occurs.

Batch norm: in train mode the affine map uses the statistics of the clean batch passed as
``clean`` (the auto_LiRPA / CTBench convention; without ``clean`` those of the box centres), in
eval mode the running statistics.

Distributed: pure per-sample computation on local tensors, no collectives. The engine reads full
weights, so FSDP2-sharded (DTensor) parameters are not supported.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> x = torch.rand(5, 4)
    >>> lower, upper = interval_bounds(net, x - 0.1, x + 0.1)
    >>> bool((lower <= net(x)).all() and (net(x) <= upper).all())
    True
"""

from __future__ import annotations

import math
import operator
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import fx, nn

__all__ = [
    "BoundResult",
    "BoundedNetwork",
    "Interval",
    "UnsupportedOperationError",
    "input_box",
    "interval_bounds",
    "margin_bounds",
    "margin_spec",
    "warmup_regularizers",
]


class UnsupportedOperationError(ValueError):
    """A network contains an operation the interval engine cannot bound."""


@dataclass
class Interval:
    """A batch of boxes in centre/radius form; ``clean`` is the unperturbed activation, if tracked."""

    centre: torch.Tensor
    radius: torch.Tensor
    clean: torch.Tensor | None = None

    @property
    def lower(self) -> torch.Tensor:
        return self.centre - self.radius

    @property
    def upper(self) -> torch.Tensor:
        return self.centre + self.radius


class BoundResult(NamedTuple):
    """``lower``/``upper``: bounds of the output (of ``spec @ output`` when a spec is given);
    ``clean``: the output on the clean batch (or None); ``relu``: pre-activation ``(lower, upper)``
    of every ReLU when recorded."""

    lower: torch.Tensor
    upper: torch.Tensor
    clean: torch.Tensor | None
    relu: list[tuple[torch.Tensor, torch.Tensor]]


_MONOTONE_MODULES = (nn.ReLU, nn.LeakyReLU, nn.Sigmoid, nn.Tanh, nn.MaxPool2d)
_POSITIVE_LINEAR_MODULES = (nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Flatten)
_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d, nn.Dropout, nn.Identity)
_MODULES = _MODULES + _MONOTONE_MODULES + _POSITIVE_LINEAR_MODULES

_MONOTONE_FUNCTIONS = {F.relu, torch.relu, F.leaky_relu, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.max_pool2d}
_SHAPE_FUNCTIONS = {torch.flatten, torch.reshape, F.avg_pool2d, F.adaptive_avg_pool2d}
_SHAPE_METHODS = {"view", "reshape", "flatten", "contiguous", "squeeze", "unsqueeze"}
_MONOTONE_METHODS = {"relu", "sigmoid", "tanh"}
_CENTRE_METHODS = {"size", "dim"}  # return plain values read off the centre
_ADD = {operator.add, torch.add, operator.iadd}
_SUB = {operator.sub, torch.sub}
_MUL = {operator.mul, torch.mul}
_CAT = {torch.cat, torch.concat}
_LINEAR_FUNCTIONS = {F.linear, F.conv1d, F.conv2d}


def _name(target: Any) -> str:
    return getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or str(target)


class BoundedNetwork:
    """A network traced once with ``torch.fx`` and checked for supported operations.

    Args:
        model: the network; must trace with ``torch.fx.symbolic_trace`` and map one tensor to one
            tensor.

    Raises:
        UnsupportedOperationError: naming the first operation that cannot be bounded and where it
            occurs (module path or graph node).
    """

    def __init__(self, model: nn.Module) -> None:
        try:
            graph = fx.symbolic_trace(model).graph
        except Exception as err:  # noqa: BLE001 - any tracing failure means "cannot bound"
            raise UnsupportedOperationError(
                f"cannot trace {type(model).__name__} with torch.fx ({type(err).__name__}: {err}); the interval engine "
                "needs a network without data-dependent control flow"
            ) from err
        self.model = model
        self._linearize = False
        self.nodes = list(graph.nodes)
        inputs = [n for n in self.nodes if n.op == "placeholder"]
        if len(inputs) != 1:
            raise UnsupportedOperationError(f"the network must take exactly one input, got {len(inputs)}")
        self.output = next(n for n in self.nodes if n.op == "output")
        if not isinstance(self.output.args[0], fx.Node):
            raise UnsupportedOperationError("the network must return a single tensor")
        for node in self.nodes:
            self._check(node)
        last = self.output.args[0]
        is_linear = (last.op == "call_module" and type(model.get_submodule(last.target)) is nn.Linear) or (
            last.op == "call_function" and last.target is F.linear
        )
        self.elide = last if is_linear else None

    def num_outputs(self, x: torch.Tensor) -> int:
        """Width of the network's output on inputs like ``x`` (no module is called, so batch-norm
        running statistics stay untouched)."""
        if self.elide is not None and self.elide.op == "call_module":
            return self.model.get_submodule(self.elide.target).out_features
        with torch.no_grad():
            return self(x[:2], x[:2]).lower.shape[-1]

    def _check(self, node: fx.Node) -> None:
        where = f"node {node.name!r}"
        if node.op == "call_module":
            module = self.model.get_submodule(node.target)
            if type(module) not in _MODULES:  # exact types: a subclass may change forward
                raise UnsupportedOperationError(f"unsupported operation {type(module).__name__} at module {node.target!r}")
            if isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.padding_mode != "zeros":
                raise UnsupportedOperationError(f"unsupported padding_mode={module.padding_mode!r} of Conv at module {node.target!r}")
            if isinstance(module, nn.MaxPool2d) and module.return_indices:
                raise UnsupportedOperationError(f"unsupported MaxPool2d(return_indices=True) at module {node.target!r}")
            return
        if node.op == "call_function":
            known = _MONOTONE_FUNCTIONS | _SHAPE_FUNCTIONS | _ADD | _SUB | _MUL | _CAT | _LINEAR_FUNCTIONS
            known |= {operator.neg, operator.getitem, F.dropout}
            if node.target not in known:
                raise UnsupportedOperationError(f"unsupported operation {_name(node.target)} at {where}")
        elif node.op == "call_method":
            if node.target not in _SHAPE_METHODS | _MONOTONE_METHODS | _CENTRE_METHODS:
                raise UnsupportedOperationError(f"unsupported operation Tensor.{node.target} at {where}")

    def __call__(
        self,
        lower: torch.Tensor,
        upper: torch.Tensor,
        clean: torch.Tensor | None = None,
        spec: torch.Tensor | None = None,
        record_relu: bool = False,
    ) -> BoundResult:
        """Bound the network on the boxes ``[lower, upper]`` (batched like the network's input).

        Args:
            lower, upper: input box, same shape as a network input batch.
            clean: the clean batch (inside the box): carried along to give batch-norm statistics in
                train mode and the clean output.
            spec: optional ``[B, S, K]`` matrix; the bounds are then those of ``spec @ output``,
                with the last linear layer elided when the network ends in one.
            record_relu: collect the pre-activation bounds of every ReLU (warmup regularizers,
                unstable-neuron counts).
        """
        if lower.shape != upper.shape:
            raise ValueError(f"`lower` and `upper` must have the same shape, got {tuple(lower.shape)} and {tuple(upper.shape)}")
        self._relu: list[tuple[torch.Tensor, torch.Tensor]] | None = [] if record_relu else None
        env: dict[fx.Node, Any] = {}
        result: Interval | None = None
        for node in self.nodes:
            if node.op == "placeholder":
                env[node] = Interval((upper + lower) / 2, (upper - lower) / 2, clean)
            elif node.op == "output":
                result = env[node.args[0]]
            elif node is self.elide and spec is not None:
                result = self._elided(node, env, spec)
                break
            else:
                env[node] = self._run(node, env)
        assert result is not None
        if spec is not None and self.elide is None:
            clean_out = result.clean
            result = Interval(
                torch.einsum("bsk,bk->bs", spec, result.centre),
                torch.einsum("bsk,bk->bs", spec.abs(), result.radius),
            )
            result.clean = clean_out
        return BoundResult(result.lower, result.upper, result.clean, self._relu or [])

    def _elided(self, node: fx.Node, env: dict[fx.Node, Any], spec: torch.Tensor) -> Interval:
        if node.op == "call_module":
            module = self.model.get_submodule(node.target)
            weight, bias = module.weight, module.bias
            h = env[node.args[0]]
        else:
            h, weight = env[node.args[0]], _fetch(node.args[1], env)
            bias = _fetch(node.args[2] if len(node.args) > 2 else node.kwargs.get("bias"), env)
        folded = torch.einsum("bsk,kh->bsh", spec.to(weight.dtype), weight)
        centre = torch.einsum("bsh,bh->bs", folded, h.centre)
        if bias is not None:
            centre = centre + torch.einsum("bsk,k->bs", spec.to(bias.dtype), bias)
        radius = torch.einsum("bsh,bh->bs", folded.abs(), h.radius)
        clean = F.linear(h.clean, weight, bias) if h.clean is not None else None
        return Interval(centre, radius, clean)

    # -- one node ------------------------------------------------------------------------------

    def _run(self, node: fx.Node, env: dict[fx.Node, Any]) -> Any:
        args = fx.node.map_arg(node.args, lambda n: env[n])
        kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n])
        flat = [a for a in _flatten(args) if isinstance(a, Interval)] + [a for a in _flatten(kwargs.values()) if isinstance(a, Interval)]
        if node.op == "get_attr":
            return _get_attr(self.model, node.target)
        if not flat:  # constants only: evaluate as in the network
            if node.op == "call_module":
                return self.model.get_submodule(node.target)(*args, **kwargs)
            if node.op == "call_method":
                return getattr(args[0], node.target)(*args[1:], **kwargs)
            return node.target(*args, **kwargs)
        if node.op == "call_module":
            return self._module(self.model.get_submodule(node.target), args[0])
        if node.op == "call_method":
            x = args[0]
            if node.target in _CENTRE_METHODS:
                return getattr(x.centre, node.target)(*args[1:], **kwargs)
            fn = lambda t: getattr(t, node.target)(*args[1:], **kwargs)  # noqa: E731
            if node.target in _MONOTONE_METHODS:
                return self._monotone(x, fn, relu=node.target == "relu")
            return _same(x, fn)
        return self._function(node.target, args, kwargs)

    def _module(self, m: nn.Module, x: Interval) -> Interval:
        if isinstance(m, nn.Linear):
            return _affine(x, lambda t, w, b: F.linear(t, w, b), m.weight, m.bias)
        if isinstance(m, (nn.Conv1d, nn.Conv2d)):
            conv = F.conv1d if isinstance(m, nn.Conv1d) else F.conv2d
            return _affine(x, lambda t, w, b: conv(t, w, b, m.stride, m.padding, m.dilation, m.groups), m.weight, m.bias)
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            return _batch_norm(m, x)
        if isinstance(m, _MONOTONE_MODULES):
            return self._monotone(x, m, relu=isinstance(m, nn.ReLU))
        if isinstance(m, nn.Dropout):
            return _dropout(x, m.p, m.training)
        return _same(x, m)  # Identity, Flatten, average pooling: linear with non-negative weights

    def _function(self, fn: Callable, args: tuple, kwargs: dict) -> Any:
        if fn in _MONOTONE_FUNCTIONS:
            return self._monotone(args[0], lambda t: fn(t, *args[1:], **kwargs), relu=fn in (F.relu, torch.relu))
        if fn in _SHAPE_FUNCTIONS:
            return _same(args[0], lambda t: fn(t, *args[1:], **kwargs))
        if fn is F.dropout:
            p = kwargs.get("p", args[1] if len(args) > 1 else 0.5)
            training = kwargs.get("training", args[2] if len(args) > 2 else True)
            return _dropout(args[0], p, training)
        if fn in _LINEAR_FUNCTIONS:
            x, weight, bias, *rest = (*args, None) if len(args) == 2 else args
            kwargs = dict(kwargs)
            bias = kwargs.pop("bias", bias)
            if isinstance(weight, Interval) or isinstance(bias, Interval):
                raise UnsupportedOperationError(f"{_name(fn)} with a perturbed weight is not supported")
            return _affine(x, lambda t, w, b: fn(t, w, b, *rest, **kwargs), weight, bias)
        if fn in _ADD or fn in _SUB:
            a, b = args[0], args[1]
            sign = 1.0 if fn in _ADD else -1.0
            if isinstance(a, Interval) and isinstance(b, Interval):
                clean = a.clean + sign * b.clean if a.clean is not None and b.clean is not None else None
                return Interval(a.centre + sign * b.centre, a.radius + b.radius, clean)
            if isinstance(a, Interval):
                return _shift(a, sign * b)
            return _shift(b, a) if sign > 0 else _shift(_scale(b, -1.0), a)
        if fn in _MUL:
            a, b = args[0], args[1]
            if isinstance(a, Interval) and isinstance(b, Interval):
                raise UnsupportedOperationError("multiplication of two perturbed tensors is not supported")
            return _scale(a, b) if isinstance(a, Interval) else _scale(b, a)
        if fn is operator.neg:
            return _scale(args[0], -1.0)
        if fn is operator.getitem:  # slicing: a selection, linear with 0/1 weights
            return _same(args[0], lambda t: t[args[1]])
        if fn in _CAT:
            parts, rest = args[0], args[1:]
            if not all(isinstance(p, Interval) for p in parts):
                raise UnsupportedOperationError("torch.cat of perturbed and constant tensors is not supported")
            clean = fn([p.clean for p in parts], *rest, **kwargs) if all(p.clean is not None for p in parts) else None
            return Interval(fn([p.centre for p in parts], *rest, **kwargs), fn([p.radius for p in parts], *rest, **kwargs), clean)
        raise UnsupportedOperationError(f"unsupported operation {_name(fn)} on a perturbed tensor")

    def _monotone(self, x: Interval, fn: Callable[[torch.Tensor], torch.Tensor], relu: bool = False) -> Interval:
        lower, upper = x.lower, x.upper
        if relu and self._relu is not None:
            self._relu.append((lower, upper))
        clean = fn(x.clean) if x.clean is not None else None
        if self._linearize:
            return Interval(fn(x.centre), _linearized(fn, x), clean)
        f_lower, f_upper = fn(lower), fn(upper)
        return Interval((f_upper + f_lower) / 2, (f_upper - f_lower) / 2, clean)

    def linearized_radius(self, x: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
        """Output radius of interval propagation through the network *linearised at* ``x``
        (each activation replaced by its slope at the clean input; max-pooling by the selected
        input), for the tightness metric of Mao et al. 2023. Use in eval mode."""
        self._linearize = True
        try:
            result = self(x - radius, x + radius, clean=x)
        finally:
            self._linearize = False
        return (result.upper - result.lower) / 2


def _linearized(fn: Callable[[torch.Tensor], torch.Tensor], x: Interval) -> torch.Tensor:
    """Radius through ``fn`` linearised at the clean input: ``fn'(clean) * r`` for elementwise
    activations, the radius at the selected input for max-pooling."""
    assert x.clean is not None
    if isinstance(fn, nn.MaxPool2d):
        _, idx = F.max_pool2d(x.clean, fn.kernel_size, fn.stride, fn.padding, fn.dilation, fn.ceil_mode, return_indices=True)
        return x.radius.flatten(2).gather(2, idx.flatten(2)).view_as(idx)
    with torch.enable_grad():
        point = x.clean.detach().requires_grad_(True)
        (slope,) = torch.autograd.grad(fn(point).sum(), point)
    return slope * x.radius


def _flatten(values: Any) -> list[Any]:
    out: list[Any] = []
    for v in values:
        if isinstance(v, (list, tuple)):
            out.extend(_flatten(v))
        else:
            out.append(v)
    return out


def _fetch(value: Any, env: dict[fx.Node, Any]) -> Any:
    return env[value] if isinstance(value, fx.Node) else value


def _get_attr(model: nn.Module, target: str) -> Any:
    obj: Any = model
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _same(x: Interval, fn: Callable[[torch.Tensor], torch.Tensor]) -> Interval:
    """A map that is linear with non-negative weights (reshape, average pooling): apply to all."""
    return Interval(fn(x.centre), fn(x.radius), fn(x.clean) if x.clean is not None else None)


def _affine(x: Interval, fn: Callable, weight: torch.Tensor, bias: torch.Tensor | None) -> Interval:
    radius = fn(x.radius, weight.abs(), None)
    if x.clean is None:
        return Interval(fn(x.centre, weight, bias), radius)
    # Centre and clean batch share (W, b): one call on both halves instead of two.
    centre, clean = fn(torch.cat([x.centre, x.clean]), weight, bias).chunk(2)
    return Interval(centre, radius, clean)


def _shift(x: Interval, k: Any) -> Interval:
    return Interval(x.centre + k, x.radius, x.clean + k if x.clean is not None else None)


def _scale(x: Interval, k: Any) -> Interval:
    k_abs = k.abs() if torch.is_tensor(k) else abs(k)
    return Interval(x.centre * k, x.radius * k_abs, x.clean * k if x.clean is not None else None)


def _dropout(x: Interval, p: float, training: bool) -> Interval:
    if not training or p == 0:
        return x
    mask = F.dropout(torch.ones_like(x.centre), p, True)  # one mask for centre, radius and clean
    return _scale(x, mask)


def _batch_norm(m: nn.modules.batchnorm._BatchNorm, x: Interval) -> Interval:
    dims = [0] + list(range(2, x.centre.dim()))
    shape = [1, -1] + [1] * (x.centre.dim() - 2)
    batch_stats = m.training or m.running_mean is None
    if batch_stats:
        ref = x.clean if x.clean is not None else x.centre
        var, mean = torch.var_mean(ref, dims, unbiased=False)  # one pass over the batch
    else:
        mean, var = m.running_mean, m.running_var
    scale = torch.rsqrt(var + m.eps)
    if m.weight is not None:
        scale = scale * m.weight
    shift = -mean * scale
    if m.bias is not None:
        shift = shift + m.bias
    scale_v, shift_v = scale.view(shape), shift.view(shape)
    clean = None
    if x.clean is not None:
        # The clean batch through the same affine map (its own statistics in train mode: what
        # the module computes), and the running statistics updated once per step as the module
        # would, without computing the batch statistics a second time.
        clean = torch.addcmul(shift_v, x.clean, scale_v)
        if batch_stats and m.training:
            _update_running_stats(m, mean, var, x.clean.numel() // x.clean.shape[1])
    return Interval(torch.addcmul(shift_v, x.centre, scale_v), x.radius * scale.abs().view(shape), clean)


@torch.no_grad()
def _update_running_stats(m: nn.modules.batchnorm._BatchNorm, mean: torch.Tensor, var: torch.Tensor, n: int) -> None:
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


_CACHE: weakref.WeakKeyDictionary[nn.Module, BoundedNetwork] = weakref.WeakKeyDictionary()


def bounded(model: nn.Module) -> BoundedNetwork:
    """The (cached) :class:`BoundedNetwork` of ``model``."""
    engine = _CACHE.get(model)
    if engine is None:
        engine = _CACHE[model] = BoundedNetwork(model)
    return engine


def interval_bounds(model: nn.Module, lower: torch.Tensor, upper: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Interval bounds of ``model``'s output over the input box ``[lower, upper]``.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2))
        >>> lo, up = interval_bounds(net, torch.zeros(1, 2), torch.zeros(1, 2))
        >>> torch.equal(lo, up)
        True
    """
    result = bounded(model)(lower, upper)
    return result.lower, result.upper


def _channel_view(values: Sequence[float] | float, x: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=x.dtype, device=x.device).flatten()
    if t.numel() == 1:
        return t.reshape([1] * x.dim())
    return t.view([1, -1] + [1] * (x.dim() - 2))


def input_box(
    x: torch.Tensor,
    eps: float,
    mean: Sequence[float] = (0.0,),
    std: Sequence[float] = (1.0,),
    pixel_range: tuple[float, float] = (-math.inf, math.inf),
) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalised box of an L-inf ball of radius ``eps`` in *pixel* space.

    ``x`` is normalised (``(pixel - mean) / std``); the ball around its pixels is clamped to
    ``pixel_range`` and mapped back through ``mean``/``std`` (per channel, or one value).
    """
    if eps < 0:
        raise ValueError(f"`eps` must be >= 0, got {eps}")
    mean_t, std_t = _channel_view(mean, x), _channel_view(std, x)
    pixels = x * std_t + mean_t
    low = (pixels - eps).clamp(min=pixel_range[0])
    high = (pixels + eps).clamp(max=pixel_range[1])
    return (low - mean_t) / std_t, (high - mean_t) / std_t


def margin_spec(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``[B, K, K]`` specification with rows ``e_y - e_j`` (the row ``j = y`` is zero)."""
    eye = torch.eye(num_classes, device=y.device)
    return eye[y].unsqueeze(1) - eye.unsqueeze(0)


def margin_bounds(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    mean: Sequence[float] = (0.0,),
    std: Sequence[float] = (1.0,),
    pixel_range: tuple[float, float] = (-math.inf, math.inf),
    num_classes: int | None = None,
) -> torch.Tensor:
    """Lower bounds ``[B, K]`` of ``z_y - z_j`` over the pixel-space ``eps`` ball around ``x``
    (entry ``y`` is 0), with the last linear layer elided. A sample is verified when every other
    entry is > 0. ``num_classes`` defaults to the width of ``model``'s output.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 3))
        >>> margin_bounds(net, torch.rand(2, 4), torch.tensor([0, 2]), eps=0.0).shape
        torch.Size([2, 3])
    """
    engine = bounded(model)
    if num_classes is None:
        num_classes = engine.num_outputs(x)
    lower, upper = input_box(x, eps, mean, std, pixel_range)
    return engine(lower, upper, clean=x, spec=margin_spec(y, num_classes)).lower


def warmup_regularizers(
    relu_bounds: Sequence[tuple[torch.Tensor, torch.Tensor]], input_radius: torch.Tensor, tolerance: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two warmup regularizers of Shi et al. 2021 (Sec. 4.2), averaged over ReLU layers.

    * tightness: ``relu(tau - mean(r_0) / mean(r_i)) / tau`` penalises layers whose mean bound
      radius ``r_i`` grew more than ``1 / tau`` times the input radius ``r_0``;
    * ReLU balance: ``(relu(tau - rho_mean) + relu(tau - rho_var)) / tau`` where ``rho`` are the
      ratios (folded into [0, 1] by ``min(rho, 1/rho)``) of the mean and the spread of the box
      centres of active (``l > 0``) vs inactive (``u < 0``) neurons; undefined layers count 0.

    Args:
        relu_bounds: pre-activation ``(lower, upper)`` of each ReLU.
        input_radius: radius of the input box (any shape).
        tolerance: ``tau`` in (0, 1].
    """
    zero = input_radius.new_zeros(())
    if not relu_bounds:
        return zero, zero
    r0 = input_radius.mean()
    tight, balance = zero, zero
    for lower, upper in relu_bounds:
        centre, radius = (upper + lower) / 2, (upper - lower) / 2
        tight = tight + F.relu(tolerance - r0 / radius.mean().clamp(min=1e-12)) / tolerance
        active, inactive = (lower > 0).to(centre.dtype), (upper < 0).to(centre.dtype)
        spread = (centre - centre.mean()) ** 2
        # Denominators are clamped (not masked after the fact) so that an empty group gives a
        # zero term with a finite gradient.
        mean_ratio = (centre * active).mean() / (-(centre * inactive).mean()).clamp(min=1e-12)
        var_ratio = (spread * active).sum() / (spread * inactive).sum().clamp(min=1e-12)
        mean_ratio = torch.minimum(mean_ratio, 1 / mean_ratio.clamp(min=1e-12))
        var_ratio = torch.minimum(var_ratio, 1 / var_ratio.clamp(min=1e-12))
        term = (F.relu(tolerance - mean_ratio) + F.relu(tolerance - var_ratio)) / tolerance
        both = (active.sum() > 0) & (inactive.sum() > 0)
        balance = balance + torch.where(both, term, zero)
    n = len(relu_bounds)
    return tight / n, balance / n
