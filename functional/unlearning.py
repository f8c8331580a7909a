"""Unlearning cores: the NPO loss (Zhang et al. 2024), the SimNPO loss (Fan et al. 2024), the RMU
loss and its random direction (Li et al. 2024), random other labels (Golatkar et al. 2020),
the decaying L1 weight (Jia et al. 2023) and the membership-inference metrics (MIA-efficacy of
Jia et al. 2023 after Song & Mittal 2021; the loss AUC). :class:`litplug.modules.Unlearner` uses
them.

Example:
    >>> import torch
    >>> round(float(npo_loss(torch.zeros(2), torch.zeros(2), beta=1.0)), 4)  # -2 log sigmoid(0)
    1.3863
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "l1_alpha",
    "loss_mia_auc",
    "mia_efficacy",
    "npo_loss",
    "random_other_labels",
    "rmu_direction",
    "rmu_loss",
    "simnpo_loss",
]


def npo_loss(logp: torch.Tensor, logp_ref: torch.Tensor, beta: float) -> torch.Tensor:
    """NPO loss ``-(2 / beta) mean log sigmoid(-beta (logp - logp_ref))`` over per-sample
    log-likelihoods of the true labels (Zhang et al. 2024, eq. 3). Its gradient is the gradient of
    ``-CE`` scaled by ``2 sigmoid(beta (logp - logp_ref))``, which vanishes once a sample is forgotten."""
    return -(2.0 / beta) * F.logsigmoid(-beta * (logp - logp_ref)).mean()


def simnpo_loss(logp: torch.Tensor, length: torch.Tensor, beta: float, delta: float = 0.0) -> torch.Tensor:
    """SimNPO loss ``-(2 / beta) mean log sigmoid(beta (-logp / length - delta))`` over per-sample
    log-likelihoods ``logp`` of ``length`` predictions each (Fan et al. 2024, "Simplicity Prevails",
    eq. 4, with the margin written ``beta delta`` as in the authors' code): NPO without a reference
    model, on the length-normalised loss."""
    return -(2.0 / beta) * F.logsigmoid(beta * (-logp / length - delta)).mean()


def rmu_direction(dim: int, seed: int) -> torch.Tensor:
    """The fixed random unit vector of RMU: uniform in [0, 1)^dim (seeded), normalised to length 1."""
    u = torch.rand(dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return u / u.norm()


def rmu_loss(
    forget_act: torch.Tensor, target: torch.Tensor, retain_act: torch.Tensor, retain_ref: torch.Tensor, gamma: float
) -> torch.Tensor:
    """RMU loss ``mean (forget_act - target)^2 + gamma mean (retain_act - retain_ref)^2`` (Li et al. 2024,
    eq. 1-2; the means run over every element, as ``F.mse_loss``); ``target`` = c u broadcasts over
    the leading dimensions."""
    forget = (forget_act - target).pow(2).mean()
    return forget + gamma * (retain_act - retain_ref).pow(2).mean() if gamma > 0 else forget


def random_other_labels(y: torch.Tensor, num_classes: int, generator: torch.Generator) -> torch.Tensor:
    """Replace every label by a uniformly drawn *different* class."""
    offset = torch.randint(1, num_classes, y.shape, generator=generator).to(y.device)
    return (y + offset) % num_classes


def l1_alpha(alpha: float, step: int, total_steps: int) -> float:
    """Linearly decaying L1 weight ``alpha (1 - step / total_steps)``, 0 from ``total_steps`` on."""
    return alpha * max(0.0, 1.0 - step / max(1, total_steps))


def mia_efficacy(member: torch.Tensor, non_member: torch.Tensor, target: torch.Tensor, seed: int = 0) -> float:
    """Confidence-based MIA-efficacy (Jia et al. 2023, after Song & Mittal 2021), in percent.

    An RBF SVM (``C=3``, as in Unlearn-Sparse) is fit on true-class confidences of ``member``
    (label 1) vs ``non_member`` (label 0) samples, the larger group subsampled (seeded) to the
    size of the smaller; returns the percentage of ``target`` samples predicted non-member.
    Higher means the forget set looks less like training data."""
    from sklearn.svm import SVC

    if len(target) == 0 or len(member) == 0 or len(non_member) == 0:
        return float("nan")
    gen = torch.Generator().manual_seed(seed)
    n = min(len(member), len(non_member))
    member = member[torch.randperm(len(member), generator=gen)[:n]]
    non_member = non_member[torch.randperm(len(non_member), generator=gen)[:n]]
    x = torch.cat([member, non_member]).double().view(-1, 1).cpu().numpy()
    y = torch.cat([torch.ones(n), torch.zeros(n)]).numpy()
    clf = SVC(C=3, gamma="auto", kernel="rbf").fit(x, y)
    pred = clf.predict(target.double().view(-1, 1).cpu().numpy())
    return float(100.0 * (pred == 0).mean())


def loss_mia_auc(member_loss: torch.Tensor, non_member_loss: torch.Tensor) -> float:
    """Membership inference by loss, as an AUC in percent: the probability that a ``member``
    sample has a lower loss than a ``non_member`` one (ties count half). 50 is chance. NaN when either
    side is empty or holds a NaN loss (a diverged model has no membership AUC; a NaN compared with
    nothing would move the area silently)."""
    if len(member_loss) == 0 or len(non_member_loss) == 0 or member_loss.isnan().any() or non_member_loss.isnan().any():
        return float("nan")
    m = member_loss.double().view(-1, 1).cpu()
    n = non_member_loss.double().view(1, -1).cpu()
    return float(100.0 * ((m < n).double().mean() + 0.5 * (m == n).double().mean()))
