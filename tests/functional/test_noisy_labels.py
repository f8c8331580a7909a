"""ELR and PS-KD terms against autograd of their definitions (the reference code's formulas)."""

import torch
import torch.nn.functional as F

from litplug.functional import (
    elr_logit_grad,
    elr_regularizer,
    elr_update,
    pskd_alpha,
    pskd_logit_grad,
    pskd_targets,
)


def test_elr_gradient_is_the_regularisers_including_the_clamp():
    g = torch.Generator().manual_seed(0)
    z = (torch.randn(6, 4, generator=g, dtype=torch.float64) * 6).requires_grad_()  # some p below 1e-4
    t = torch.rand(6, 4, generator=g, dtype=torch.float64)
    t = t / t.sum(-1, keepdim=True)
    assert (z.softmax(-1) < 1e-4).any()
    elr_regularizer(z, t).backward()
    torch.testing.assert_close(elr_logit_grad(z.detach(), t), z.grad, rtol=1e-10, atol=1e-12)


def test_elr_update_is_the_reference_moving_average():
    z, t = torch.randn(3, 5, dtype=torch.float64), torch.rand(3, 5, dtype=torch.float64)
    p = F.softmax(z, dim=1).clamp(1e-4, 1.0 - 1e-4)
    torch.testing.assert_close(elr_update(t, z, 0.7), 0.7 * t + 0.3 * (p / p.sum(dim=1, keepdim=True)))


def test_pskd_gradient_is_the_soft_target_cross_entropy_minus_the_hard_one():
    z = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    y, prev = torch.tensor([0, 3, 1, 1, 2]), torch.rand(5, 4, dtype=torch.float64).softmax(-1)
    alpha = pskd_alpha(4, 0.8, 10)
    assert alpha == 0.8 * 5 / 10
    (F.cross_entropy(z, pskd_targets(y, prev, alpha)) - F.cross_entropy(z, y)).backward()
    torch.testing.assert_close(pskd_logit_grad(y, prev, alpha), z.grad, rtol=1e-10, atol=1e-12)
