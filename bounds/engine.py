"""The engine: a network traced once with ``torch.fx``, checked against the operator table, and
interpreted node by node on boxes. It keeps no state between calls: what one computation needs
(fused or plain, linearised or not, where ReLU bounds go) travels in a :class:`~.interval.Pass`.
(``|W|`` is kept per weight by :mod:`.fused`, not by the engine.)"""

from __future__ import annotations

import operator
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..plumbing.third_party_private import BatchNorm
from .interval import BoundResult, Interval, Pass, UnsupportedOperationError, where
from .ops import Op, lookup, reads_centre


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
            graph = fx.Tracer().trace(model)  # no GraphModule: the nodes must not hold the submodules
        except Exception as err:  # noqa: BLE001 - any tracing failure means "cannot bound"
            raise UnsupportedOperationError(
                f"cannot trace {type(model).__name__} with torch.fx ({type(err).__name__}: {err}); the interval "
                "engine needs a network without data-dependent control flow"
            ) from err
        # A weak reference: the engine is cached per model (``bounded``) and must not keep it alive.
        self._model = weakref.ref(model)
        self.nodes = list(graph.nodes)
        inputs = [n for n in self.nodes if n.op == "placeholder"]
        if len(inputs) != 1:
            raise UnsupportedOperationError(f"the network must take exactly one input, got {len(inputs)}")
        self.output = next(n for n in self.nodes if n.op == "output")
        if not isinstance(self.output.args[0], fx.Node):
            raise UnsupportedOperationError("the network must return a single tensor")
        self._ops: dict[fx.Node, Op] = {}
        for node in self.nodes:  # every operation has an entry; module arguments are checked
            if node.op.startswith("call_"):
                target, self._ops[node] = lookup(node, model)
                if node.op == "call_module" and self._ops[node].check is not None:
                    self._ops[node].check(target, node, set())
        self._check_perturbed()
        self._batch_norms = [
            n.target
            for n in self.nodes
            if n.op == "call_module" and isinstance(model.get_submodule(n.target), BatchNorm)
        ]
        self._owns_input = {n for n in self.nodes if _may_overwrite(n, model)}
        last = self.output.args[0]
        is_linear = (last.op == "call_module" and type(model.get_submodule(last.target)) is nn.Linear) or (
            last.op == "call_function" and last.target is F.linear
        )
        self.elide = last if is_linear else None
        self.layout = _input_layout(inputs[0], model)

    @property
    def model(self) -> nn.Module:
        """The traced network (held by weak reference; the caller keeps it alive)."""
        model = self._model()
        if model is None:
            raise ReferenceError("the network of this BoundedNetwork was garbage-collected; build a new one")
        return model

    def check_layout(
        self, lower: torch.Tensor, upper: torch.Tensor, names: tuple[str, str] = ("lower", "upper")
    ) -> None:
        """Refuse a box whose type, shape, dtype or device cannot go through the network (metadata
        only: no value is read), naming the arguments ``names``. The box must be batched like the
        network's input (at least ``[batch, features]``; the rank and channels of the first
        Linear/Conv/batch norm the input reaches through elementwise operations), and have the
        floating dtype and the device of the network's parameters. It is not cast: a float64 box
        on a float32 network would be bounded in float32, and the network's forward refuses the
        same mix."""
        for name, t in zip(names, (lower, upper)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"`{name}` must be a torch.Tensor, got {type(t).__name__}")
        what = " and ".join(f"`{n}`" for n in dict.fromkeys(names))
        if lower.shape != upper.shape:
            raise ValueError(f"{what} must have the same shape, got {tuple(lower.shape)} and {tuple(upper.shape)}")
        if lower.dtype != upper.dtype:
            raise ValueError(f"{what} must have the same dtype, got {lower.dtype} and {upper.dtype}")
        rank, dim, size, node = self.layout
        if (lower.dim() < 2 if rank is None else lower.dim() != rank) or (dim is not None and lower.shape[dim] != size):
            if node is None:
                want = "[batch, ...]"
            elif rank is None:
                want = f"[batch, ..., {size}] for the input of {where(node)}"
            else:
                want = f"[batch, {', '.join([str(size)] + ['*'] * (rank - 2))}] for the input of {where(node)}"
            raise ValueError(f"{what} must be batched like the network's input, {want}, got shape {tuple(lower.shape)}")
        param = next((t for t in self.model.parameters() if t.is_floating_point()), None)
        if param is None:
            param = next((t for t in self.model.buffers() if t.is_floating_point()), None)
        dtype = param.dtype if param is not None else torch.get_default_dtype()
        if lower.dtype != dtype:
            raise ValueError(
                f"{what} must have the network's dtype {dtype}, got {lower.dtype} (not cast: convert with "
                f"`.to({dtype})`, or convert the network)"
            )
        if param is not None and lower.device != param.device:
            raise ValueError(f"{what} must be on the network's device {param.device}, got {lower.device}")

    def uses_batch_statistics(self) -> bool:
        """Whether a batch norm of the network normalises with batch statistics as it is now (train
        mode, or no running statistics): only then do the bounds depend on the ``clean`` batch."""
        model = self.model
        for target in self._batch_norms:
            m = model.get_submodule(target)
            if m.training or m.running_mean is None:
                return True
        return False

    def num_outputs(self, x: torch.Tensor) -> int:
        """Width of the network's output on inputs like ``x`` (no module is called, so batch-norm
        running statistics stay untouched)."""
        if self.elide is not None and self.elide.op == "call_module":
            return self.model.get_submodule(self.elide.target).out_features
        with torch.no_grad():
            return self(x[:2], x[:2]).lower.shape[-1]

    def _check_perturbed(self) -> None:
        """Run the table's checks of functions and methods whose arguments are perturbed (depend
        on the network input), before any bound is computed: e.g. a product of two perturbed
        tensors, a linear map with a perturbed weight, ``torch.cat`` of perturbed and constants."""
        perturbed: set[fx.Node] = set()
        for node in self.nodes:
            if node.op == "placeholder":
                perturbed.add(node)
                continue
            if node.op in ("get_attr", "output") or reads_centre(node):
                continue  # constants, or plain values read off the centre (sizes)
            if not any(n in perturbed for n in node.all_input_nodes):
                continue  # evaluated as in the network
            perturbed.add(node)
            check = self._ops[node].check
            if node.op != "call_module" and check is not None:
                check(node.target, node, perturbed)

    def __call__(
        self,
        lower: torch.Tensor,
        upper: torch.Tensor,
        clean: torch.Tensor | None = None,
        spec: torch.Tensor | None = None,
        record_relu: bool = False,
        fused: bool = True,
    ) -> BoundResult:
        """Bound the network on the boxes ``[lower, upper]`` (batched like the network's input).

        Args:
            lower, upper: input box, same shape as a network input batch.
            clean: the clean batch (inside the box): carried along to give batch-norm statistics in
                train mode and the clean output. It doubles the centre's share of the work: leave it
                out where neither is needed (:meth:`uses_batch_statistics` is False).
            spec: optional ``[B, S, K]`` matrix; the bounds are then those of ``spec @ output``,
                with the last linear layer elided when the network ends in one.
            record_relu: collect the pre-activation bounds of every ReLU (warmup regularizers,
                unstable-neuron counts).
            fused: run the operators' fused autograd variants where they apply (the default);
                False runs every rule through plain autograd (same values and gradients, slower).
        """
        self.check_layout(lower, upper)
        relu: list[tuple[torch.Tensor, torch.Tensor]] | None = [] if record_relu else None
        return self._propagate(Pass(self.model, fused, False, relu), lower, upper, clean, spec)

    def linearized_radius(self, x: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
        """Output radius of interval propagation through the network *linearised at* ``x``
        (each activation replaced by its slope at the clean input; max-pooling by the selected
        input), for the tightness metric of Mao et al. 2023. Use in eval mode."""
        result = self._propagate(Pass(self.model, True, True, None), x - radius, x + radius, x, None)
        return (result.upper - result.lower) / 2

    def _propagate(
        self, p: Pass, lower: torch.Tensor, upper: torch.Tensor, clean: torch.Tensor | None, spec: torch.Tensor | None
    ) -> BoundResult:
        env: dict[fx.Node, Any] = {}
        result: Interval | None = None
        for node in self.nodes:
            if node.op == "placeholder":
                env[node] = Interval.input(lower, upper, clean)
            elif node.op == "output":
                result = env[node.args[0]]
            elif node is self.elide and spec is not None:
                result = self._elided(p, node, env, spec)
                break
            else:
                env[node] = self._run(p, node, env)
        assert result is not None
        relu = p.relu or []
        if spec is not None and self.elide is None:
            centre = torch.einsum("bsk,bk->bs", spec, result.centre)
            radius = torch.einsum("bsk,bk->bs", spec.abs(), result.radius)
            return BoundResult(centre - radius, centre + radius, result.clean, relu)
        return BoundResult(result.lower, result.upper, result.clean, relu)

    def _elided(self, p: Pass, node: fx.Node, env: dict[fx.Node, Any], spec: torch.Tensor) -> Interval:
        """The last linear layer with the specification folded in: ``(C W) h + C b``."""
        if node.op == "call_module":
            module = p.model.get_submodule(node.target)
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

    def _run(self, p: Pass, node: fx.Node, env: dict[fx.Node, Any]) -> Any:
        """One node: a constant, the network's own operation on constants, or the table's rule."""
        if node.op == "get_attr":
            return _get_attr(p.model, node.target)
        args = fx.node.map_arg(node.args, env.__getitem__)
        kwargs = fx.node.map_arg(node.kwargs, env.__getitem__)
        if node.op == "call_module":
            target = p.model.get_submodule(node.target)
        else:
            target = node.target
        if not (_has_interval(args) or _has_interval(kwargs.values())):  # constants: as in the network
            if node.op == "call_method":
                return getattr(args[0], target)(*args[1:], **kwargs)
            return target(*args, **kwargs)
        op = self._ops[node]
        p.owned = node in self._owns_input
        if p.fused and op.fused is not None:
            out = op.fused(p, target, args, kwargs)
            if out is not None:
                return out
        return op.rule(p, target, args, kwargs)


_FRESH = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d, nn.ReLU)
"""Modules whose rules return newly allocated boxes (never a view or the input itself)."""
_OVERWRITES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.ReLU)
"""Modules whose rules may overwrite an owned input box (``Pass.owned``)."""


