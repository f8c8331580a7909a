"""Loss and error barriers along the linear path between two models (see :mod:`litplug.merging`)."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..plumbing import training_mode
from .arithmetic import interpolate
from .permutation import align
from .states import AnyWeights, state_of


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
    loss = correct = count = 0.0
    device = next(model.parameters()).device
    with training_mode(model, False):
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            logits = model(x)
            loss += F.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(-1) == y).sum().item()
            count += len(y)
    return loss / count, correct / count


def barrier(
    model_a: AnyWeights,
    model_b: AnyWeights,
    batches: Any,
    alphas: Sequence[float] | int = 11,
    align_first: bool = False,
    example_input: Tensor | None = None,
    logger: Any = None,
    prefix: str = "merge/barrier",
) -> Barrier:
    """Evaluate the linear path between two classifiers and its loss barrier.

    Args:
        model_a, model_b: two networks of one architecture (unchanged), modules or state dicts,
            at least one of them a module (evaluated with the other's weights loaded into a copy).
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
    architecture = model_a if isinstance(model_a, nn.Module) else model_b
    if not isinstance(architecture, nn.Module):
        state_of(model_a, "model_a"), state_of(model_b, "model_b")  # a type error names a wrong kind first
        raise TypeError("barrier evaluates the models: pass `model_a` or `model_b` as an nn.Module")
    batches = list(batches)
    if align_first:
        model_b = align(model_a, model_b, batches[0][0] if example_input is None else example_input)
    state_a, state_b = state_of(model_a, "model_a"), state_of(model_b, "model_b")
    probe = copy.deepcopy(architecture)
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
        barriers = {f"{prefix}/loss_barrier": result.loss_barrier, f"{prefix}/error_barrier": result.error_barrier}
        logger.log_metrics(barriers, step=1000)
    return result
