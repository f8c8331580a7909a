"""Noisy-label training terms as pure functions of logits and per-example state.

* ELR (Liu et al. 2020, "Early-Learning Regularization Prevents Memorization of Noisy Labels"):
  ``t <- beta t + (1 - beta) p / sum(p)`` per example (:func:`elr_update`, ``p`` the clamped
  softmax), regulariser ``R = mean_i log(1 - <p_i, t_i>)`` (:func:`elr_regularizer`) added to the
  loss with weight ``lambda``; :func:`elr_logit_grad` is ``dR/dlogits`` in closed form.
* PS-KD (Kim et al. 2021, "Self-Knowledge Distillation with Progressive Refinement of Targets"):
  train on ``(1 - alpha_t) y + alpha_t P`` with ``P`` the model's prediction of the last epoch and
  ``alpha_t = alpha_T (t + 1) / T`` (:func:`pskd_alpha`). Cross-entropy with that target equals
  ``CE(z, y) + alpha_t (CE(z, P) - CE(z, y))``; :func:`pskd_logit_grad` is the gradient of the
  second term's batch mean, ``alpha_t (onehot(y) - P) / B``.

Example:
    >>> import torch
    >>> from litplug.functional import elr_logit_grad, elr_regularizer
    >>> z, t = torch.randn(4, 3, requires_grad=True), torch.full((4, 3), 1 / 3)
    >>> elr_regularizer(z, t).backward()
    >>> torch.allclose(z.grad, elr_logit_grad(z.detach(), t))
    True
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["elr_logit_grad", "elr_regularizer", "elr_update", "pskd_alpha", "pskd_logit_grad", "pskd_targets"]

CLAMP = 1e-4  # the reference code clamps the softmax to [1e-4, 1 - 1e-4]


def elr_update(targets: Tensor, logits: Tensor, beta: float, clamp: float = CLAMP) -> Tensor:
    """The moving-average targets of a batch after seeing ``logits``: ``beta t + (1 - beta) p / sum p``
    with ``p`` the softmax clamped to ``[clamp, 1 - clamp]`` (detached)."""
    p = logits.detach().softmax(-1).clamp(clamp, 1 - clamp)
    return beta * targets + (1 - beta) * p / p.sum(-1, keepdim=True)


def elr_regularizer(logits: Tensor, targets: Tensor, clamp: float = CLAMP) -> Tensor:
    """``mean_i log(1 - <clamp(softmax(z_i)), t_i>)`` (differentiable in ``logits``)."""
    p = logits.softmax(-1).clamp(clamp, 1 - clamp)
    return torch.log1p(-(p * targets).sum(-1)).mean()


def elr_logit_grad(logits: Tensor, targets: Tensor, clamp: float = CLAMP) -> Tensor:
    """``d elr_regularizer / d logits`` in closed form (no graph): with ``v = -mask t / (B (1 - s))``,
    ``s = <clamp(p), t>`` and ``mask`` where the clamp is inactive, ``p (v - <p, v>)``."""
    p = logits.softmax(-1)
    inside = (p >= clamp) & (p <= 1 - clamp)
    s = (p.clamp(clamp, 1 - clamp) * targets).sum(-1, keepdim=True)
    v = -(inside * targets) / (len(logits) * (1 - s))
    return p * (v - (p * v).sum(-1, keepdim=True))


def pskd_alpha(epoch: int, alpha_t: float, end_epoch: int) -> float:
    """``alpha_T (epoch + 1) / T``, the reference schedule (epochs 0-based, reaches ``alpha_T`` at
    the last epoch ``T - 1``)."""
    return alpha_t * (epoch + 1) / end_epoch


def pskd_targets(labels: Tensor, previous: Tensor, alpha: float) -> Tensor:
    """``(1 - alpha) onehot(labels) + alpha previous``."""
    return (1 - alpha) * F.one_hot(labels, previous.shape[-1]).to(previous.dtype) + alpha * previous


def pskd_logit_grad(labels: Tensor, previous: Tensor, alpha: float) -> Tensor:
    """The gradient in the logits of ``alpha mean_i (CE(z_i, P_i) - CE(z_i, y_i))``:
    ``alpha (onehot(y) - P) / B`` (independent of the logits)."""
    onehot = F.one_hot(labels, previous.shape[-1]).to(previous.dtype)
    return alpha * (onehot - previous) / len(labels)
