"""Offline model-based optimisation data: designs of a black-box objective with the best ones
withheld (the Design-Bench protocol, Trabucco et al. 2022, https://arxiv.org/abs/2202.08450).

A task is a continuous objective on a box, *maximised*. ``OfflineDesigns`` samples
``num_samples`` designs uniformly in the box, scores them, keeps only those at or below the
``keep_percentile``-th percentile of the scores, and serves the kept designs and scores,
standardised, as a regression dataset ``(x, y)`` for a surrogate (``litplug.modules.Regressor``).
The true objective stays available through :meth:`OfflineDesigns.score` for the final evaluation
of proposed designs (``litplug.callbacks.GradientAscentSearch``), never for training.

Tasks:

* ``sphere`` (built in): ``-sum(x_i^2)`` on ``[-5.12, 5.12]^dim`` (default dim 8).
* ``ackley`` (dim 8), ``rosenbrock`` (dim 8), ``levy`` (dim 8), ``hartmann`` (dim 6, or 3, 4):
  BoTorch's synthetic test functions (``pip install 'litplug[offline]'``), negated so that higher
  is better, on BoTorch's default bounds. BoTorch is a well-kept, widely used implementation of
  these benchmarks (and of their constants, e.g. Hartmann's), so litplug does not re-type them;
  it is an optional extra because it pulls GPyTorch and linear_operator.

Example:
    >>> dm = OfflineDesigns(task="sphere", num_samples=1000, keep_percentile=50)
    >>> dm.setup()
    >>> x, y = next(iter(dm.train_dataloader()))
    >>> x.shape, y.shape
    (torch.Size([128, 8]), torch.Size([128]))
    >>> bool(dm.score(dm.designs).max() <= 1.0)  # kept designs never beat the full dataset
    True
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.data import TensorDataset

from ..validation import check_choice, check_int, check_number, check_positive_int
from .base import SeededDataModule

# name -> (BoTorch class, default dim); `sphere` is built in.
BOTORCH_TASKS: dict[str, tuple[str, int]] = {
    "ackley": ("Ackley", 8),
    "rosenbrock": ("Rosenbrock", 8),
    "levy": ("Levy", 8),
    "hartmann": ("Hartmann", 6),
}
TASKS = ("sphere", *BOTORCH_TASKS)


@dataclass(frozen=True)
class Task:
    """A black-box objective to maximise: ``objective(x)`` maps raw designs ``[N, dim]``
    (float64) to scores ``[N]``; designs live in the box ``[lower, upper]``."""

    name: str
    objective: Callable[[torch.Tensor], torch.Tensor]
    lower: torch.Tensor
    upper: torch.Tensor

    @property
    def dim(self) -> int:
        return self.lower.numel()


def _sphere(x: torch.Tensor) -> torch.Tensor:
    return -(x**2).sum(dim=-1)


def make_task(name: str, dim: int | None = None) -> Task:
    """Build task ``name`` (one of ``TASKS``) in ``dim`` dimensions (``None``: its default)."""
    if name not in TASKS:
        raise ValueError(f"`task` must be one of {list(TASKS)}, got {name!r}")
    if dim is not None and dim < 1:
        raise ValueError(f"`dim` must be >= 1, got {dim}")
    if name == "sphere":
        d = dim or 8
        return Task(
            name, _sphere, torch.full((d,), -5.12, dtype=torch.float64), torch.full((d,), 5.12, dtype=torch.float64)
        )
    cls_name, default_dim = BOTORCH_TASKS[name]
    try:
        import botorch.test_functions as test_functions
    except ImportError as err:
        raise ImportError(f"task {name!r} uses BoTorch: pip install 'litplug[offline]' ({err})") from err
    try:
        fn = getattr(test_functions, cls_name)(dim=dim or default_dim, negate=True)
    except ValueError as err:
        raise ValueError(f"`dim`={dim} is not supported by task {name!r}: {err}") from err
    bounds = fn.bounds.to(torch.float64)
    return Task(name, lambda x: fn(x, noise=False), bounds[0].clone(), bounds[1].clone())


def withhold_top(scores: torch.Tensor, keep_percentile: float) -> torch.Tensor:
    """Boolean mask of the designs kept offline: scores at or below the ``keep_percentile``-th
    percentile (linear interpolation, as ``numpy.percentile``)."""
    threshold = torch.quantile(scores, keep_percentile / 100.0)
    return scores <= threshold


class OfflineDesigns(SeededDataModule):
    """An offline model-based optimisation dataset of designs and their scores.

    An offline dataset of ``task`` (module docstring): batches ``(x, y)`` of standardised
    designs ``[B, dim]`` and standardised scores ``[B]`` (mean 0, std 1 over the kept data).

    Attributes after ``setup()``: ``designs``/``scores`` (all kept data, standardised; train and
    validation), ``lower``/``upper`` (the task's box in standardised coordinates),
    ``y_min``/``y_max`` (raw score range over *all* ``num_samples`` designs, withheld ones
    included: the normaliser of :meth:`score`).

    Args:
        task: one of ``sphere``, ``ackley``, ``rosenbrock``, ``levy``, ``hartmann``.
        dim: number of design variables (``None``: the task's default).
        num_samples: designs sampled uniformly in the box before withholding.
        keep_percentile: percentile of the scores at or below which designs are kept, in (0, 100).
        val_fraction: fraction of the kept designs held out to validate the surrogate.
        batch_size: samples per batch.
        seed: seed of the sampling, the split and the shuffling.
        num_workers: DataLoader workers.
    """

    def __init__(
        self,
        task: str = "sphere",
        dim: int | None = None,
        num_samples: int = 5000,
        keep_percentile: float = 50.0,
        val_fraction: float = 0.1,
        batch_size: int = 128,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size, val_fraction, seed, num_workers)
        check_choice("task", task, list(TASKS))
        check_positive_int("dim", dim, allow_none=True)
        check_int("num_samples", num_samples, low=20)
        check_number("keep_percentile", keep_percentile, 0, 100, low_open=True, high_open=True)
        self.task = make_task(task, dim)
        self.num_samples = num_samples
        self.keep_percentile = keep_percentile
        self.input_shape = (self.task.dim,)
        self.designs: torch.Tensor | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.designs is not None:
            return
        gen = torch.Generator().manual_seed(self.seed)
        lo, hi = self.task.lower, self.task.upper
        x = lo + (hi - lo) * torch.rand(self.num_samples, self.task.dim, generator=gen, dtype=torch.float64)
        y = self.task.objective(x)
        self.y_min, self.y_max = float(y.min()), float(y.max())
        keep = withhold_top(y, self.keep_percentile)
        x, y = x[keep], y[keep]
        self.x_mean, self.x_std = x.mean(0), x.std(0)
        self.y_mean, self.y_std = y.mean(), y.std()
        self.designs = self.standardise(x)
        self.scores = ((y - self.y_mean) / self.y_std).float()
        self.lower, self.upper = self.standardise(lo), self.standardise(hi)
        perm = torch.randperm(len(y), generator=gen)
        n_val = max(2, int(round(self.val_fraction * len(y))))
        val_idx, train_idx = perm[:n_val], perm[n_val:]
        self.train_set = TensorDataset(self.designs[train_idx], self.scores[train_idx])
        self.val_set = TensorDataset(self.designs[val_idx], self.scores[val_idx])

    def standardise(self, x: torch.Tensor) -> torch.Tensor:
        """Raw designs -> the surrogate's inputs (float32)."""
        return ((x.to(torch.float64) - self.x_mean) / self.x_std).float()

    def unstandardise(self, x: torch.Tensor) -> torch.Tensor:
        """The surrogate's inputs -> raw designs (float64), clipped to the task's box (float32
        round-off can overshoot it)."""
        raw = x.detach().cpu().to(torch.float64) * self.x_std + self.x_mean
        return torch.maximum(torch.minimum(raw, self.task.upper), self.task.lower)

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised true score ``(f(x) - y_min) / (y_max - y_min)`` of standardised designs
        ``x`` (float64, on the CPU): 1 is the best design of the full dataset, withheld ones
        included. For final evaluation only."""
        return (self.task.objective(self.unstandardise(x)) - self.y_min) / (self.y_max - self.y_min)
