"""Backward linear bounds: CROWN (Zhang et al. 2018) and CROWN-IBP (Zhang et al., ICLR 2020).

A bound on ``spec @ f(x)`` over the box ``[l, u]`` is built backwards from the output: the
coefficients ``A`` (one row per specification row) cross every operator by its linear relaxation
(:mod:`.relaxation`: ``M^T A`` at affine maps, the ReLU slopes chosen by the sign of ``A``), and at
the input ``A x + c`` is minimised over the box: ``A centre - |A| radius + c``. ReLU relaxations need
the pre-activation bounds of every ReLU input: ``method="crown"`` computes them by the same
backward pass from that node (one row per neuron, in chunks), ``method="crown-ibp"`` takes the
interval (IBP) bounds of one forward pass. A node reached from the input through one affine layer
(and batch norms or reshapes) gets its IBP bounds in both methods: they are exact there.

Cost: ``crown-ibp`` is one interval forward pass and one backward pass with ``S`` rows (``S``
specification rows, e.g. one per class for margins: the specification is folded into the last
linear layer by the backward pass itself); ``crown`` adds one backward pass per ReLU layer with
one row per neuron.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from litplug.bounds import crown_bounds, interval_bounds
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> x = torch.rand(5, 4)
    >>> lower, upper = crown_bounds(net, x - 0.1, x + 0.1)
    >>> bool((lower <= net(x)).all() and (net(x) <= upper).all())
    True
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import torch
from torch import fx, nn

from ..plumbing.third_party_private import tree_flatten, tree_leaves, tree_unflatten
from .engine import BoundedNetwork, _get_attr, _has_interval, bounded, check_box
from .fused import ReLURelaxation
from .interval import Interval, Pass, UnsupportedOperationError, name_of, where
from .ops import reads_centre
from .relaxation import Step, batch_norm_affine, conv_transpose_offset

Method = Literal["crown", "crown-ibp"]
METHODS = ("crown", "crown-ibp")

_CHUNK_ELEMENTS = 1 << 23
"""Rows of an intermediate bound's backward pass are processed in chunks of about this many
coefficient elements (per node), so that ``method="crown"`` on conv layers stays in memory."""


class LinearResult(NamedTuple):
    """``lower``/``upper``: CROWN bounds (``upper`` None when not asked); ``ibp_lower``/``ibp_upper``:
    the interval bounds of the same forward pass; ``clean``: the clean output (or None); ``relu``:
    the pre-activation bounds of every ReLU used by the relaxation (when recorded); ``nodes``: the
    ReLU input nodes in the same order."""

    lower: torch.Tensor
    upper: torch.Tensor | None
    ibp_lower: torch.Tensor
    ibp_upper: torch.Tensor
    clean: torch.Tensor | None
    relu: list[tuple[torch.Tensor, torch.Tensor]]
    ibp_relu: list[tuple[torch.Tensor, torch.Tensor]]


def check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {list(METHODS)}, got {method!r}")


def check_spec(spec: torch.Tensor, batch: int, outputs: int) -> None:
    if spec.dim() != 3 or spec.shape[0] != batch or spec.shape[2] != outputs:
        raise ValueError(
            f"`spec` must have shape [batch, rows, outputs] = [{batch}, S, {outputs}], got {tuple(spec.shape)}"
        )


def crown_bounds(
    model: nn.Module,
    lower: torch.Tensor,
    upper: torch.Tensor,
    method: Method = "crown",
    spec: torch.Tensor | None = None,
    grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lower and upper bounds of ``spec @ model(x)`` (of ``model(x)`` when ``spec`` is None) over the
    input box ``[lower, upper]``, by backward linear bound propagation.

    Args:
        model: the network (as for :func:`~.engine.interval_bounds`; batch norm uses its running
            statistics in eval mode).
        lower, upper: the input box, batched like the network's input, of the network's dtype.
        method: ``"crown"`` (intermediate bounds by CROWN) or ``"crown-ibp"`` (by IBP). The
            bounds are tightened as :func:`linear_bounds` with ``tighten=True`` describes (never
            looser than IBP's, and ``"crown"`` never looser than ``"crown-ibp"``).
        spec: optional ``[B, S, K]`` matrix for a network with ``K`` outputs; the bounds are then
            ``[B, S]``.
        grad: build the autograd graph (training through the bounds); off by default.

    Raises:
        UnsupportedOperationError: an operation without a linear relaxation (e.g. max-pooling),
            named with its module path or graph node.
        ValueError: a bad ``method`` or ``spec`` shape; a box that is empty, holds NaN or infinity or no sample, is not
            batched like the network's input, or whose dtype or device differs from the network's
            parameters (it is not cast: convert the box or the network).

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
        >>> lo, up = crown_bounds(net, torch.zeros(1, 2), torch.zeros(1, 2))
        >>> torch.allclose(lo, net(torch.zeros(1, 2))) and torch.allclose(up, lo)
        True
    """
    check_method(method)
    with torch.set_grad_enabled(grad):
        result = linear_bounds(bounded(model), lower, upper, method, spec, tighten=True)
    assert result.upper is not None
    return result.lower, result.upper


