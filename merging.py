"""Model merging on state dicts: permutation alignment (Git Re-Basin weight matching), linear
interpolation and loss barriers, task arithmetic, TIES-merging and MAP's amortised Pareto fronts.

Method card
    * :func:`align` (Ainsworth et al. 2023, "Git Re-Basin: Merging Models modulo Permutation
      Symmetries", Algorithm 2 "weight matching"): hidden units of a network can be permuted
      without changing its function. Weight matching picks, for every permutable axis group
      ``P_l``, the permutation maximising ``sum_l <W_l^A, P_l W_l^B P_{l-1}^T>`` by coordinate
      descent: one group at a time, with the others fixed, the group's term is a linear assignment
      problem (``scipy.optimize.linear_sum_assignment``); sweep groups in a seeded random order
      until a sweep improves nothing. Which axes share a permutation is read off an ``torch.fx``
      trace (:func:`permutation_spec`), so no hand-written spec is needed.
    * :func:`interpolate`, :func:`barrier`: ``theta(alpha) = (1 - alpha) theta_A + alpha theta_B``
      and the loss barrier of Frankle et al. 2020 ("Linear Mode Connectivity and the Lottery
      Ticket Hypothesis"), ``max_alpha L(theta(alpha)) - ((1 - alpha) L(theta_A) + alpha L(theta_B))``
      on the evaluated alphas (the same for the error).
    * :func:`task_arithmetic` (Ilharco et al. 2023, "Editing Models with Task Arithmetic"):
      ``theta = theta_0 + lambda * sum_t (theta_t - theta_0)``.
    * :func:`ties_merge` (Yadav et al. 2023, "TIES-Merging", Algorithm 1): trim every task vector
      to its ``int(density * d)`` largest magnitudes over the whole model, elect each entry's sign
      as the sign of the sum of the trimmed vectors, and average only the entries that agree with
      it (disjoint mean); ``theta = theta_0 + lambda * tau_m``.
    * :func:`map_pareto_front` (Li et al. 2024, "MAP: Low-compute Model Merging with Amortized
      Pareto Fronts via Quadratic Approximation"): each task's metric of the merged model
      ``theta_0 + sum_t c_t tau_t`` is approximated by a quadratic in the coefficients ``c``,
      fitted by least squares to a few evaluations; the fitted surrogates are then evaluated for
      free on many candidate ``c`` and their non-dominated set is the amortised Pareto front.
      :func:`grid_pareto_front` is the brute-force reference it is compared with.

All functions work on plain state dicts (``dict[str, Tensor]``) of one architecture; floating
tensors are merged, integer tensors (``num_batches_tracked``) are taken from the first/base state.

Example:
    >>> import torch
    >>> from torch import nn
    >>> a = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> b = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> b_aligned = align(a, b, torch.randn(3, 4))
    >>> x = torch.randn(5, 4)
    >>> torch.allclose(b_aligned(x), b(x), atol=1e-6)
    True
    >>> mid = interpolate(a.state_dict(), b_aligned.state_dict(), 0.5)
"""

from __future__ import annotations

import copy
import math
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

State = dict[str, Tensor]

__all__ = [
    "Barrier",
    "MAPResult",
    "PermutationSpec",
    "QuadraticFit",
    "align",
    "apply_permutations",
    "barrier",
    "evaluate_classifier",
    "fit_quadratic",
    "grid_pareto_front",
    "interpolate",
    "map_pareto_front",
    "pareto_mask",
    "permutation_spec",
    "task_arithmetic",
    "task_vector",
    "ties_merge",
    "weight_matching",
]


# ============================================================================ checks
def _check_states(states: Sequence[Mapping[str, Tensor]], what: str) -> None:
    first = states[0]
    for i, state in enumerate(states[1:], 1):
        if state.keys() != first.keys():
            missing = sorted(set(first) ^ set(state))[0]
            raise ValueError(f"`{what}`[{i}] and `{what}`[0] differ in their tensors: {missing!r} is in one only")
        for name, value in state.items():
            if value.shape != first[name].shape:
                raise ValueError(f"`{what}`[{i}][{name!r}] has shape {tuple(value.shape)}, expected {tuple(first[name].shape)}")


def _check_finite(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"`{name}` must be a finite number, got {value!r}")


# ============================================================================ linear combinations
def interpolate(a: Mapping[str, Tensor], b: Mapping[str, Tensor], alpha: float) -> State:
    """``(1 - alpha) * a + alpha * b`` for floating tensors (computed in float64, returned in
    ``a``'s dtypes); integer tensors are copied from ``a``. ``alpha`` may lie outside [0, 1]."""
    _check_finite("alpha", alpha)
    _check_states([a, b], "states")
    out = {}
    for name, va in a.items():
        if va.is_floating_point():
            out[name] = torch.lerp(va.double(), b[name].double(), float(alpha)).to(va.dtype)
        else:
            out[name] = va.clone()
    return out