def _may_overwrite(node: fx.Node, model: nn.Module) -> bool:
    """Whether ``node`` may overwrite its input box: a module of ``_OVERWRITES`` whose single
    argument comes from a ``_FRESH`` module that has no other user (the graph's output included)."""
    if node.op != "call_module" or type(model.get_submodule(node.target)) not in _OVERWRITES:
        return False
    if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
        return False
    source = node.args[0]
    return source.op == "call_module" and type(model.get_submodule(source.target)) in _FRESH and len(source.users) == 1


def _has_interval(values: Any) -> bool:
    for v in values:
        if isinstance(v, Interval) or (isinstance(v, (list, tuple)) and _has_interval(v)):
            return True
    return False


def _fetch(value: Any, env: dict[fx.Node, Any]) -> Any:
    return env[value] if isinstance(value, fx.Node) else value


def _get_attr(model: nn.Module, target: str) -> Any:
    obj: Any = model
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


_CACHE: weakref.WeakKeyDictionary[nn.Module, BoundedNetwork] = weakref.WeakKeyDictionary()


def bounded(model: nn.Module) -> BoundedNetwork:
    """The (cached) :class:`BoundedNetwork` of ``model``. The cache holds neither the model nor
    anything that references it strongly, so a model is freed when its last user lets it go."""
    engine = _CACHE.get(model)
    if engine is None:
        engine = _CACHE[model] = BoundedNetwork(model)
    return engine


