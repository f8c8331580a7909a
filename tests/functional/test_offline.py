"""litplug.functional.offline: projected gradient ascent against closed forms, the starting designs."""

import torch

from litplug.functional import gradient_ascent, starting_designs


def test_gradient_ascent_matches_closed_form_on_a_quadratic():
    # f(x) = -||x - c||^2: x_k = c + (1 - 2 eta)^k (x_0 - c).
    c = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    x0 = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    eta, k = 0.1, 7
    x = gradient_ascent(lambda x: -((x - c) ** 2).sum(-1), x0, steps=k, step_size=eta)
    torch.testing.assert_close(x, c + (1 - 2 * eta) ** k * (x0 - c), rtol=0, atol=1e-12)
    assert torch.equal(gradient_ascent(lambda x: -((x - c) ** 2).sum(-1), x0, steps=0, step_size=eta), x0)


def test_gradient_ascent_projects_onto_the_box_and_leaves_parameter_grads_alone():
    net = torch.nn.Linear(2, 1)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[1.0, -1.0]]))
    x = gradient_ascent(
        net,
        torch.zeros(3, 2),
        steps=50,
        step_size=0.1,
        lower=torch.tensor([-1.0, -0.5]),
        upper=torch.tensor([0.25, 1.0]),
    )
    assert torch.equal(x, torch.tensor([[0.25, -0.5]]).expand(3, 2))
    assert all(p.grad is None for p in net.parameters())


def test_starting_designs():
    designs = torch.arange(10.0).unsqueeze(1)
    scores = torch.tensor([3.0, 9.0, 1.0, 7.0, 0.0, 8.0, 2.0, 6.0, 5.0, 4.0])
    assert starting_designs(designs, scores, 3, "top").squeeze(1).tolist() == [1.0, 5.0, 3.0]
    a, b = (starting_designs(designs, scores, 4, "random", seed=1) for _ in range(2))
    assert torch.equal(a, b) and len(a.unique()) == 4
    assert len(starting_designs(designs, scores, 50, "top")) == 10  # capped at the data size
