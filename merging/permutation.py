"""Permutation symmetry: the permutation spec of a network read off a ``torch.fx`` trace, and
Git Re-Basin weight matching / :func:`align` on it (see :mod:`litplug.merging`)."""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from ..plumbing.third_party_private import BatchNorm
from .states import AnyWeights, Weights, check_states, returned_as, state_of


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
# reads of a tensor's metadata, unchanged by a permutation of its channels (timm's blocks check
# `x.ndim`, squeeze-excite and attention read `x.shape`)
_SHAPE_ATTRIBUTES = {"ndim", "shape", "dtype", "device", "is_cuda", "layout"}
_SHAPE_METHODS = {"size", "dim", "numel", "nelement", "get_device"}
# operations named in words in refusals
_OPERATION_WORDS = {
    operator.getitem: "indexing (x[...])",
    operator.matmul: "matrix product (@)",
    operator.add: "addition",
    operator.sub: "subtraction",
    operator.mul: "multiplication",
    operator.truediv: "division",
    operator.pow: "power",
    torch.cat: "concatenation torch.cat",
    torch.stack: "stacking torch.stack",
    torch.matmul: "matrix product torch.matmul",
    torch.bmm: "batched matrix product torch.bmm",
    F.layer_norm: "layer normalisation F.layer_norm",
    F.batch_norm: "batch normalisation F.batch_norm",
    F.linear: "linear layer F.linear",
    F.softmax: "softmax F.softmax",
    F.scaled_dot_product_attention: "attention F.scaled_dot_product_attention",
}

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


def _location(node: fx.Node, model: nn.Module) -> str:
    """Where ``node`` runs, in words: the module path of a call, else the innermost module whose
    ``forward`` contains it."""
    if node.op == "call_module":
        return f"module `{node.target}`"
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        path, cls = list(stack.values())[-1]
        return f"module `{path}` ({getattr(cls, '__name__', cls)}.forward)"
    return f"the forward of the top-level {type(model).__name__}"


def _operation(node: fx.Node, modules: Mapping[str, nn.Module]) -> str:
    """``node``'s operation in words."""
    if node.op == "call_module":
        return f"the {type(modules[node.target]).__name__} layer"
    if node.op == "call_method":
        return f"the tensor method .{node.target}()"
    if node.target is getattr:
        return f"the attribute read .{node.args[1]}"
    words = _OPERATION_WORDS.get(node.target)
    if words is not None:
        return f"the {words}"
    name = getattr(node.target, "__name__", str(node.target))
    module = getattr(node.target, "__module__", None) or ""
    module = "torch" if module.startswith("torch") and hasattr(torch, name) else module
    return f"the function {module + '.' if module else ''}{name}"


def _is_tensor(arg: Any) -> bool:
    from torch.fx.passes.shape_prop import TensorMetadata

    return isinstance(arg, fx.Node) and isinstance(arg.meta.get("tensor_meta"), TensorMetadata)


