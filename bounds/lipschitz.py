"""Local Lipschitz constants by bound propagation through the backward (Jacobian) graph.

Method card: Shi et al. 2022, "Efficiently Computing Local Lipschitz Constants of Neural Networks
via Bound Propagation". For output ``k`` the input gradient is ``g = J_k(x)^T = M_1^T D_1 ... D_L
M_L^T e_k`` (``M_i`` the affine maps, ``D_i = diag(relu'(z_i))``), and its l1 norm is the l_inf ->
l1 local Lipschitz constant. Over the box every ``D_i`` is bounded from the pre-activation bounds
(``relu' = 1`` where ``l > 0``, ``0`` where ``u <= 0``, ``[0, 1]`` otherwise; CROWN bounds by
default), and ``g`` is carried backwards as an interval: ``M^T c`` and ``|M|^T r`` for its centre
``c`` and radius ``r`` (:attr:`~.relaxation.Linear.transpose` with ``absolute``), the product with
``[0, 1]`` by interval arithmetic. The bound is ``sum_j max(|lo_j|, |hi_j|)``.

litplug differs from the paper: the backward graph is bounded by intervals, not by their linear
(CROWN) relaxation of the products ``D_i g``, so the bound is looser where many neurons are
unstable; it is never below the true constant (tested against the largest gradient norm over
10,000 sampled points).

Example:
    >>> import torch
    >>> from torch import nn
    >>> from litplug.bounds import local_lipschitz
    >>> net = nn.Sequential(nn.Linear(3, 2))
    >>> x = torch.zeros(1, 3)
    >>> torch.allclose(local_lipschitz(net, x - 1, x + 1), net[0].weight.abs().sum(1)[None])
    True
"""

from __future__ import annotations

import torch
from torch import fx, nn

from .crown import Method, _accumulate, _Run, check_method
from .engine import bounded
from .interval import Interval, UnsupportedOperationError, where


@torch.no_grad()
def local_lipschitz(
    model: nn.Module, lower: torch.Tensor, upper: torch.Tensor, method: Method = "crown"
) -> torch.Tensor:
    """Upper bounds ``[B, K]`` on ``max over the box of ||d model(x)_k / dx||_1`` for each sample
    and output ``k`` (the l_inf -> l1 local Lipschitz constant of each output).

    Args:
        model: a network of the operators that have a linear relaxation (batch norm with fixed
            statistics: eval mode).
        lower, upper: the input box, batched like the network's input.
        method: how the ReLU pre-activation bounds are computed, ``"crown"`` or ``"crown-ibp"``
            (intervals).
    """
    check_method(method)
    if lower.shape != upper.shape:
        raise ValueError(
            f"`lower` and `upper` must have the same shape, got {tuple(lower.shape)} and {tuple(upper.shape)}"
        )
    engine = bounded(model)
    for node in engine.nodes:
        if node.op == "call_module" and isinstance(model.get_submodule(node.target), nn.modules.batchnorm._BatchNorm):
            bn = model.get_submodule(node.target)
            if bn.training or bn.running_mean is None:
                raise ValueError(f"local_lipschitz needs batch norm with fixed statistics (eval mode) at {where(node)}")
    run = _Run(engine, method, False)
    env = run.forward(lower, upper, None)
    out_node = engine.output.args[0]
    out: Interval = env[out_node]
    shape = out.radius.shape
    outputs = out.radius[0].numel()
    rows = torch.eye(outputs, dtype=out.radius.dtype, device=out.radius.device)
    centre = rows.view(outputs, 1, *shape[1:]).expand(outputs, shape[0], *shape[1:])
    pending: dict[fx.Node, list[torch.Tensor | None]] = {out_node: [centre, torch.zeros_like(centre)]}
    bound = None
    for node in reversed(engine.nodes[: run.index[out_node] + 1]):
        pair = pending.pop(node, None)
        if pair is None:
            continue
        c, r = pair
        assert c is not None and r is not None
        if node.op == "placeholder":
            bound = (c.abs() + r).flatten(2).sum(2).transpose(0, 1)
            continue
        step, inputs = run._step(node)
        linear = run._op(node).linear
        try:
            if linear.relax is not None:
                x = step.leaves[0]
                d_low, d_up = (x.lower > 0).to(c.dtype), (x.upper > 0).to(c.dtype)
                lo, hi = c - r, c + r
                products = torch.stack([lo * d_low, lo * d_up, hi * d_low, hi * d_up])
                lo, hi = products.amin(0), products.amax(0)
                moved = [[(hi + lo) / 2, (hi - lo) / 2]]
            else:
                centres = linear.transpose(step, c, False)
                radii = linear.transpose(step, r, True)
                moved = [[a, b] for a, b in zip(centres, radii)]
        except UnsupportedOperationError as err:
            raise UnsupportedOperationError(f"{err} (at {where(node)})") from None
        for source, item in zip(inputs, moved):
            _accumulate(pending, source, item)
    if bound is None:  # the output does not depend on the input
        return out.radius.new_zeros(shape[0], outputs)
    return bound
