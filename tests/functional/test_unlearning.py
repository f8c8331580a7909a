"""litplug.functional.unlearning: the NPO, SimNPO and RMU losses, random other labels, the L1 weight and the
membership-inference metrics against their definitions."""

import math

import pytest
import torch

from litplug.functional import l1_alpha, mia_efficacy, npo_loss, random_other_labels
from litplug.functional.unlearning import rmu_direction, rmu_loss, simnpo_loss


def test_npo_loss_closed_form_and_gradient():
    logp = torch.tensor([-1.0, -0.2], requires_grad=True)
    ref = torch.tensor([-0.5, -0.2])
    beta = 0.5
    expected = -(2 / beta) * (math.log(1 / (1 + math.exp(0.5 * -0.5))) + math.log(0.5)) / 2
    loss = npo_loss(logp, ref, beta)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    (grad,) = torch.autograd.grad(loss, logp)
    # d/dlogp_i = 2 sigmoid(beta (logp_i - ref_i)) / n: gradient ascent weighted, 1/n at the start
    torch.testing.assert_close(grad, 2 * torch.sigmoid(beta * (logp.detach() - ref)) / 2)
    assert grad[1].item() == pytest.approx(0.5)


def test_random_other_labels():
    y = torch.arange(10).repeat(50)
    new = random_other_labels(y, 10, torch.Generator().manual_seed(0))
    assert (new != y).all() and new.min() >= 0 and new.max() < 10
    assert len(set(new[y == 0].tolist())) == 9  # every other class is drawn


def test_l1_alpha_decays_linearly_to_zero():
    assert [l1_alpha(1.0, t, 4) for t in range(6)] == [1.0, 0.75, 0.5, 0.25, 0.0, 0.0]


def test_mia_efficacy():
    gen = torch.Generator().manual_seed(0)
    member = 0.9 + 0.1 * torch.rand(200, generator=gen)
    non_member = 0.5 * torch.rand(100, generator=gen)
    assert mia_efficacy(member, non_member, 0.95 + 0.05 * torch.rand(50, generator=gen)) == 0.0
    assert mia_efficacy(member, non_member, 0.3 * torch.rand(50, generator=gen)) == 100.0
    assert math.isnan(mia_efficacy(member, non_member, torch.zeros(0)))


def test_loss_mia_auc():
    from litplug.functional import loss_mia_auc

    assert loss_mia_auc(torch.tensor([0.1, 0.2]), torch.tensor([1.0, 2.0, 3.0])) == 100.0
    assert loss_mia_auc(torch.tensor([5.0, 6.0]), torch.tensor([1.0, 2.0])) == 0.0
    assert loss_mia_auc(torch.tensor([1.0, 3.0]), torch.tensor([2.0, 3.0])) == pytest.approx(100 * (2 + 0.5) / 4)
    assert math.isnan(loss_mia_auc(torch.zeros(0), torch.ones(3)))
    assert math.isnan(loss_mia_auc(torch.tensor([0.1, math.nan]), torch.ones(3)))  # a NaN loss has no order
    assert math.isnan(loss_mia_auc(torch.ones(3), torch.tensor([math.nan])))


def test_simnpo_and_rmu_losses_equal_their_formulas_in_float64():
    logp = torch.tensor([-3.0, -0.4, -7.5], dtype=torch.float64)
    length = torch.tensor([3.0, 1.0, 5.0], dtype=torch.float64)
    beta, delta = 2.5, 0.3
    # -(2 / beta) mean log sigmoid(beta (-logp / |y| - delta)), log sigmoid(z) = -log(1 + e^-z)
    terms = [-math.log(1 + math.exp(-beta * (-lp / n - delta))) for lp, n in zip(logp.tolist(), length.tolist())]
    assert simnpo_loss(logp, length, beta, delta).item() == pytest.approx(-(2 / beta) * sum(terms) / 3, abs=1e-9)
    assert simnpo_loss(logp, length, beta).item() == pytest.approx(
        -(2 / beta) * sum(-math.log(1 + math.exp(lp / n * beta)) for lp, n in zip(logp.tolist(), length.tolist())) / 3,
        abs=1e-9,
    )
    u = rmu_direction(4, seed=3)
    assert torch.equal(u, rmu_direction(4, seed=3)) and not torch.equal(u, rmu_direction(4, seed=4))
    assert u.norm().item() == pytest.approx(1.0, abs=1e-12) and (u >= 0).all()
    gen = torch.Generator().manual_seed(0)
    forget, retain, ref = (torch.randn(2, 3, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    target = 6.5 * u
    expected = sum(
        (forget[b, t, d].item() - target[d].item()) ** 2 for b in range(2) for t in range(3) for d in range(4)
    )
    expected_r = sum((retain[b, t, d] - ref[b, t, d]).item() ** 2 for b in range(2) for t in range(3) for d in range(4))
    got = rmu_loss(forget, target, retain, ref, 100.0).item()
    assert got == pytest.approx(expected / 24 + 100.0 * expected_r / 24, abs=1e-9)
    assert rmu_loss(forget, target, retain, ref, 0.0).item() == pytest.approx(expected / 24, abs=1e-9)