def _is_shape_read(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _SHAPE_METHODS
    return node.op == "call_function" and node.target is getattr and node.args[1] in _SHAPE_ATTRIBUTES


def permutation_spec(model: nn.Module, example_input: Tensor) -> PermutationSpec:
    """Derive which weight axes share a permutation from an ``torch.fx`` trace of ``model``.

    Supported: ``Linear`` (on ``(N, C)`` inputs; on inputs of more dimensions it stays
    unpermuted), ``Conv1d/2d/3d`` (``groups=1``),
    ``BatchNorm1d/2d/3d`` (weight, bias, running statistics), element-wise activations and
    dropout, per-channel pooling, ``Flatten``/``flatten``/``view``/``reshape`` to ``(N, -1)``
    after a convolution (a channel permutation then moves whole blocks of the next Linear's
    inputs), multiplication/division by a constant, and additions (residual connections: both
    summands share one permutation; a summand that cannot move, such as the input, pins it).
    Reads of a tensor's metadata (``x.ndim``, ``x.shape``, ``x.size()``, ``x.dim()``, ``x.dtype``,
    ...) pass through: a permutation changes none of them.
    The network's inputs and outputs are never permuted. Anything else that would see a
    permuted tensor (LayerNorm, attention, concatenation, grouped convolutions, a module
    called twice, ...) raises ``ValueError`` naming the module path and the operation in words;
    such an operation is accepted where its input cannot move anyway (``log_softmax`` of the
    logits).

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
                    raise ValueError(
                        f"align: module `{node.target}` ({type(mod).__name__}) is called twice (shared weights) "
                        "and is not supported"
                    )
                called.add(node.target)
            prefix = f"{node.target}."
            if isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                if isinstance(mod, nn.Linear) and len(shape(node.args[0])) != 2:  # left unpermuted
                    refuse(node, f"the Linear layer on a {len(shape(node.args[0]))}-d input")
                if not isinstance(mod, nn.Linear) and mod.groups != 1:
                    refuse(node, f"the grouped {type(mod).__name__} (groups={mod.groups})")
                out_features = mod.weight.shape[0]
                g = st.new(out_features, node.target)
                st.axes[g].append(Axis(prefix + "weight", 0))
                if mod.bias is not None:
                    st.axes[g].append(Axis(prefix + "bias", 0))
                if is_moving(inp):
                    st.axes[st.find(inp.group)].append(Axis(prefix + "weight", 1, inp.block))
                labels[node] = _Label(g, 1, len(shape(node)))
            elif isinstance(mod, BatchNorm):
                if inp is None:
                    inp = fixed(node)
                if is_moving(inp) and inp.block != 1:
                    refuse(node, f"the {type(mod).__name__} layer after a flatten")
                root = st.find(inp.group)
                names = ["weight", "bias", "running_mean", "running_var"]
                names = [n for n in names if getattr(mod, n, None) is not None]
                if root != _FIXED:
                    st.axes[root] += [Axis(prefix + n, 0) for n in names]
                labels[node] = inp
            elif isinstance(mod, _ELEMENTWISE_MODULES) or (isinstance(mod, nn.PReLU) and mod.num_parameters == 1):
                labels[node] = inp if inp is not None else fixed(node)
            elif isinstance(mod, _CHANNELWISE_MODULES):
                if is_moving(inp) and inp.block != 1:
                    refuse(node, f"the {type(mod).__name__} layer after a flatten")
                labels[node] = inp if inp is not None else fixed(node)
            elif isinstance(mod, nn.Flatten):
                labels[node] = _flatten_label(node, inp, mod.start_dim, mod.end_dim, shape, refuse)
            else:
                if any(is_moving(lab) for lab in tensor_inputs(node)):
                    refuse(node, _operation(node, modules))
                labels[node] = fixed(node)
        elif node.op in ("call_function", "call_method"):
            ins = tensor_inputs(node)
            target = node.target
            if _is_shape_read(node) or not any(is_moving(lab) for lab in ins):
                labels[node] = fixed(node)
                return
            tensor_args = [a for a in node.args if _is_tensor(a)]
            if target in _ELEMENTWISE_FUNCTIONS or (node.op == "call_method" and target in _ELEMENTWISE_METHODS):
                labels[node] = label(node.args[0])
            elif target in _CHANNELWISE_FUNCTIONS:
                lab = label(node.args[0])
                if lab.block != 1:
                    refuse(node, f"{_operation(node, modules)} after a flatten")
                labels[node] = lab
            elif target in _SCALAR_OPS and len(tensor_args) == 1 and not node.kwargs:
                if node.args[0] is not tensor_args[0] and target in (operator.truediv, torch.div):
                    refuse(node, "the division of a constant by a tensor")
                labels[node] = label(tensor_args[0])
            elif target in _ADD_OPS and not node.kwargs:
                if len(tensor_args) == 1:  # x + constant: fine only for a scalar
                    const = node.args[1] if node.args[0] is tensor_args[0] else node.args[0]
                    if not isinstance(const, (int, float)) and not (
                        isinstance(const, fx.Node) and not _is_tensor(const)
                    ):
                        refuse(node, "the addition of a constant tensor")
                    labels[node] = label(tensor_args[0])
                    return
                a, b = label(tensor_args[0]), label(tensor_args[1])
                if a.block != b.block or shape(tensor_args[0]) != shape(tensor_args[1]):
                    shapes = f"{shape(tensor_args[0])} and {shape(tensor_args[1])}"
                    refuse(node, f"the addition of tensors of shapes {shapes}")
                g = st.union(a.group, b.group, f"align: the addition in {_location(node, model)}")
                labels[node] = _Label(g, a.block, a.ndim)
            elif (node.op == "call_function" and target in _FLATTEN_FUNCTIONS) or (
                node.op == "call_method" and target in _FLATTEN_METHODS
            ):
                lab = label(node.args[0])
                labels[node] = _reshape_label(node, lab, shape, refuse)
            else:
                refuse(node, _operation(node, modules))
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
            raise ValueError(
                f"align: {what} in {_location(node, model)} sees a permuted tensor, which align cannot permute "
                f"through (fx node {node.name!r}); supported: Linear, Conv with groups=1, BatchNorm, element-wise "
                "activations, per-channel pooling, flatten, scalar multiplication and additions"
            )

    roots = sorted({st.find(g) for g in st.size} - {_FIXED})
    groups = [st.axes[r] for r in roots]
    return PermutationSpec(
        sizes=[st.size[r] for r in roots], groups=groups, sources=[st.sources[r] for r in roots], in_objective=params
    )


def _flatten_label(
    node: fx.Node, inp: _Label | None, start: int, end: int, shape: Callable, refuse: Callable
) -> _Label:
    in_shape = shape(node.args[0])
    out_shape = shape(node)
    if inp is None or inp.group == _FIXED:
        return _Label(_FIXED, 1, len(out_shape))
    if len(in_shape) <= 2 and tuple(out_shape) == tuple(in_shape):
        return inp
    if start % len(in_shape) != 1 or end % len(in_shape) != len(in_shape) - 1:
        refuse(node, f"the flatten(start_dim={start}, end_dim={end})")
    return _Label(inp.group, inp.block * math.prod(in_shape[2:]), 2)


def _reshape_label(node: fx.Node, lab: _Label, shape: Callable, refuse: Callable) -> _Label:
    in_shape, out_shape = shape(node.args[0]), shape(node)
    if len(in_shape) < 2 or len(out_shape) != 2 or out_shape[0] != in_shape[0]:
        refuse(node, f"the {node.target} from shape {in_shape} to {out_shape}")
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


def apply_permutations(weights: Weights, spec: PermutationSpec, perms: Sequence[Tensor]) -> Weights:
    """``weights`` (a module or a state dict; returned as the same kind) with every group's
    permutation applied: unit ``i`` of group ``g`` becomes the old unit ``perms[g][i]``."""
    state = state_of(weights, "weights")
    if len(perms) != len(spec.groups):
        raise ValueError(f"`perms` must hold one permutation per group ({len(spec.groups)}), got {len(perms)}")
    out = dict(state)
    for g, axes in enumerate(spec.groups):
        perm = torch.as_tensor(perms[g], dtype=torch.long)
        if sorted(perm.tolist()) != list(range(spec.sizes[g])):
            raise ValueError(f"`perms`[{g}] is not a permutation of {spec.sizes[g]} units")
        for ax in axes:
            out[ax.name] = _permute_axis(out[ax.name], ax, perm.to(out[ax.name].device))
    return returned_as(weights, out)


def weight_matching(
    reference: AnyWeights,
    other: AnyWeights,
    spec: PermutationSpec,
    max_iter: int = 100,
    seed: int = 0,
) -> list[Tensor]:
    """Git Re-Basin weight matching (Ainsworth et al. 2023, Algorithm 1): coordinate descent over
    the permutation groups of ``spec``; each step solves ``max_P <A, P>`` with
    ``A = sum_(tensor, axis) W_ref(unit, :) W_other_permuted(unit, :)^T`` by
    ``scipy.optimize.linear_sum_assignment``. Groups are visited in a random order drawn from
    ``seed`` each sweep; stops after a sweep with no improvement (> 1e-12) or ``max_iter`` sweeps.

    ``reference`` and ``other`` are modules or state dicts.

    Returns:
        one permutation per group, for :func:`apply_permutations` on ``other``.
    """
    from scipy.optimize import linear_sum_assignment

    reference, other = state_of(reference, "reference"), state_of(other, "other")
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


def align(reference: AnyWeights, other: Weights, example_input: Tensor, max_iter: int = 100, seed: int = 0) -> Weights:
    """``other`` with its hidden units permuted to match ``reference`` by weight matching
    (:func:`weight_matching` over the :func:`permutation_spec` of the architecture). The result
    computes the same function as ``other`` (up to float rounding of reordered sums); a network
    that is a hidden-unit permutation of ``reference`` is mapped back onto it exactly.

    ``reference`` and ``other`` are modules or state dicts, at least one of them a module (the
    architecture is traced from it); the result is the kind of ``other``: a permuted deep copy of
    a module, or a permuted state dict.

    Args:
        reference: the model to align to (unchanged).
        other: the model to permute (unchanged).
        example_input: a batch of inputs for shape propagation.
        max_iter: most coordinate-descent sweeps.
        seed: seed of the order groups are visited in.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> a = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> b = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).state_dict()
        >>> sorted(align(a, b, torch.randn(3, 4)))  # a state dict in, a state dict out
        ['0.bias', '0.weight', '2.bias', '2.weight']
    """
    architecture = reference if isinstance(reference, nn.Module) else other
    if not isinstance(architecture, nn.Module):
        state_of(reference, "reference"), state_of(other, "other")  # a type error names a wrong kind first
        raise TypeError("align traces the architecture: pass `reference` or `other` as an nn.Module")
    spec = permutation_spec(architecture, example_input)
    ref_state, other_state = state_of(reference, "reference"), state_of(other, "other")
    check_states([ref_state, other_state], "models")
    perms = weight_matching(ref_state, other_state, spec, max_iter=max_iter, seed=seed)
    return apply_permutations(other, spec, perms)
