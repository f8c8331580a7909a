"""litplug.functional.unlearning: the NPO loss, random other labels, the L1 weight and the
membership-inference metrics against their definitions."""

import math

import pytest
import torch

from litplug.functional import l1_alpha, mia_efficacy, npo_loss, random_other_labels


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