def task_vector(base: Mapping[str, Tensor], finetuned: Mapping[str, Tensor]) -> State:
    """``finetuned - base`` for every floating tensor (float64)."""
    _check_states([base, finetuned], "states")
    return {k: finetuned[k].double() - v.double() for k, v in base.items() if v.is_floating_point()}


def _add_to_base(base: Mapping[str, Tensor], delta: Mapping[str, Tensor]) -> State:
    return {k: (v.double() + delta[k]).to(v.dtype) if k in delta else v.clone() for k, v in base.items()}


def task_arithmetic(
    base: Mapping[str, Tensor], finetuned: Sequence[Mapping[str, Tensor]], scale: float | Sequence[float] = 1.0
) -> State:
    """Task arithmetic (Ilharco et al. 2023): ``base + sum_t scale_t * (finetuned_t - base)``.

    Args:
        base: the pre-trained weights every fine-tune started from.
        finetuned: the fine-tuned weights, one per task.
        scale: one scaling coefficient ``lambda`` for all task vectors, or one per task (the
            merging coefficients MAP searches over).

    Example:
        >>> base = {"w": torch.zeros(2)}
        >>> task_arithmetic(base, [{"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, 2.0])}], 0.5)["w"]
        tensor([0.5000, 1.0000])
    """
    if not finetuned:
        raise ValueError("`finetuned` must hold at least one state dict")
    scales = _scales(scale, len(finetuned))
    _check_states([base, *finetuned], "states")
    delta: State = {}
    for s, ft in zip(scales, finetuned):
        for k, tau in task_vector(base, ft).items():
            delta[k] = delta[k] + s * tau if k in delta else s * tau
    return _add_to_base(base, delta)


def _scales(scale: float | Sequence[float], n: int) -> list[float]:
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        _check_finite("scale", scale)
        return [float(scale)] * n
    scales = [float(s) for s in scale]
    if len(scales) != n:
        raise ValueError(f"`scale` must be a number or hold one value per fine-tune ({n}), got {len(scales)} values")
    for s in scales:
        _check_finite("scale", s)
    return scales


def ties_merge(
    base: Mapping[str, Tensor], finetuned: Sequence[Mapping[str, Tensor]], density: float = 0.2, scale: float = 1.0
) -> State:
    """TIES-merging (Yadav et al. 2023, Algorithm 1) on whole-model task vectors.

    Every floating tensor of ``finetuned_t - base`` is flattened into one vector ``tau_t`` of
    length ``d`` (as the authors' code does, over the whole model, not per layer), then:

    1. trim: keep the ``k = int(density * d)`` entries of largest magnitude of each ``tau_t``
       (entries tied with the ``k``-th largest magnitude are kept too), zero the rest. The
       authors' ``topk_values_mask`` keeps the entries at or above the ``(d - k)``-th smallest
       magnitude, i.e. ``k + 1`` entries when magnitudes are distinct; litplug keeps ``k``;
    2. elect: ``gamma = sign(sum_t trimmed_t)``; entries where the sum is exactly 0 take the sign
       of ``sum(gamma)`` (the authors' "majority" rule);
    3. disjoint merge: ``tau_m = sum_t [sign(trimmed_t) == gamma] trimmed_t / max(1, count)``
       (the mean over the tasks whose kept entry agrees with the elected sign);

    and returns ``base + scale * tau_m``. Integer tensors are copied from ``base``.

    Example:
        >>> base = {"w": torch.zeros(3)}
        >>> fts = [{"w": torch.tensor([1.0, -2.0, 0.1])}, {"w": torch.tensor([3.0, 1.0, -0.2])}]
        >>> ties_merge(base, fts, density=2 / 3)["w"]
        tensor([ 2., -2.,  0.])
    """
    if not finetuned:
        raise ValueError("`finetuned` must hold at least one state dict")
    _check_finite("density", density)
    if not 0.0 < density <= 1.0:
        raise ValueError(f"`density` must be in (0, 1], got {density}")
    _check_finite("scale", scale)
    _check_states([base, *finetuned], "states")
    names = [k for k, v in base.items() if v.is_floating_point()]
    if not names:
        raise ValueError("`base` has no floating tensors to merge")
    taus = torch.stack([torch.cat([(ft[k].double() - base[k].double()).flatten() for k in names]) for ft in finetuned])
    d = taus.shape[1]
    keep = int(density * d)
    if keep == 0:
        taus = torch.zeros_like(taus)
    elif keep < d:
        threshold = taus.abs().kthvalue(d - keep + 1, dim=1, keepdim=True).values  # the keep-th largest
        taus = taus * (taus.abs() >= threshold)
    summed = taus.sum(0)
    sign = torch.sign(summed)
    sign[sign == 0] = torch.sign(sign.sum())
    agree = torch.where(sign > 0, taus > 0, taus < 0)
    selected = taus * agree
    merged = selected.sum(0) / agree.sum(0).clamp(min=1)
    delta, offset = {}, 0
    for k in names:
        n = base[k].numel()
        delta[k] = scale * merged[offset : offset + n].view_as(base[k])
        offset += n
    return _add_to_base(base, delta)