def linear_bounds(
    engine: BoundedNetwork,
    lower: torch.Tensor,
    upper: torch.Tensor,
    method: Method,
    spec: torch.Tensor | None = None,
    clean: torch.Tensor | None = None,
    bound_upper: bool = True,
    record_relu: bool = False,
    tighten: bool = False,
) -> LinearResult:
    """CROWN bounds and the interval bounds of the same forward pass (for CROWN-IBP training,
    which mixes both). ``clean`` is carried along as in the interval engine (batch-norm
    statistics in train mode, the clean output); ``record_relu`` collects the pre-activation
    bounds that the relaxation uses (``relu``) and the interval ones (``ibp_relu``).

    ``tighten=False``: the bounds of the papers (and of auto_LiRPA with
    ``sparse_intermediate_bounds`` off). ``tighten=True`` (what :func:`crown_bounds`, margin
    bounds and verification use): CROWN's intermediate bounds are intersected with the interval
    bounds of the same node, and the final bounds are the tighter of CROWN, CROWN-IBP (for
    ``method="crown"``) and IBP: all are sound, so each of these is too, and the ordering
    IBP <= CROWN-IBP <= CROWN holds by construction."""
    check_method(method)
    check_box(engine, lower, upper)
    run = _Run(engine, method, record_relu, tighten)
    env = run.forward(lower, upper, clean)
    out_node = engine.output.args[0]
    out: Interval = env[out_node]
    batch = lower.shape[0]
    if spec is not None:
        if out.radius.dim() != 2:
            raise ValueError(f"`spec` needs a network with outputs [batch, K], got {tuple(out.radius.shape)}")
        check_spec(spec, batch, out.radius.shape[1])
        spec = spec.to(out.radius.dtype)
        if engine.elide is not None:  # interval bounds with the last layer elided, as the interval engine
            folded = engine._elided(Pass(engine.model, True, False, None), engine.elide, run.env, spec)
            ibp_lower, ibp_upper = folded.lower, folded.upper
        else:
            ibp_centre = torch.einsum("bsk,bk->bs", spec, out.centre)
            ibp_radius = torch.einsum("bsk,bk->bs", spec.abs(), out.radius)
            ibp_lower, ibp_upper = ibp_centre - ibp_radius, ibp_centre + ibp_radius
        lo, up = _spec_bounds(run, out_node, spec, bound_upper)
    else:
        ibp_lower, ibp_upper = out.lower, out.upper
        lo, up = run.node_bounds(out_node, bound_upper)
    if tighten:
        lo = torch.maximum(lo, ibp_lower)
        up = torch.minimum(up, ibp_upper) if up is not None else None
        if method == "crown":
            base = linear_bounds(engine, lower, upper, "crown-ibp", spec, clean, bound_upper, False, True)
            lo = torch.maximum(lo, base.lower)
            up = torch.minimum(up, base.upper) if up is not None and base.upper is not None else None
    return LinearResult(lo, up, ibp_lower, ibp_upper, out.clean, run.relu, run.ibp_relu)


