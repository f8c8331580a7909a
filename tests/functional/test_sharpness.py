"""SAM/ASAM's perturbation, the SAM and IGNITE gradient combinations (the equations and the in-place
forms the callbacks use) and IGNITE's dual ascent against their equations."""

import pytest
import torch
from references import ignite_gradient, sam_gradient

from litplug.functional import dual_ascent, global_norm, ignite_gradient_, sam_gradient_, sam_perturbation


def test_sam_perturbation_closed_form_and_loss_scale_invariance():
    p = [torch.tensor([1.0, -2.0]), torch.tensor([[0.5]])]
    g = [torch.tensor([3.0, 0.0]), torch.tensor([[4.0]])]
    e, n = sam_perturbation(p, g, rho=0.1)
    assert n == pytest.approx(5.0)
    torch.testing.assert_close(e[0], torch.tensor([0.06, 0.0]))
    torch.testing.assert_close(e[1], torch.tensor([[0.08]]))
    ea, na = sam_perturbation(p, g, rho=0.1, adaptive=True)
    assert na == pytest.approx((3.0**2 + 2.0**2) ** 0.5)  # ||(|w| g)|| = ||(3, 0, 2)||
    torch.testing.assert_close(ea[0], 0.1 * torch.tensor([3.0, 0.0]) / 13**0.5)
    torch.testing.assert_close(ea[1], 0.1 * torch.tensor([[0.25 * 4.0]]) / 13**0.5)
    for adaptive in (False, True):
        e1, _ = sam_perturbation(p, g, 0.1, adaptive)
        e2, _ = sam_perturbation(p, [1024 * t for t in g], 0.1, adaptive)
        for a, b in zip(e1, e2):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
    g_copy = [t.clone() for t in g]
    e_inplace, _ = sam_perturbation(p, g_copy, rho=0.1, inplace=True)
    assert all(a.data_ptr() == b.data_ptr() for a, b in zip(e_inplace, g_copy))
    assert all(torch.equal(a, b) for a, b in zip(e_inplace, e))
    assert global_norm([torch.tensor([3.0]), torch.tensor([4.0])]) == pytest.approx(5.0)


def test_combination_rules():
    g, gp = [torch.tensor([1.0, 2.0])], [torch.tensor([3.0, -2.0])]
    torch.testing.assert_close(sam_gradient(g, gp, 0.5)[0], torch.tensor([2.0, 0.0]))
    torch.testing.assert_close(sam_gradient(g, gp, 1.0)[0], gp[0])
    out = ignite_gradient(
        [torch.tensor([1.0])], [torch.tensor([2.0])], [torch.tensor([5.0])], lam=2.0, rho=0.1, radius=0.2
    )
    torch.testing.assert_close(out[0], torch.tensor([1.0 + 2.0 * 0.1 / 0.2 * 3.0]))
    lam = torch.tensor(0.01)
    assert dual_ascent(lam, torch.tensor(1.0), rho=0.5, epsilon=0.1, lr=0.1) == pytest.approx(0.01 + 0.1 * 0.4)
    assert dual_ascent(lam, torch.tensor(0.0), rho=0.5, epsilon=1.0, lr=1.0) == 0.0  # clamped at 0
    assert dual_ascent(lam, torch.tensor(float("inf")), rho=0.5, epsilon=0.1, lr=0.1) == pytest.approx(0.01)


@pytest.mark.parametrize("a", [1.0, 0.5])
def test_in_place_forms_end_at_the_equations(a):
    # The callbacks preload the first gradient in place and let a backward accumulate the second one
    # with the returned weight; the buffers must end holding the equation's value, bit for bit.
    gen = torch.Generator().manual_seed(0)
    g, gp = [torch.randn(3, generator=gen) for _ in range(2)], [torch.randn(3, generator=gen) for _ in range(2)]
    buffers, w = sam_gradient_([t.clone() for t in g], a)
    final = [gpi * w if b is None else b + gpi * w for b, gpi in zip(buffers, gp)]
    for got, want in zip(final, sam_gradient(g, gp, a)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    gl, gg, gh = ([torch.randn(3, generator=gen)] for _ in range(3))
    lam = torch.tensor(0.3)
    preloaded = [t.clone() for t in gl]
    c = ignite_gradient_(preloaded, gg, lam, rho=0.1, radius=0.05)
    want = ignite_gradient(gl, gg, gh, lam, 0.1, 0.05)[0]
    torch.testing.assert_close(preloaded[0] + c * gh[0], want, rtol=1e-6, atol=1e-7)