# ============================================================================ permutation structure
@dataclass(frozen=True)
class Axis:
    """One tensor axis moved by a permutation: ``state[name]`` viewed with axis ``axis`` split
    into ``(size, block)`` (``block > 1``: the inputs of a Linear after a Flatten of a conv's
    ``size`` channels, each channel a contiguous block of ``block`` features)."""

    name: str
    axis: int
    block: int = 1


@dataclass
class PermutationSpec:
    """Which tensor axes share a permutation: ``groups[g]`` lists the axes moved by permutation
    ``g`` of ``sizes[g]`` units; ``sources[g]`` names the layers whose outputs it permutes.
    ``in_objective`` are the tensors matched by :func:`weight_matching` (the parameters);
    buffers (BatchNorm running statistics) are only permuted."""

    sizes: list[int]
    groups: list[list[Axis]]
    sources: list[list[str]]
    in_objective: set[str] = field(default_factory=set)

    def axes_of(self) -> dict[str, list[tuple[int, Axis]]]:
        """tensor name -> [(group, axis)]."""
        out: dict[str, list[tuple[int, Axis]]] = {}
        for g, axes in enumerate(self.groups):
            for ax in axes:
                out.setdefault(ax.name, []).append((g, ax))
        return out


_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh, nn.Sigmoid,
    nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
)  # fmt: skip
# per-channel ops on (N, C, ...) tensors that keep channel c at index c
_CHANNELWISE_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)  # fmt: skip
_ELEMENTWISE_FUNCTIONS = {
    F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish, F.hardtanh, F.hardswish,
    F.hardsigmoid, F.softplus, F.dropout, F.sigmoid, F.tanh, torch.relu, torch.sigmoid, torch.tanh,
    torch.nn.functional.dropout1d, torch.nn.functional.dropout2d,
}  # fmt: skip
_CHANNELWISE_FUNCTIONS = {
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
}  # fmt: skip
_ELEMENTWISE_METHODS = {"relu", "sigmoid", "tanh", "contiguous", "clone", "detach"}
_SCALAR_OPS = {operator.mul, operator.truediv, operator.neg, torch.mul, torch.div, operator.pos}
_ADD_OPS = {operator.add, operator.iadd, torch.add}
_FLATTEN_FUNCTIONS = {torch.flatten}
_FLATTEN_METHODS = {"flatten", "view", "reshape"}

_FIXED = -1  # the union-find root of axes that must not move (inputs, outputs)


class _Unsupported(Exception):
    """A node :func:`permutation_spec` cannot permute through (an error only if its input moves)."""


class _Structure:
    """Union-find over permutation groups, filled while walking the fx graph."""

    def __init__(self) -> None:
        self.parent: dict[int, int] = {_FIXED: _FIXED}
        self.size: dict[int, int] = {}
        self.axes: dict[int, list[Axis]] = {}
        self.sources: dict[int, list[str]] = {}

    def new(self, size: int, source: str) -> int:
        g = len(self.size)
        self.parent[g], self.size[g], self.axes[g], self.sources[g] = g, size, [], [source]
        return g

    def find(self, g: int) -> int:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def union(self, a: int, b: int, where: str) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        if rb == _FIXED:
            ra, rb = rb, ra
        if ra != _FIXED and self.size[ra] != self.size[rb]:
            raise ValueError(f"{where}: adds tensors of {self.size[ra]} and {self.size[rb]} channels")
        self.parent[rb] = ra
        if ra != _FIXED:
            self.axes[ra] += self.axes[rb]
            self.sources[ra] += self.sources[rb]
        return ra


@dataclass(frozen=True)
class _Label:
    """What permutes a node's channel axis (dim 1): group ``group`` (``_FIXED``: nothing), with
    each channel a block of ``block`` contiguous features (after a Flatten)."""

    group: int
    block: int = 1
    ndim: int = 2


