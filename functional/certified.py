"""Certified training cores (Shi et al. 2021; Gowal et al. 2018; Mao et al. 2023): the eps
schedule of the short warmup, IBP initialisation, a PGD attack and the linearised tightness.

:class:`litplug.callbacks.IBPWarmup` drives :func:`eps_schedule` and :func:`ibp_init_`;
:class:`litplug.modules.CertifiedClassifier` uses :func:`pgd_attack` and
:func:`linearized_tightness`. The bounds themselves are in :mod:`litplug.bounds`.

The smoothed schedule: 0 before the ramp, then ``eps * a * (p / mid)^beta`` for the first ``mid``
fraction of the ramp (progress ``p``) and linear to ``eps`` after, with
``a = mid / (beta (1 - mid) + mid)`` so value and slope are continuous.
"""

from __future__ import annotations

import math
import operator
from typing import Literal

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..bounds import bounded

__all__ = ["Schedule", "eps_schedule", "ibp_init_", "linearized_tightness", "pgd_attack"]

Schedule = Literal["smoothed", "linear"]


def eps_schedule(
    progress: float, eps: float, schedule: Schedule = "smoothed", mid: float = 0.25, beta: float = 4.0
) -> float:
    """Scheduled eps at ramp ``progress`` (clamped to [0, 1]) towards the target ``eps``.

    Example:
        >>> eps_schedule(0.0, 0.1), eps_schedule(1.0, 0.1), eps_schedule(0.5, 0.1, "linear")
        (0.0, 0.1, 0.05)
    """
    p = min(max(progress, 0.0), 1.0)
    if schedule == "linear":
        return eps * p
    a = mid / (beta * (1 - mid) + mid)
    if p < mid:
        return eps * a * (p / mid) ** beta
    return eps * (a + (1 - a) * (p - mid) / (1 - mid))


def _is_weighted(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))


@torch.no_grad()
def ibp_init_(network: nn.Module) -> list[str]:
    """IBP initialisation (Shi et al. 2021, Sec. 4.1) in place; returns the re-initialised module
    names. Each Linear/Conv layer but the last one run gets ``N(0, (sqrt(2 pi) / fan_in)^2)``
    weights, ``std / 2`` on a residual branch (its output flows without forking into a residual add).

    Example:
        >>> net = nn.Sequential(nn.Linear(100, 50), nn.ReLU(), nn.Linear(50, 10))
        >>> ibp_init_(net)
        ['0']
        >>> round(float(net[0].weight.detach().std()), 3) == round(math.sqrt(2 * math.pi) / 100, 3)
        True
    """
    graph = fx.symbolic_trace(network).graph
    layers = [n for n in graph.nodes if n.op == "call_module" and _is_weighted(network.get_submodule(n.target))]
    names = []
    for node in layers[:-1]:
        module = network.get_submodule(node.target)
        fan_in = module.weight[0].numel()
        std = math.sqrt(2 * math.pi) / fan_in
        if _feeds_residual(node, network):
            std /= 2
        module.weight.normal_(0.0, std)
        names.append(node.target)
    return names


def _feeds_residual(node: fx.Node, network: nn.Module) -> bool:
    """Whether ``node`` sits on a residual branch: its output flows, without forking, into an add
    of two computed tensors before reaching another Linear/Conv."""
    while len(node.users) == 1:
        (node,) = node.users
        if node.op == "call_function" and node.target in (operator.add, torch.add, operator.iadd):
            return sum(isinstance(a, fx.Node) for a in node.args) == 2
        if node.op == "call_module" and _is_weighted(network.get_submodule(node.target)):
            return False
    return False


def pgd_attack(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, steps: int
) -> torch.Tensor:
    """L-inf PGD (Madry et al. 2018) inside the box ``[lower, upper]`` from the clean ``x``
    (deterministic: no random start), step ``2.5 * radius / steps``, maximising cross-entropy."""
    step = 2.5 * (upper - lower) / 2 / steps
    with torch.inference_mode(False), torch.enable_grad():
        x, y, lower, upper, step = (t.clone() for t in (x, y, lower, upper, step))
        adv = x.clone()
        for _ in range(steps):
            adv.requires_grad_(True)
            (grad,) = torch.autograd.grad(F.cross_entropy(model(adv), y), adv)
            adv = torch.minimum(torch.maximum(adv.detach() + step * grad.sign(), lower), upper)
    return adv.detach()


def linearized_tightness(model: nn.Module, x: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """Tightness of Mao et al. 2023 ("Understanding Certified Training with Interval Bound
    Propagation"): for the network linearised at ``x`` (eval mode, activation pattern fixed), the
    ratio of the optimal box radius ``|J| r`` to the IBP radius of the same linear network,
    averaged over samples and outputs (1 = IBP exact, small = loose)."""
    engine = bounded(model)
    with torch.inference_mode(False), torch.enable_grad():
        x, radius = x.clone().requires_grad_(True), radius.clone()
        out = model(x)
        optimal = []
        for k in range(out.shape[-1]):
            (grad,) = torch.autograd.grad(out[:, k].sum(), x, retain_graph=True)
            optimal.append((grad.abs() * radius).flatten(1).sum(1))
        optimal_r = torch.stack(optimal, 1)
    with torch.no_grad():
        ibp_r = engine.linearized_radius(x.detach(), radius)
    return (optimal_r / ibp_r.clamp(min=1e-12)).mean()