def check_box(
    engine: BoundedNetwork, lower: torch.Tensor, upper: torch.Tensor, names: tuple[str, str] = ("lower", "upper")
) -> None:
    """An input box ``[lower, upper]`` for ``engine``'s network: :meth:`BoundedNetwork.check_layout`
    (batched, the network's dtype and device), at least one sample, finite, not empty."""
    engine.check_layout(lower, upper, names)
    what = " and ".join(f"`{n}`" for n in dict.fromkeys(names))
    if lower.shape[0] == 0:
        raise ValueError(f"{what} must hold at least one sample, got a batch of 0")
    if not bool(lower.isfinite().all() and upper.isfinite().all()):
        raise ValueError(f"{what} must be finite (no NaN or infinity)")
    if bool((lower > upper).any()):
        if names == ("lower", "upper"):
            raise ValueError("`lower` must be <= `upper` everywhere (an empty box)")
        raise ValueError(f"the box around {what} is empty somewhere (its lower end above its upper end)")


_ELEMENTWISE_MODULES = (nn.ReLU, nn.LeakyReLU, nn.Sigmoid, nn.Tanh, nn.Dropout, nn.Identity)
_ELEMENTWISE_FUNCTIONS = (operator.add, operator.sub, operator.mul, operator.truediv, torch.relu, F.relu)


def _input_layout(placeholder: fx.Node, model: nn.Module) -> tuple[int | None, int | None, int | None, fx.Node | None]:
    """``(rank, dim, size, node)``: the input rank (None: at least 2) and the size of dimension
    ``dim`` that the first Linear/Conv/batch norm reached from the input through elementwise
    operations needs (``node``); ``(None, None, None, None)`` where none is reached that way."""
    frontier, seen = [placeholder], {placeholder}
    while frontier:
        node = frontier.pop(0)
        for user in node.users:
            if user in seen:
                continue
            seen.add(user)
            if user.op == "call_module" and user.args[:1] == (node,):
                m = model.get_submodule(user.target)
                if isinstance(m, (nn.Conv1d, nn.Conv2d)):
                    return m.weight.dim(), 1, m.in_channels, user
                if isinstance(m, nn.Linear):
                    return None, -1, m.in_features, user
                if isinstance(m, nn.BatchNorm2d):
                    return 4, 1, m.num_features, user
                if isinstance(m, _ELEMENTWISE_MODULES):
                    frontier.append(user)
            elif user.op == "call_function" and user.target in _ELEMENTWISE_FUNCTIONS:
                frontier.append(user)
    return None, None, None, None


def interval_bounds(model: nn.Module, lower: torch.Tensor, upper: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Interval bounds of ``model``'s output over the input box ``[lower, upper]``.

    Raises:
        ValueError: a box that is empty, holds NaN or infinity or no sample, is not batched like the network's input, or
            whose dtype or device differs from the network's parameters (it is not cast).

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2))
        >>> lo, up = interval_bounds(net, torch.zeros(1, 2), torch.zeros(1, 2))
        >>> torch.equal(lo, up)
        True
    """
    engine = bounded(model)
    check_box(engine, lower, upper)
    result = engine(lower, upper)
    return result.lower, result.upper