def permutation_spec(model: nn.Module, example_input: Tensor) -> PermutationSpec:
    """Derive which weight axes share a permutation from an ``torch.fx`` trace of ``model``.

    Supported: ``Linear`` (on ``(N, C)`` inputs; on inputs of more dimensions it stays
    unpermuted), ``Conv1d/2d/3d`` (``groups=1``),
    ``BatchNorm1d/2d/3d`` (weight, bias, running statistics), element-wise activations and
    dropout, per-channel pooling, ``Flatten``/``flatten``/``view``/``reshape`` to ``(N, -1)``
    after a convolution (a channel permutation then moves whole blocks of the next Linear's
    inputs), multiplication/division by a constant, and additions (residual connections: both
    summands share one permutation; a summand that cannot move, such as the input, pins it).
    The network's inputs and outputs are never permuted. Anything else that would see a
    permuted tensor (LayerNorm, attention, concatenation, grouped convolutions, a module
    called twice, ...) raises ``ValueError`` naming the node; such an operation is accepted
    where its input cannot move anyway (``log_softmax`` of the logits).

    Args:
        model: the network (traced with ``torch.fx.symbolic_trace``).
        example_input: one batch of inputs, used to propagate shapes.
    """
    from torch.fx.passes.shape_prop import ShapeProp

    try:
        gm = fx.symbolic_trace(model)
    except Exception as err:  # noqa: BLE001 - fx raises many kinds
        raise ValueError(f"`model` ({type(model).__name__}) cannot be traced with torch.fx: {err}") from err
    modes = {m: m.training for m in model.modules()}
    gm.eval()  # shares its submodules with `model`: no running-statistics update
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(example_input)
    finally:
        for m, mode in modes.items():
            m.training = mode
    modules = dict(gm.named_modules())
    st = _Structure()
    labels: dict[fx.Node, _Label] = {}
    called: set[str] = set()
    params = {n for n, _ in model.named_parameters()}

    def shape(node: fx.Node) -> tuple[int, ...]:
        meta = node.meta.get("tensor_meta")
        return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else ()

    def label(arg: Any) -> _Label | None:
        return labels.get(arg) if isinstance(arg, fx.Node) else None

    def tensor_inputs(node: fx.Node) -> list[_Label]:
        found = [labels[a] for a in node.all_input_nodes if a in labels]
        return found

    def fixed(node: fx.Node) -> _Label:
        return _Label(_FIXED, 1, len(shape(node)))

    def refuse(node: fx.Node, what: str) -> None:
        raise _Unsupported(what)

    def is_moving(lab: _Label | None) -> bool:
        return lab is not None and st.find(lab.group) != _FIXED

    def visit(node: fx.Node) -> None:
        if node.op == "placeholder":
            labels[node] = fixed(node)
        elif node.op == "get_attr":
            labels[node] = fixed(node)
        elif node.op == "output":
            for lab in tensor_inputs(node):
                st.union(_FIXED, lab.group, "output")
        elif node.op == "call_module":
            mod = modules[node.target]
            inp = label(node.args[0]) if node.args else None
            own = [n for n, _ in mod.named_parameters(recurse=True)]
            if own:
                if node.target in called:
                    raise ValueError(f"align: module {node.target!r} is called twice (shared weights) and is not supported")
                called.add(node.target)
            prefix = f"{node.target}."
            if isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                if isinstance(mod, nn.Linear) and len(shape(node.args[0])) != 2:  # left unpermuted
                    refuse(node, f"Linear on a {len(shape(node.args[0]))}-d input")
                if not isinstance(mod, nn.Linear) and mod.groups != 1:
                    refuse(node, f"{type(mod).__name__} with groups={mod.groups}")
                out_features = mod.weight.shape[0]
                g = st.new(out_features, node.target)
                st.axes[g].append(Axis(prefix + "weight", 0))
                if mod.bias is not None:
                    st.axes[g].append(Axis(prefix + "bias", 0))
                if is_moving(inp):
                    st.axes[st.find(inp.group)].append(Axis(prefix + "weight", 1, inp.block))
                labels[node] = _Label(g, 1, len(shape(node)))
            elif isinstance(mod, nn.modules.batchnorm._BatchNorm):
                if inp is None:
                    inp = fixed(node)
                if is_moving(inp) and inp.block != 1:
                    refuse(node, type(mod).__name__ + " after a flatten")
                root = st.find(inp.group)
                names = [n for n in ("weight", "bias", "running_mean", "running_var") if getattr(mod, n, None) is not None]
                if root != _FIXED:
                    st.axes[root] += [Axis(prefix + n, 0) for n in names]
                labels[node] = inp
            elif isinstance(mod, _ELEMENTWISE_MODULES) or (isinstance(mod, nn.PReLU) and mod.num_parameters == 1):
                labels[node] = inp if inp is not None else fixed(node)
            elif isinstance(mod, _CHANNELWISE_MODULES):
                if is_moving(inp) and inp.block != 1:
                    refuse(node, type(mod).__name__ + " after a flatten")
                labels[node] = inp if inp is not None else fixed(node)
            elif isinstance(mod, nn.Flatten):
                labels[node] = _flatten_label(node, inp, mod.start_dim, mod.end_dim, shape, refuse)
            else:
                if any(is_moving(lab) for lab in tensor_inputs(node)):
                    refuse(node, f"module {node.target!r} of type {type(mod).__name__}")
                labels[node] = fixed(node)
        elif node.op in ("call_function", "call_method"):
            ins = tensor_inputs(node)
            target = node.target
            if not any(is_moving(lab) for lab in ins):
                labels[node] = fixed(node)
                return
            tensor_args = [a for a in node.args if isinstance(a, fx.Node)]
            if target in _ELEMENTWISE_FUNCTIONS or (node.op == "call_method" and target in _ELEMENTWISE_METHODS):
                labels[node] = label(node.args[0])
            elif target in _CHANNELWISE_FUNCTIONS:
                lab = label(node.args[0])
                if lab.block != 1:
                    refuse(node, f"{getattr(target, '__name__', target)} after a flatten")
                labels[node] = lab
            elif target in _SCALAR_OPS and len(tensor_args) == 1 and not node.kwargs:
                if node.args[0] is not tensor_args[0] and target in (operator.truediv, torch.div):
                    refuse(node, "division of a constant by a permuted tensor")
                labels[node] = label(tensor_args[0])
            elif target in _ADD_OPS and not node.kwargs:
                if len(tensor_args) == 1:  # x + constant: fine only for a scalar
                    const = node.args[1] if node.args[0] is tensor_args[0] else node.args[0]
                    if not isinstance(const, (int, float)):
                        refuse(node, "addition of a constant tensor")
                    labels[node] = label(tensor_args[0])
                    return
                a, b = label(tensor_args[0]), label(tensor_args[1])
                if a.block != b.block or shape(tensor_args[0]) != shape(tensor_args[1]):
                    refuse(node, f"addition of tensors of shapes {shape(tensor_args[0])} and {shape(tensor_args[1])}")
                g = st.union(a.group, b.group, f"align: node {node.name!r}")
                labels[node] = _Label(g, a.block, a.ndim)
            elif (node.op == "call_function" and target in _FLATTEN_FUNCTIONS) or (
                node.op == "call_method" and target in _FLATTEN_METHODS
            ):
                lab = label(node.args[0])
                labels[node] = _reshape_label(node, lab, shape, refuse)
            else:
                name = getattr(target, "__name__", str(target))
                refuse(node, f"{node.op} {name}")
        else:  # pragma: no cover - fx has no other ops
            raise ValueError(f"align: unexpected fx node {node.op}")

    deferred: list[tuple[fx.Node, str, list[int]]] = []
    for node in gm.graph.nodes:
        try:
            visit(node)
        except _Unsupported as err:
            # fine only if every input group ends up pinned anyway (e.g. log_softmax of the
            # logits): pass the first moving group through so that pinning reaches it, and check
            # at the end
            moving = [lab for lab in tensor_inputs(node) if is_moving(lab)]
            deferred.append((node, str(err), [lab.group for lab in moving]))
            labels[node] = moving[0] if moving else fixed(node)
    for node, what, groups in deferred:
        if any(st.find(g) != _FIXED for g in groups):
            raise ValueError(f"align: node {node.name!r} ({what}) sees a permuted tensor and is not supported")

    roots = sorted({st.find(g) for g in st.size} - {_FIXED})
    groups = [st.axes[r] for r in roots]
    return PermutationSpec(
        sizes=[st.size[r] for r in roots], groups=groups, sources=[st.sources[r] for r in roots], in_objective=params
    )


