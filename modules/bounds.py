"""Interval bound propagation (IBP) for any ``torch.fx``-traceable network.

Method card: Gowal et al. 2018, "On the Effectiveness of Interval Bound Propagation for Training
Verifiably Robust Models". An input box ``[l, u]`` is carried through the network in centre/radius
form ``(c, r) = ((u + l) / 2, (u - l) / 2)``: an affine layer maps it to ``(W c + b, |W| r)``, a
monotone activation ``f`` to the box of ``[f(c - r), f(c + r)]``. The result contains the output of
every input inside the box. One batched pass computes centre and radius (two matmuls per layer, no
per-sample loop); optionally the clean batch is carried along (batch-norm statistics in train mode),
stacked with the centres in one tensor so that each affine layer runs once on both. With gradients
on, ``Linear``, ``ReLU`` and train-mode batch norm run fused autograd functions (hand-written
backward passes, checked against plain autograd in the tests) that avoid the weight-sized and
activation-sized temporaries autograd would create.

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


class Interval:
    """A batch of boxes in centre/radius form, and optionally the clean (unperturbed) batch.

    Centre and clean batch are stored stacked along the batch dimension, ``stack = [centre;
    clean]``, so that every affine layer and batch norm runs once on both without a copy.
    """

    __slots__ = ("stack", "radius", "tracked")

    def __init__(self, stack: torch.Tensor, radius: torch.Tensor, tracked: bool = False) -> None:
        self.stack, self.radius, self.tracked = stack, radius, tracked

    @classmethod
    def of(cls, centre: torch.Tensor, radius: torch.Tensor, clean: torch.Tensor | None = None) -> Interval:
        return cls(centre if clean is None else torch.cat([centre, clean]), radius, clean is not None)

    @property
    def centre(self) -> torch.Tensor:
        return self.stack[: self.radius.shape[0]] if self.tracked else self.stack

    @property
    def clean(self) -> torch.Tensor | None:
        return self.stack[self.radius.shape[0] :] if self.tracked else None

    @property
    def lower(self) -> torch.Tensor:
        return self.centre - self.radius

    @property
    def upper(self) -> torch.Tensor:
        return self.centre + self.radius

    def pairs(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``fn`` of centre and clean batch, applied to each separately and stacked again (for
        maps that may mix the batch dimension, e.g. ``view(n, -1)`` with ``n`` read off the centre)."""
        return torch.cat([fn(self.centre), fn(self.clean)]) if self.tracked else fn(self.stack)

    def broadcast(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``fn`` (elementwise with a constant that may carry the batch dimension) of centre and
        clean batch in one call: the stack is viewed as ``[2, n, ...]``."""
        if not self.tracked:
            return fn(self.stack)
        return fn(self.stack.unflatten(0, (2, self.radius.shape[0]))).flatten(0, 1)


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
            tensor. Held by weak reference: keep the network alive while bounding it.

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
        # A weak reference: the engine is cached per model (``bounded``) and must not keep it alive.
        self._model = weakref.ref(model)
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
        self._check_perturbed()
        last = self.output.args[0]
        is_linear = (last.op == "call_module" and type(model.get_submodule(last.target)) is nn.Linear) or (
            last.op == "call_function" and last.target is F.linear
        )
        self.elide = last if is_linear else None

    @property
    def model(self) -> nn.Module:
        """The traced network (held by weak reference; the caller keeps it alive)."""
        model = self._model()
        if model is None:
            raise ReferenceError("the network of this BoundedNetwork was garbage-collected; build a new one")
        return model

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

    def _check_perturbed(self) -> None:
        """Refuse, before any bound is computed, the supported operations whose arguments make them
        unboundable: a product of two perturbed tensors (e.g. ``h * h``, a product of activations),
        a linear map whose weight or bias is perturbed, ``torch.cat`` of perturbed and constant
        tensors. A node is perturbed when it depends on the network input."""
        perturbed: set[fx.Node] = set()
        for node in self.nodes:
            if node.op == "placeholder":
                perturbed.add(node)
                continue
            if node.op in ("get_attr", "output") or (node.op == "call_method" and node.target in _CENTRE_METHODS):
                continue  # constants, or plain values read off the centre (sizes)
            if not any(n in perturbed for n in node.all_input_nodes):
                continue  # evaluated as in the network
            perturbed.add(node)
            if node.op != "call_function":
                continue
            fn, args, kwargs = node.target, node.args, node.kwargs
            shown = ", ".join(a.name if isinstance(a, fx.Node) else repr(a) for a in args if not isinstance(a, (list, tuple)))
            where = f"node {node.name!r} ({_name(fn)}({shown}))" if shown else f"node {node.name!r}"

            def hit(a: Any) -> bool:
                return isinstance(a, fx.Node) and a in perturbed

            if fn in _MUL and len(args) >= 2 and hit(args[0]) and hit(args[1]):
                raise UnsupportedOperationError(
                    f"unsupported operation {_name(fn)} of two perturbed tensors (a product of activations) at {where}"
                )
            if fn in _LINEAR_FUNCTIONS:
                weight = args[1] if len(args) > 1 else kwargs.get("weight")
                bias = args[2] if len(args) > 2 else kwargs.get("bias")
                if hit(weight) or hit(bias):
                    raise UnsupportedOperationError(f"unsupported operation {_name(fn)} with a perturbed weight or bias at {where}")
            if fn in _CAT:
                parts = args[0] if args else kwargs.get("tensors", ())
                if not all(hit(p) for p in parts):
                    raise UnsupportedOperationError(f"unsupported operation {_name(fn)} of perturbed and constant tensors at {where}")

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
                env[node] = Interval.of((upper + lower) / 2, (upper - lower) / 2, clean)
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
            centre = torch.einsum("bsk,bk->bs", spec, result.centre)
            radius = torch.einsum("bsk,bk->bs", spec.abs(), result.radius)
            return BoundResult(centre - radius, centre + radius, clean_out, self._relu or [])
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
        clean = F.linear(h.clean, weight, bias) if h.tracked else None
        return Interval.of(centre, radius, clean)

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
            return _affine(x, F.linear, m.weight, m.bias, linear=True)
        if isinstance(m, (nn.Conv1d, nn.Conv2d)):
            conv = F.conv1d if isinstance(m, nn.Conv1d) else F.conv2d
            return _affine(x, lambda t, w, b: conv(t, w, b, m.stride, m.padding, m.dilation, m.groups), m.weight, m.bias)
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            return _batch_norm(m, x)
        if isinstance(m, _MONOTONE_MODULES):
            return self._monotone(x, m, relu=isinstance(m, nn.ReLU))
        if isinstance(m, nn.Dropout):
            return _dropout(x, m.p, m.training)
        # Identity, Flatten, average pooling: linear with non-negative weights, sample by sample
        return _same(x, m, per_sample=not (isinstance(m, nn.Flatten) and m.start_dim == 0))

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
            plain = fn is F.linear and not rest and not kwargs
            return _affine(x, lambda t, w, b: fn(t, w, b, *rest, **kwargs), weight, bias, linear=plain)
        if fn in _ADD or fn in _SUB:
            a, b = args[0], args[1]
            sign = 1.0 if fn in _ADD else -1.0
            if isinstance(a, Interval) and isinstance(b, Interval):
                if a.tracked != b.tracked:
                    a, b = Interval.of(a.centre, a.radius), Interval.of(b.centre, b.radius)
                stack = a.stack + b.stack if sign > 0 else a.stack - b.stack
                return Interval(stack, a.radius + b.radius, a.tracked)
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
            clean = fn([p.clean for p in parts], *rest, **kwargs) if all(p.tracked for p in parts) else None
            centre = fn([p.centre for p in parts], *rest, **kwargs)
            return Interval.of(centre, fn([p.radius for p in parts], *rest, **kwargs), clean)
        raise UnsupportedOperationError(f"unsupported operation {_name(fn)} on a perturbed tensor")

    def _monotone(self, x: Interval, fn: Callable[[torch.Tensor], torch.Tensor], relu: bool = False) -> Interval:
        if relu and not self._linearize and (_FUSED or not torch.is_grad_enabled()):
            stack, radius, lower, upper = _IntervalReLU.apply(x.stack, x.radius, x.tracked)
            if self._relu is not None:
                self._relu.append((lower, upper))
            return Interval(stack, radius, x.tracked)
        lower, upper = x.lower, x.upper
        if relu and self._relu is not None:
            self._relu.append((lower, upper))
        clean = fn(x.clean) if x.clean is not None else None
        if self._linearize:
            return Interval.of(fn(x.centre), _linearized(fn, x), clean)
        f_lower, f_upper = fn(lower), fn(upper)
        return Interval.of((f_upper + f_lower) / 2, (f_upper - f_lower) / 2, clean)

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


def _same(x: Interval, fn: Callable[[torch.Tensor], torch.Tensor], per_sample: bool = False) -> Interval:
    """A map that is linear with non-negative weights (reshape, average pooling): apply to all.
    ``per_sample``: ``fn`` maps each sample on its own (a module such as ``Flatten`` or pooling),
    so it can run on the stacked centre and clean batch at once."""
    return Interval(fn(x.stack) if per_sample else x.pairs(fn), fn(x.radius), x.tracked)


_FUSED = True  # tests switch the fused functions off to compare them with plain autograd


_SCRATCH: dict[int, dict[str, torch.Tensor]] = {}  # id(weight) -> buffers, dropped with the weight


def _scratch(weight: torch.Tensor, name: str) -> torch.Tensor:
    """A buffer shaped like ``weight`` that lives as long as the weight (reused across steps)."""
    buffers = _SCRATCH.get(id(weight))
    if buffers is None:
        buffers = _SCRATCH[id(weight)] = {}
        weakref.finalize(weight, _SCRATCH.pop, id(weight), None)
    buf = buffers.get(name)
    if buf is None or buf.shape != weight.shape or buf.dtype != weight.dtype or buf.device != weight.device:
        buf = buffers[name] = torch.empty_like(weight, memory_format=torch.contiguous_format)
    return buf


def _fused(x: torch.Tensor, weight: torch.Tensor | None) -> bool:
    """Whether to use the fused autograd functions below: gradients on, float32/64 tensors of one
    dtype, autocast off (elsewhere plain autograd is as good)."""
    return (
        _FUSED
        and torch.is_grad_enabled()
        and x.dtype in (torch.float32, torch.float64)
        and (weight is None or (weight.dtype == x.dtype and not hasattr(weight, "placements")))
        and not torch.is_autocast_enabled(x.device.type)
    )


class _IntervalLinear(torch.autograd.Function):
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
    def forward(ctx: Any, stack: torch.Tensor, radius: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> Any:
        abs_weight = torch.abs(weight, out=_scratch(weight, "abs"))
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


class _IntervalReLU(torch.autograd.Function):
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
        g_out = torch.zeros_like(stack) if g_out is None else g_out
        g_centre = g_out[:n]
        if g_radius is None:
            g_radius = torch.zeros_like(lower)
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


class _IntervalBatchNorm(torch.autograd.Function):
    """Train-mode batch norm of a box and the clean batch, with the statistics of the clean batch
    (of the centres when it is not tracked): ``(stack, r) -> (stack', r', mean, var)``.

    The backward takes its per-channel sums from ``native_batch_norm_backward`` (in eval form, with
    the batch's statistics given) and adds the statistics' own terms to the clean half in place:
    about ten passes over the activations fewer than autograd's graph of the same formula.
    """

    @staticmethod
    def forward(
        ctx: Any, stack: torch.Tensor, radius: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float, tracked: bool
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
        g_out = torch.zeros_like(stack) if g_out is None else g_out.contiguous()
        g_radius = torch.zeros_like(radius) if g_radius is None else g_radius.contiguous()
        bn_backward = torch.ops.aten.native_batch_norm_backward
        # grad of the stack at fixed statistics, sum(g (x - mean) invstd), sum(g) per channel
        g_stack, sum_g_xhat, sum_g = bn_backward(g_out, stack, weight, mean, var, None, None, False, ctx.eps, [True, True, True])
        # grad of the radius (g |scale|) and sum(g r): batch norm "backward" with mean 0, std 1
        abs_scale = scale.abs()
        g_rad, sum_g_r, _ = bn_backward(
            g_radius, radius, abs_scale, torch.zeros_like(mean), torch.ones_like(var), None, None, False, 0.0, [True, True, False]
        )
        gamma = weight if weight is not None else torch.ones_like(invstd)
        g_weight = sum_g_xhat + gamma.sign() * invstd * sum_g_r if weight is not None and ctx.needs_input_grad[2] else None
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


def _affine(x: Interval, fn: Callable, weight: torch.Tensor, bias: torch.Tensor | None, linear: bool = False) -> Interval:
    """``(W c + b, |W| r)``; centre and clean batch share one call. ``linear``: ``fn`` is
    ``F.linear``, which has a fused autograd path (see :class:`_IntervalLinear`)."""
    if linear and _fused(x.stack, weight):
        stack, radius = _IntervalLinear.apply(x.stack, x.radius, weight, bias)
        return Interval(stack, radius, x.tracked)
    return Interval(fn(x.stack, weight, bias), fn(x.radius, weight.abs(), None), x.tracked)


def _shift(x: Interval, k: Any) -> Interval:
    return Interval(x.broadcast(lambda t: t + k), x.radius, x.tracked)


def _scale(x: Interval, k: Any) -> Interval:
    k_abs = k.abs() if torch.is_tensor(k) else abs(k)
    return Interval(x.broadcast(lambda t: t * k), x.radius * k_abs, x.tracked)


def _dropout(x: Interval, p: float, training: bool) -> Interval:
    if not training or p == 0:
        return x
    mask = F.dropout(torch.ones_like(x.centre), p, True)  # one mask for centre, radius and clean
    return _scale(x, mask)


def _batch_norm(m: nn.modules.batchnorm._BatchNorm, x: Interval) -> Interval:
    batch_stats = m.training or m.running_mean is None
    if batch_stats and _fused(x.stack, m.weight):
        stack, radius, mean, var = _IntervalBatchNorm.apply(x.stack, x.radius, m.weight, m.bias, m.eps, x.tracked)
    else:
        shape = [1, -1] + [1] * (x.stack.dim() - 2)
        if batch_stats:
            ref = x.clean if x.tracked else x.centre
            var, mean = torch.var_mean(ref, [0, *range(2, ref.dim())], unbiased=False)  # one pass over the batch
        else:
            mean, var = m.running_mean, m.running_var
        scale = torch.rsqrt(var + m.eps)
        if m.weight is not None:
            scale = scale * m.weight
        shift = -mean * scale
        if m.bias is not None:
            shift = shift + m.bias
        stack = torch.addcmul(shift.view(shape), x.stack, scale.view(shape))
        radius = x.radius * scale.abs().view(shape)
    # The clean batch goes through the same affine map (its own statistics in train mode: what the
    # module computes), and the running statistics are updated once per step as the module would,
    # without computing the batch statistics a second time.
    if x.tracked and batch_stats and m.training:
        _update_running_stats(m, mean, var, x.clean.numel() // x.clean.shape[1])
    return Interval(stack, radius, x.tracked)


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
    """The (cached) :class:`BoundedNetwork` of ``model``. The cache holds neither the model nor
    anything that references it strongly, so a model is freed when its last user lets it go."""
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
        statistics = _ReLUStatistics.apply if _fused(lower, None) else _relu_statistics
        stats, counts = statistics(lower, upper)
        mean_radius, mean_active, mean_inactive, spread_active, spread_inactive = stats.unbind()
        tight = tight + F.relu(tolerance - r0 / mean_radius.clamp(min=1e-12)) / tolerance
        # Denominators are clamped (not masked after the fact) so that an empty group gives a
        # zero term with a finite gradient.
        mean_ratio = mean_active / (-mean_inactive).clamp(min=1e-12)
        var_ratio = spread_active / spread_inactive.clamp(min=1e-12)
        mean_ratio = torch.minimum(mean_ratio, 1 / mean_ratio.clamp(min=1e-12))
        var_ratio = torch.minimum(var_ratio, 1 / var_ratio.clamp(min=1e-12))
        term = (F.relu(tolerance - mean_ratio) + F.relu(tolerance - var_ratio)) / tolerance
        balance = balance + torch.where((counts > 0).all(), term, zero)
    n = len(relu_bounds)
    return tight / n, balance / n


def _relu_statistics(lower: torch.Tensor, upper: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What the regularizers need of one ReLU's box (centres ``c``, radii ``r``, ``N`` entries):
    ``[mean(r), sum(c [l > 0]) / N, sum(c [u < 0]) / N, sum((c - mean c)^2 [l > 0]),
    sum((c - mean c)^2 [u < 0])]`` and the two group sizes."""
    centre, radius = (upper + lower) / 2, (upper - lower) / 2
    active, inactive = (lower > 0).to(centre.dtype), (upper < 0).to(centre.dtype)
    spread = (centre - centre.mean()) ** 2
    stats = torch.stack([radius.mean(), (centre * active).mean(), (centre * inactive).mean(), (spread * active).sum(), (spread * inactive).sum()])
    return stats, torch.stack([active.sum(), inactive.sum()])


class _ReLUStatistics(torch.autograd.Function):
    """:func:`_relu_statistics` with a hand-written backward: a few passes over the box instead
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
        deviation, active, inactive = _deviation_and_groups(lower, upper, mean)
        flat, square = deviation.reshape(-1), deviation.square().reshape(-1)
        masks = active.reshape(-1), inactive.reshape(-1)
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
        deviation, active, inactive = _deviation_and_groups(lower, upper, mean)
        # Python scalars: products with 0-dim tensors are several times slower on CPU than with
        # numbers (this costs one small device sync per layer on GPU).
        g_radius, g_mean_a, g_mean_i, g_spread_a, g_spread_i = g_stats.tolist()
        sum_a, sum_i = sums.tolist()
        slope = torch.mul(active, g_spread_a).add_(inactive, alpha=g_spread_i)
        g_half = torch.mul(active, g_mean_a / (2 * n)).add_(inactive, alpha=g_mean_i / (2 * n))
        g_half.addcmul_(deviation, slope).sub_((g_spread_a * sum_a + g_spread_i * sum_i) / n)
        shift = g_radius / (2 * n)
        return g_half - shift, g_half.add_(shift)


def _deviation_and_groups(lower: torch.Tensor, upper: torch.Tensor, mean: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``c - mean(c)`` and the 0/1 masks ``l > 0``, ``u < 0`` in the box's dtype (products with
    float masks are about 3x faster than with bool ones on CPU)."""
    deviation = torch.add(upper, lower).mul_(0.5)
    deviation.sub_(mean)
    active = torch.gt(lower, 0, out=torch.empty_like(lower))
    inactive = torch.lt(upper, 0, out=torch.empty_like(upper))
    return deviation, active, inactive
