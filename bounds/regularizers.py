"""The warmup regularizers of certified training on the ReLU pre-activation bounds."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .fused import ReLUStatistics, can_fuse, relu_statistics


def warmup_regularizers(
    relu_bounds: Sequence[tuple[torch.Tensor, torch.Tensor]],
    input_radius: torch.Tensor,
    tolerance: float,
    fused: bool = True,
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
        fused: compute the per-layer statistics with a hand-written backward where it applies (the
            default); False uses plain autograd (same values and gradients, slower).
    """
    zero = input_radius.new_zeros(())
    if not relu_bounds:
        return zero, zero
    r0 = input_radius.mean()
    tight, balance = zero, zero
    for lower, upper in relu_bounds:
        statistics = ReLUStatistics.apply if fused and can_fuse(lower) else relu_statistics
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