def _flatten_label(node: fx.Node, inp: _Label | None, start: int, end: int, shape: Callable, refuse: Callable) -> _Label:
    in_shape = shape(node.args[0])
    out_shape = shape(node)
    if inp is None or inp.group == _FIXED:
        return _Label(_FIXED, 1, len(out_shape))
    if len(in_shape) <= 2 and tuple(out_shape) == tuple(in_shape):
        return inp
    if start % len(in_shape) != 1 or end % len(in_shape) != len(in_shape) - 1:
        refuse(node, f"flatten(start_dim={start}, end_dim={end}) of a permuted tensor")
    return _Label(inp.group, inp.block * math.prod(in_shape[2:]), 2)


def _reshape_label(node: fx.Node, lab: _Label, shape: Callable, refuse: Callable) -> _Label:
    in_shape, out_shape = shape(node.args[0]), shape(node)
    if len(in_shape) < 2 or len(out_shape) != 2 or out_shape[0] != in_shape[0]:
        refuse(node, f"{node.target} from shape {in_shape} to {out_shape}")
    if len(in_shape) == 2:
        return lab
    return _Label(lab.group, lab.block * math.prod(in_shape[2:]), 2)


# ============================================================================ weight matching
def _permute_axis(t: Tensor, ax: Axis, perm: Tensor) -> Tensor:
    if ax.block == 1:
        return t.index_select(ax.axis, perm)
    shape = t.shape
    n = shape[ax.axis] // ax.block
    split = t.reshape(*shape[: ax.axis], n, ax.block, *shape[ax.axis + 1 :])
    return split.index_select(ax.axis, perm).reshape(shape)


def _unit_matrix(t: Tensor, ax: Axis, n: int) -> Tensor:
    """``t`` with the permuted axis first, shaped ``(n, -1)`` (one row per unit)."""
    if ax.block != 1:
        t = t.reshape(*t.shape[: ax.axis], n, ax.block, *t.shape[ax.axis + 1 :])
    return t.movedim(ax.axis, 0).reshape(n, -1)


