"""Model merging on state dicts: permutation alignment (Git Re-Basin weight matching), linear
interpolation and loss barriers, task arithmetic, TIES-merging and MAP's amortised Pareto fronts.

Method card
    * :func:`align` (Ainsworth et al. 2023, "Git Re-Basin: Merging Models modulo Permutation
      Symmetries", Algorithm 1 "weight matching"): hidden units of a network can be permuted
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
      to exactly its ``int(density * d)`` largest magnitudes over the whole model (or per tensor,
      ``trim="tensor"``, as mergekit), elect each entry's sign
      as the sign of the sum of the trimmed vectors, and average only the entries that agree with
      it (disjoint mean); ``theta = theta_0 + lambda * tau_m``.
    * :func:`linear` (Wortsman et al. 2022): weighted average ``sum_i w_i theta_i / sum_i w_i``.
    * :func:`slerp` (Shoemake 1985, as mergekit): per tensor, the angle between the two directions
      is interpolated; near-parallel tensors (``|cos| > 0.9995``) are interpolated linearly.
    * :func:`dare` (Yu et al. 2024): Bernoulli(``density``) drop of task-vector entries, kept ones
      rescaled by ``1 / density`` (seeded generator), summed or TIES-merged.
    * :func:`della` (Deep et al. 2024): MagPrune, a drop whose keep probability grows with the
      magnitude's rank, ``1 / p`` rescale, TIES-merged or summed.
    * :func:`breadcrumbs` (Davari & Belilovsky 2024): drop the ``gamma`` share of largest and keep
      the next ``density`` share of magnitudes per tensor, summed or TIES-merged.
    * :func:`model_stock` (Jang et al. 2024): per tensor ``t = N cos / (1 + (N - 1) cos)`` from the
      fine-tunes' mean pairwise cosine, ``t * mean + (1 - t) * base``.
    * :func:`map_pareto_front` (Li et al. 2024, "MAP: Low-compute Model Merging with Amortized
      Pareto Fronts via Quadratic Approximation"): each task's metric of the merged model
      ``theta_0 + sum_t c_t tau_t`` is approximated by a quadratic in the coefficients ``c``,
      fitted by least squares to a few evaluations; the fitted surrogates are then evaluated for
      free on many candidate ``c`` and their non-dominated set is the amortised Pareto front.
      :func:`grid_pareto_front` is the brute-force reference it is compared with.

All functions take modules or state dicts (``dict[str, Tensor]``) of one architecture alike and
return the kind of their first model argument (a deep copy of a module holding the merged
weights, or a state dict); floating tensors are merged in float32 (float64 for float64 models),
integer tensors (``num_batches_tracked``) are taken from the first/base state.

Example:
    >>> import torch
    >>> from torch import nn
    >>> a = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> b = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> b_aligned = align(a, b, torch.randn(3, 4))
    >>> x = torch.randn(5, 4)
    >>> torch.allclose(b_aligned(x), b(x), atol=1e-6)
    True
    >>> mid = interpolate(a, b_aligned, 0.5)  # a module, as given
    >>> mid_state = interpolate(a.state_dict(), b_aligned.state_dict(), 0.5)  # a state dict
"""

from __future__ import annotations

from .arithmetic import interpolate, linear, task_arithmetic
from .barrier import Barrier, barrier, evaluate_classifier
from .breadcrumbs import breadcrumbs
from .dare import dare
from .della import della
from .model_stock import model_stock
from .pareto import MAPResult, QuadraticFit, fit_quadratic, grid_pareto_front, map_pareto_front, pareto_mask
from .permutation import PermutationSpec, align, apply_permutations, permutation_spec, weight_matching
from .slerp import slerp
from .task_vectors import task_vector
from .ties import ties_merge

__all__ = [
    "Barrier",
    "MAPResult",
    "PermutationSpec",
    "QuadraticFit",
    "align",
    "apply_permutations",
    "barrier",
    "breadcrumbs",
    "dare",
    "della",
    "evaluate_classifier",
    "fit_quadratic",
    "grid_pareto_front",
    "interpolate",
    "linear",
    "map_pareto_front",
    "model_stock",
    "pareto_mask",
    "permutation_spec",
    "slerp",
    "task_arithmetic",
    "task_vector",
    "ties_merge",
    "weight_matching",
]