def _spec_bounds(
    run: _Run, out_node: fx.Node, spec: torch.Tensor, bound_upper: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Bounds ``[B, S]`` of ``spec @ output`` by one backward pass. Rows that are zero (the true
    class of a margin specification) are bounded by 0 without a backward row, when every sample
    has as many of them (margins: one each, so the pass carries ``K - 1`` rows, not ``K``)."""
    batch, rows = spec.shape[:2]
    live = spec.ne(0).any(2)
    counts = live.sum(1)
    kept = int(counts[0])
    if 0 < kept < rows and bool((counts == kept).all()):
        index = live.nonzero()[:, 1].view(batch, kept)
        spec = spec.gather(1, index[:, :, None].expand(-1, -1, spec.shape[2]))
    else:
        index = None
    a = spec.transpose(0, 1)
    lo, up = run.backward(out_node, a, a if bound_upper else None)
    lo, up = lo.transpose(0, 1), up.transpose(0, 1) if up is not None else None
    if index is None:
        return lo, up
    lo = lo.new_zeros(batch, rows).scatter(1, index, lo)
    return lo, up.new_zeros(batch, rows).scatter(1, index, up) if up is not None else None


class _Run:
    """One bound computation: the forward pass (interval bounds of every node, CROWN bounds of the
    ReLU inputs for ``method="crown"``) and the backward passes over it."""

    def __init__(self, engine: BoundedNetwork, method: Method, record_relu: bool, tighten: bool = False) -> None:
        self.engine, self.method, self.tighten = engine, method, tighten
        self.model = engine.model
        self.index = {n: i for i, n in enumerate(engine.nodes)}
        self.env: dict[fx.Node, Any] = {}
        self.relu: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.ibp_relu: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.record = record_relu
        self.needs = {n.args[0] for n in engine.nodes if _is_relu(self._op(n)) and isinstance(n.args[0], fx.Node)}
        self.folds = {n: n.args[0] for n in engine.nodes if self._folds(n)}

    def _op(self, node: fx.Node) -> Any:
        return self.engine._ops.get(node)

    def _folds(self, node: fx.Node) -> bool:
        """Whether ``node`` is a batch norm applied to a Linear/Conv module node used nowhere else:
        the backward pass then crosses both as one affine map (batch norm folded into the weight)."""
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            return False
        if not isinstance(self.model.get_submodule(node.target), (nn.BatchNorm1d, nn.BatchNorm2d)):
            return False
        source = node.args[0]
        if not isinstance(source, fx.Node) or source.op != "call_module" or len(source.users) != 1:
            return False
        return type(self.model.get_submodule(source.target)) in (nn.Linear, nn.Conv1d, nn.Conv2d)

    def forward(self, lower: torch.Tensor, upper: torch.Tensor, clean: torch.Tensor | None) -> dict[fx.Node, Any]:
        p = Pass(self.model, True, False, None)
        env = self.env
        for node in self.engine.nodes:
            if node.op == "placeholder":
                env[node] = Interval.input(lower, upper, clean)
            elif node.op == "output":
                break
            else:
                env[node] = self._run(p, node)
                if node in self.needs and isinstance(env[node], Interval):
                    self._bound_relu_input(node)
        return env

    def _run(self, p: Pass, node: fx.Node) -> Any:
        env = self.env
        if node.op == "get_attr":
            return _get_attr(self.model, node.target)
        args = fx.node.map_arg(node.args, env.__getitem__)
        kwargs = fx.node.map_arg(node.kwargs, env.__getitem__)
        target = self.model.get_submodule(node.target) if node.op == "call_module" else node.target
        if not (_has_interval(args) or _has_interval(kwargs.values())):
            if node.op == "call_method":
                return getattr(args[0], target)(*args[1:], **kwargs)
            return target(*args, **kwargs)
        op = self._op(node)
        if op.linear is None and not reads_centre(node):
            shown = type(target).__name__ if node.op == "call_module" else name_of(target)
            raise UnsupportedOperationError(
                f"operation {shown} at {where(node)} has no linear relaxation (CROWN); interval_bounds supports it"
            )
        p.owned = False  # the boxes of every node stay as computed (the backward passes read them)
        if p.fused and op.fused is not None:
            out = op.fused(p, target, args, kwargs)
            if out is not None:
                return out
        return op.rule(p, target, args, kwargs)

    def _bound_relu_input(self, node: fx.Node) -> None:
        box: Interval = self.env[node]
        if self.method == "crown" and not self._exact(node):
            lo, up = self.node_bounds(node, True)
            assert up is not None
            if self.tighten:  # both enclose the node: so does their intersection
                lo, up = torch.maximum(lo, box.lower), torch.minimum(up, box.upper)
            self.env[node] = Interval.of((up + lo) / 2, (up - lo) / 2, box.clean)
            if self.record:
                self.ibp_relu.append((box.lower, box.upper))
        elif self.record:
            self.ibp_relu.append((box.lower, box.upper))
        if self.record:
            new = self.env[node]
            self.relu.append((new.lower, new.upper))

    def _exact(self, node: fx.Node) -> bool:
        """Whether interval bounds are exact at ``node``: it is reached from the input through one
        single-input chain with at most one Linear/Conv and otherwise batch norms and reshapes."""
        weighted = 0
        while node.op != "placeholder":
            args = [a for a in node.all_input_nodes if isinstance(self.env.get(a), Interval)]
            if len(args) != 1 or node.op != "call_module":
                if node.op == "call_method" and node.target in ("view", "reshape", "flatten") and len(args) == 1:
                    node = args[0]
                    continue
                return False
            m = self.model.get_submodule(node.target)
            if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
                weighted += 1
            elif not isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.Flatten, nn.Identity)):
                return False
            if weighted > 1:
                return False
            node = args[0]
        return True

    def node_bounds(self, node: fx.Node, bound_upper: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """CROWN bounds of every element of ``node`` (shape of the node), rows in chunks."""
        box: Interval = self.env[node]
        shape = box.radius.shape
        batch, n = shape[0], box.radius[0].numel()
        widest = max(v.radius[0].numel() for v in self.env.values() if isinstance(v, Interval))
        chunk = max(1, _CHUNK_ELEMENTS // max(1, batch * widest))
        eye = torch.eye(n, dtype=box.radius.dtype, device=box.radius.device)
        lows, ups = [], []
        for start in range(0, n, chunk):
            rows = eye[start : start + chunk].view(-1, 1, *shape[1:]).expand(-1, batch, *shape[1:])
            lo, up = self.backward(node, rows, rows if bound_upper else None)
            lows.append(lo)
            ups.append(up)
        lower = torch.cat(lows).transpose(0, 1).reshape(shape)
        upper = torch.cat(ups).transpose(0, 1).reshape(shape) if bound_upper else None
        return lower, upper

    def backward(
        self, start: fx.Node, lower_a: torch.Tensor | None, upper_a: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Bounds ``[S, B]`` of ``<A, value of start>`` for coefficients ``A`` (``[S, B, *shape]``),
        lower with ``lower_a``, upper with ``upper_a`` (None: not computed)."""
        pending: dict[fx.Node, list[torch.Tensor | None]] = {start: [lower_a, upper_a]}
        ref = lower_a if lower_a is not None else upper_a
        assert ref is not None
        const = [ref.new_zeros(ref.shape[:2]), ref.new_zeros(ref.shape[:2])]
        result: list[torch.Tensor | None] = [None, None]
        for node in reversed(self.engine.nodes[: self.index[start] + 1]):
            coeffs = pending.pop(node, None)
            if coeffs is None:
                continue
            value = self.env[node]
            if node.op == "placeholder":
                for side, a in enumerate(coeffs):
                    if a is not None:
                        sign = -1.0 if side == 0 else 1.0
                        centre = (a * value.centre).flatten(2).sum(2)
                        radius = (a.abs() * value.radius).flatten(2).sum(2)
                        result[side] = centre + sign * radius + const[side]
                continue
            if node in self.folds and isinstance(self.env[self.folds[node]], Interval):
                source, moved_pair = self._folded(node, coeffs, const)
                _accumulate(pending, source, moved_pair)
                continue
            step, inputs = self._step(node)
            linear = self._op(node).linear
            try:
                if linear.relax is not None:
                    new = [self._relu(linear, step, a, side) for side, a in enumerate(coeffs)]
                    for side, item in enumerate(new):
                        if item is not None:
                            const[side] = const[side] + item[1]
                    per_input = [[new[0][0] if new[0] else None, new[1][0] if new[1] else None]]
                else:
                    moved = [linear.transpose(step, a, False) if a is not None else None for a in coeffs]
                    if linear.offset is not None:
                        for side, a in enumerate(coeffs):
                            if a is not None:
                                const[side] = const[side] + linear.offset(step, a)
                    per_input = [[m[i] if m is not None else None for m in moved] for i in range(len(inputs))]
            except UnsupportedOperationError as err:
                raise UnsupportedOperationError(f"{err} (at {where(node)})") from None
            for source, pair in zip(inputs, per_input):
                _accumulate(pending, source, pair)
        # Coefficients that never reach the input (the spec of a constant output) leave the constant.
        return (
            result[0] if result[0] is not None else const[0],
            (result[1] if result[1] is not None else const[1]) if upper_a is not None else None,
        )

    def _folded(
        self, node: fx.Node, coeffs: list[torch.Tensor | None], const: list[torch.Tensor]
    ) -> tuple[fx.Node, list[torch.Tensor | None]]:
        """Batch norm ``node`` and the Linear/Conv before it as one affine map ``x -> F (W x + b) + o``
        (``F``, ``o`` per channel): the coefficients of ``x`` are ``(F W)^T A`` (``F`` folded into
        a conv's weight, into ``A`` at a Linear) and the constant is ``<sum of A over positions,
        F b + o>``: passes over ``A`` fewer than crossing them apart."""
        affine = self.folds[node]
        m = self.model.get_submodule(affine.target)
        factor, offset = batch_norm_affine(self.model.get_submodule(node.target), self.env[affine])
        shift = offset if m.bias is None else torch.addcmul(offset, factor, m.bias)
        source = affine.args[0]
        moved: list[torch.Tensor | None] = []
        for side, a in enumerate(coeffs):
            if a is None:
                moved.append(None)
                continue
            if isinstance(m, nn.Linear):  # A is the smaller of A and W here (few rows, wide layer)
                const[side] = const[side] + a @ shift
                moved.append((a * factor) @ m.weight)
            else:  # a conv's weight is the smaller: scale it
                weight = m.weight * factor.view(-1, *[1] * (m.weight.dim() - 1))
                out, offset = conv_transpose_offset(m, weight, a, self.env[source].radius.shape, shift)
                const[side] = const[side] + offset
                moved.append(out)
        return source, moved

    def _step(self, node: fx.Node) -> tuple[Step, list[fx.Node]]:
        env = self.env
        args = fx.node.map_arg(node.args, env.__getitem__)
        kwargs = fx.node.map_arg(node.kwargs, env.__getitem__)
        target = self.model.get_submodule(node.target) if node.op == "call_module" else node.target
        flat_nodes = tree_leaves((node.args, node.kwargs))
        inputs = [n for n in flat_nodes if isinstance(n, fx.Node) and isinstance(env[n], Interval)]
        leaves, tree = tree_flatten((args, kwargs))

        def call(*tensors: torch.Tensor) -> torch.Tensor:
            it = iter(tensors)
            a, k = tree_unflatten([next(it) if isinstance(v, Interval) else v for v in leaves], tree)
            if node.op == "call_method":
                return getattr(a[0], target)(*a[1:], **k)
            return target(*a, **k)

        return Step(target, args, kwargs, call), inputs

    @staticmethod
    def _relu(linear: Any, step: Step, a: torch.Tensor | None, side: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        if a is None:
            return None
        slope_low, slope_up, intercept = linear.relax(step.leaves[0])
        # lower bound: positive coefficients take the lower line, negative the upper; upper: the reverse
        if side == 0:
            return ReLURelaxation.apply(a, slope_low.detach(), slope_up, intercept, True)
        return ReLURelaxation.apply(a, slope_up, slope_low.detach(), intercept, False)


def _accumulate(pending: dict[fx.Node, list[torch.Tensor | None]], node: fx.Node, pair: list) -> None:
    old = pending.get(node)
    if old is None:
        pending[node] = list(pair)
        return
    pending[node] = [x if y is None else y if x is None else x + y for x, y in zip(old, pair)]


def _is_relu(op: Any) -> bool:
    return op is not None and op.linear is not None and op.linear.relax is not None