def apply_permutations(state: Mapping[str, Tensor], spec: PermutationSpec, perms: Sequence[Tensor]) -> State:
    """``state`` with every group's permutation applied: unit ``i`` of group ``g`` becomes the
    old unit ``perms[g][i]``."""
    if len(perms) != len(spec.groups):
        raise ValueError(f"`perms` must hold one permutation per group ({len(spec.groups)}), got {len(perms)}")
    out = dict(state)
    for g, axes in enumerate(spec.groups):
        perm = torch.as_tensor(perms[g], dtype=torch.long)
        if sorted(perm.tolist()) != list(range(spec.sizes[g])):
            raise ValueError(f"`perms`[{g}] is not a permutation of {spec.sizes[g]} units")
        for ax in axes:
            out[ax.name] = _permute_axis(out[ax.name], ax, perm.to(out[ax.name].device))
    return out


def weight_matching(
    reference: Mapping[str, Tensor],
    other: Mapping[str, Tensor],
    spec: PermutationSpec,
    max_iter: int = 100,
    seed: int = 0,
) -> list[Tensor]:
    """Git Re-Basin weight matching (Ainsworth et al. 2023, Algorithm 2): coordinate descent over
    the permutation groups of ``spec``; each step solves ``max_P <A, P>`` with
    ``A = sum_(tensor, axis) W_ref(unit, :) W_other_permuted(unit, :)^T`` by
    ``scipy.optimize.linear_sum_assignment``. Groups are visited in a random order drawn from
    ``seed`` each sweep; stops after a sweep with no improvement (> 1e-12) or ``max_iter`` sweeps.

    Returns:
        one permutation per group, for :func:`apply_permutations` on ``other``.
    """
    from scipy.optimize import linear_sum_assignment

    if max_iter < 1:
        raise ValueError(f"`max_iter` must be >= 1, got {max_iter}")
    perms = [torch.arange(n) for n in spec.sizes]
    axes_of = spec.axes_of()
    ref = {k: v.detach().cpu() for k, v in reference.items() if k in axes_of and k in spec.in_objective}
    # products in the parameters' dtype (float64 only where a parameter is float64); the
    # assignment problems and their scores in float64
    dtype = torch.float64 if any(v.dtype == torch.float64 for v in ref.values()) else torch.float32
    ref = {k: v.to(dtype) for k, v in ref.items()}
    oth = {k: other[k].detach().cpu().to(dtype) for k in ref}
    gen = torch.Generator().manual_seed(seed)
    for _ in range(max_iter):
        progress = False
        for g in torch.randperm(len(perms), generator=gen).tolist():
            n = spec.sizes[g]
            A = torch.zeros(n, n, dtype=torch.float64)
            for ax in spec.groups[g]:
                if ax.name not in ref:
                    continue
                w = oth[ax.name]
                for g2, ax2 in axes_of[ax.name]:  # the other axes of this tensor, permuted as now
                    if ax2 != ax:
                        w = _permute_axis(w, ax2, perms[g2])
                A += (_unit_matrix(ref[ax.name], ax, n) @ _unit_matrix(w, ax, n).T).double()
            rows, cols = linear_sum_assignment(A.numpy(), maximize=True)
            new = torch.as_tensor(cols, dtype=torch.long)
            old_score = A[torch.arange(n), perms[g]].sum().item()
            new_score = A[torch.arange(n), new].sum().item()
            if new_score > old_score + 1e-12:
                progress = True
                perms[g] = new
        if not progress:
            break
    return perms


def align(
    reference: nn.Module, other: nn.Module, example_input: Tensor, max_iter: int = 100, seed: int = 0
) -> nn.Module:
    """A copy of ``other`` whose hidden units are permuted to match ``reference`` by weight
    matching (:func:`weight_matching` over the :func:`permutation_spec` of ``reference``). The
    copy computes the same function as ``other`` (up to float rounding of reordered sums); a
    network that is a hidden-unit permutation of ``reference`` is mapped back onto it exactly.

    Args:
        reference: the model to align to (unchanged).
        other: the model to permute (unchanged; a permuted deep copy is returned).
        example_input: a batch of inputs for shape propagation.
        max_iter: most coordinate-descent sweeps.
        seed: seed of the order groups are visited in.
    """
    spec = permutation_spec(reference, example_input)
    ref_state, other_state = reference.state_dict(), other.state_dict()
    _check_states([ref_state, other_state], "models")
    perms = weight_matching(ref_state, other_state, spec, max_iter=max_iter, seed=seed)
    aligned = copy.deepcopy(other)
    aligned.load_state_dict(apply_permutations(other_state, spec, perms))
    return aligned


# ============================================================================ barriers
@dataclass
class Barrier:
    """Loss and accuracy along ``(1 - alpha) A + alpha B``; ``loss_barrier`` / ``error_barrier``
    are Frankle et al.'s maxima over ``alphas`` of the rise above the linear interpolation of the
    end points' values; ``midpoint_*`` the same at ``alpha = 0.5`` (when evaluated)."""

    alphas: list[float]
    loss: list[float]
    accuracy: list[float]
    loss_barrier: float
    error_barrier: float
    midpoint_loss_barrier: float | None
    midpoint_error_barrier: float | None


