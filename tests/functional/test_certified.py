"""litplug.functional.certified: the eps schedule against its closed form, IBP initialisation's statistics."""

import math

import pytest
import torch
from torch import nn

from litplug.functional import eps_schedule, ibp_init_


def test_eps_schedule_closed_form():
    eps, mid, beta = 0.2, 0.25, 4.0
    a = mid / (beta * (1 - mid) + mid)
    assert eps_schedule(-1.0, eps) == 0.0 and eps_schedule(2.0, eps) == eps
    assert eps_schedule(0.125, eps) == pytest.approx(eps * a * 0.5**4)
    assert eps_schedule(mid, eps) == pytest.approx(eps * a)
    assert eps_schedule(0.625, eps) == pytest.approx(eps * (a + (1 - a) * 0.5))
    h = 1e-6  # the slope is continuous at mid
    left = (eps_schedule(mid, eps) - eps_schedule(mid - h, eps)) / h
    right = (eps_schedule(mid + h, eps) - eps_schedule(mid, eps)) / h
    assert left == pytest.approx(right, rel=1e-3)
    values = [eps_schedule(p / 100, eps) for p in range(101)]
    assert all(b >= a_ for a_, b in zip(values, values[1:]))
    assert eps_schedule(0.3, eps, "linear") == pytest.approx(0.06)


def test_ibp_init_statistics_and_residual_halving():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(400, 300), nn.ReLU(), nn.Linear(300, 200), nn.ReLU(), nn.Linear(200, 10))
    last, biases = net[4].weight.clone(), [m.bias.clone() for m in (net[0], net[2], net[4])]
    assert ibp_init_(net) == ["0", "2"]
    assert float(net[0].weight.detach().std()) == pytest.approx(math.sqrt(2 * math.pi) / 400, rel=0.02)
    assert float(net[2].weight.detach().std()) == pytest.approx(math.sqrt(2 * math.pi) / 300, rel=0.02)
    assert torch.equal(net[4].weight, last)
    assert all(torch.equal(m.bias, b) for m, b in zip((net[0], net[2], net[4]), biases))
    conv = nn.Sequential(nn.Conv2d(8, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16, 2))
    ibp_init_(conv)
    assert float(conv[0].weight.detach().std()) == pytest.approx(math.sqrt(2 * math.pi) / 72, rel=0.05)
    res = ResidualNet()
    assert ibp_init_(res) == ["inp", "branch"]
    assert float(res.inp.weight.detach().std()) == pytest.approx(math.sqrt(2 * math.pi) / 200, rel=0.02)
    assert float(res.branch.weight.detach().std()) == pytest.approx(math.sqrt(2 * math.pi) / 300 / 2, rel=0.02)


class ResidualNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(200, 300)
        self.branch = nn.Linear(300, 300)
        self.out = nn.Linear(300, 10)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        return self.out(h + torch.relu(self.branch(h)))