def _rise(alphas: Sequence[float], values: Sequence[float]) -> list[float]:
    i0, i1 = alphas.index(0.0), alphas.index(1.0)
    return [v - ((1 - a) * values[i0] + a * values[i1]) for a, v in zip(alphas, values)]


@torch.no_grad()
def evaluate_classifier(model: nn.Module, batches: Any) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` (in eval mode) over an iterable of ``(x, y)``."""
    was = model.training
    model.eval()
    loss = correct = count = 0.0
    device = next(model.parameters()).device
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        logits = model(x)
        loss += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(-1) == y).sum().item()
        count += len(y)
    model.train(was)
    return loss / count, correct / count


def barrier(
    model_a: nn.Module,
    model_b: nn.Module,
    batches: Any,
    alphas: Sequence[float] | int = 11,
    align_first: bool = False,
    example_input: Tensor | None = None,
    logger: Any = None,
    prefix: str = "merge/barrier",
) -> Barrier:
    """Evaluate the linear path between two classifiers and its loss barrier.

    Args:
        model_a, model_b: two networks of one architecture (unchanged).
        batches: an iterable of ``(x, y)`` (e.g. a DataLoader), evaluated with cross-entropy.
        alphas: the interpolation weights (must contain 0 and 1), or a number of evenly spaced
            ones in [0, 1].
        align_first: permute ``model_b`` onto ``model_a`` with :func:`align` first.
        example_input: inputs for :func:`align` (default: the first batch's).
        logger: a Lightning logger (or anything with ``log_metrics(dict, step)``); logs
            ``<prefix>/loss`` and ``<prefix>/acc`` at step ``round(1000 * alpha)`` and the
            barriers at the last step.
        prefix: the TensorBoard tag prefix.
    """
    if isinstance(alphas, int):
        if alphas < 2:
            raise ValueError(f"`alphas` must be >= 2 when a number, got {alphas}")
        alphas = torch.linspace(0, 1, alphas, dtype=torch.float64).tolist()
    alphas = [float(a) for a in alphas]
    if 0.0 not in alphas or 1.0 not in alphas:
        raise ValueError(f"`alphas` must contain 0 and 1, got {alphas}")
    batches = list(batches)
    if align_first:
        model_b = align(model_a, model_b, batches[0][0] if example_input is None else example_input)
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    probe = copy.deepcopy(model_a)
    losses, accs = [], []
    for alpha in alphas:
        probe.load_state_dict(interpolate(state_a, state_b, alpha))
        loss, acc = evaluate_classifier(probe, batches)
        losses.append(loss)
        accs.append(acc)
    loss_rise = _rise(alphas, losses)
    err_rise = _rise(alphas, [1 - a for a in accs])
    mid = alphas.index(0.5) if 0.5 in alphas else None
    result = Barrier(
        alphas, losses, accs, max(loss_rise), max(err_rise),
        None if mid is None else loss_rise[mid], None if mid is None else err_rise[mid],
    )  # fmt: skip
    if logger is not None:
        for alpha, loss, acc in zip(alphas, losses, accs):
            logger.log_metrics({f"{prefix}/loss": loss, f"{prefix}/acc": acc}, step=round(1000 * alpha))
        logger.log_metrics({f"{prefix}/loss_barrier": result.loss_barrier, f"{prefix}/error_barrier": result.error_barrier}, step=1000)
    return result


# ============================================================================ MAP: quadratic surrogates and Pareto fronts
def _quadratic_features(c: Tensor) -> Tensor:
    n, t = c.shape
    cols = [torch.ones(n, dtype=c.dtype), *c.T]
    for i in range(t):
        for j in range(i, t):
            cols.append(c[:, i] * c[:, j])
    return torch.stack(cols, 1)


@dataclass
class QuadraticFit:
    """``m(c) = w . [1, c_1..c_T, c_i c_j (i <= j)]`` fitted by least squares; ``r2`` on the
    fitting points."""

    weights: Tensor
    r2: float

    def __call__(self, c: Tensor) -> Tensor:
        c = torch.as_tensor(c, dtype=torch.float64)
        return _quadratic_features(c.reshape(-1, c.shape[-1])) @ self.weights


def fit_quadratic(coefficients: Tensor, values: Tensor) -> QuadraticFit:
    """Least-squares fit of a full quadratic in the merging coefficients (MAP's surrogate).

    Args:
        coefficients: ``(n, T)`` evaluated coefficient vectors; ``n`` must be at least the
            number of quadratic terms, ``(T + 1)(T + 2) / 2``.
        values: ``(n,)`` the metric at each.
    """
    c = torch.as_tensor(coefficients, dtype=torch.float64)
    v = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    if c.dim() != 2 or c.shape[0] != v.shape[0]:
        raise ValueError(f"`coefficients` must be (n, T) and `values` (n,), got {tuple(c.shape)} and {tuple(v.shape)}")
    x = _quadratic_features(c)
    if c.shape[0] < x.shape[1]:
        raise ValueError(f"a quadratic in {c.shape[1]} coefficients needs >= {x.shape[1]} evaluations, got {c.shape[0]}")
    w = torch.linalg.lstsq(x, v.unsqueeze(1), driver="gelsd").solution.squeeze(1)
    resid = v - x @ w
    total = ((v - v.mean()) ** 2).sum()
    r2 = 1.0 - float((resid**2).sum() / total) if total > 0 else 1.0
    return QuadraticFit(w, r2)


def pareto_mask(values: Tensor, maximize: bool = True) -> Tensor:
    """Boolean mask of the non-dominated rows of ``values`` (``(n, k)``, ``k`` objectives)."""
    v = torch.as_tensor(values, dtype=torch.float64)
    if not maximize:
        v = -v
    # [i, j]: row j is >= row i in every objective and > in one, i.e. j dominates i
    dominates = (v.unsqueeze(0) >= v.unsqueeze(1)).all(-1) & (v.unsqueeze(0) > v.unsqueeze(1)).any(-1)
    dominated = dominates.any(1)
    return ~dominated


def _grid(num_tasks: int, points: int, low: float, high: float) -> Tensor:
    axis = torch.linspace(low, high, points, dtype=torch.float64)
    return torch.cartesian_prod(*[axis] * num_tasks).reshape(-1, num_tasks)


@dataclass
class MAPResult:
    """A Pareto front over merging coefficients.

    Attributes:
        coefficients: ``(m, T)`` the front's coefficient vectors.
        values: ``(m, k)`` their metrics (predicted by the surrogates for MAP, measured for a grid).
        evaluations: how many true evaluations (merged models scored) it took.
        fits: MAP's fitted surrogates, one per metric (empty for a grid).
        evaluated: ``(evaluations, T)`` the coefficient vectors that were evaluated.
        evaluated_values: ``(evaluations, k)`` their measured metrics.
    """

    coefficients: Tensor
    values: Tensor
    evaluations: int
    fits: list[QuadraticFit]
    evaluated: Tensor
    evaluated_values: Tensor


def map_pareto_front(
    evaluate: Callable[[Sequence[float]], Sequence[float]],
    num_tasks: int,
    num_evaluations: int | None = None,
    low: float = 0.0,
    high: float = 1.0,
    candidates: int = 2000,
    maximize: bool = True,
    seed: int = 0,
) -> MAPResult:
    """MAP (Li et al. 2024): the amortised Pareto front of merging coefficients.

    ``evaluate(c)`` scores the merged model for coefficients ``c`` (e.g. ``task_arithmetic(base,
    finetuned, c)``) and returns one metric per task. MAP evaluates ``num_evaluations`` points
    (default twice the number of quadratic terms) drawn uniformly from ``[low, high]^T``, fits one
    quadratic per metric (:func:`fit_quadratic`), predicts every metric on ``candidates`` further
    random points, and returns the predicted non-dominated set.
    """
    if num_tasks < 1:
        raise ValueError(f"`num_tasks` must be >= 1, got {num_tasks}")
    terms = (num_tasks + 1) * (num_tasks + 2) // 2
    n = 2 * terms if num_evaluations is None else num_evaluations
    if n < terms:
        raise ValueError(f"`num_evaluations` must be >= {terms} for {num_tasks} tasks, got {n}")
    if not low < high:
        raise ValueError(f"`low` must be < `high`, got {low} and {high}")
    gen = torch.Generator().manual_seed(seed)
    sample = lambda m: low + (high - low) * torch.rand(m, num_tasks, generator=gen, dtype=torch.float64)  # noqa: E731
    coeffs = sample(n)
    measured = torch.tensor([list(evaluate(c.tolist())) for c in coeffs], dtype=torch.float64)
    fits = [fit_quadratic(coeffs, measured[:, k]) for k in range(measured.shape[1])]
    pool = torch.cat([sample(candidates), coeffs])
    predicted = torch.stack([f(pool) for f in fits], 1)
    keep = pareto_mask(predicted, maximize)
    return MAPResult(pool[keep], predicted[keep], n, fits, coeffs, measured)


def grid_pareto_front(
    evaluate: Callable[[Sequence[float]], Sequence[float]],
    num_tasks: int,
    points: int = 11,
    low: float = 0.0,
    high: float = 1.0,
    maximize: bool = True,
) -> MAPResult:
    """The brute-force reference: evaluate every point of a ``points^T`` grid over
    ``[low, high]^T`` and keep the measured non-dominated set."""
    grid = _grid(num_tasks, points, low, high)
    measured = torch.tensor([list(evaluate(c.tolist())) for c in grid], dtype=torch.float64)
    keep = pareto_mask(measured, maximize)
    return MAPResult(grid[keep], measured[keep], len(grid), [], grid, measured)
