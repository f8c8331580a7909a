"""Small networks for the bound tests (importable as ``bound_networks``): an MLP, a CNN with batch
norm, a residual block with average pooling (and without, for auto_LiRPA 0.3), and a network of
the remaining operators of the relaxation table; and box sampling with corners."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Residual(nn.Module):
    """Conv + BN + ReLU, a residual block (conv + BN added to its input), average pooling, MLP head."""

    def __init__(self, pool: bool = True) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.c2, self.b2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.pool = nn.AvgPool2d(2) if pool else nn.Identity()
        self.fc, self.out = nn.Linear(4 * (16 if pool else 64), 16), nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.b1(self.c1(x)))
        h = F.relu(self.b2(self.c2(h)) + h)
        return self.out(F.relu(self.fc(torch.flatten(self.pool(h), 1))))


class Mixed(nn.Module):
    """The remaining operators of the table: cat, slicing, subtraction, constant scale and shift,
    negation, view, F.linear, Conv1d, BatchNorm1d, Tensor.relu and torch.relu."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 3, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm1d(3)
        self.w = nn.Parameter(torch.randn(6, 12) * 0.5)
        self.head = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn(self.conv(x.view(x.size(0), 1, -1))).relu()  # [B, 3, 4]
        h = torch.cat([h, -h[:, :1] * 0.5 + 1.0], 1).flatten(1)  # [B, 16]
        g = torch.relu(F.linear(h[:, :12] - h[:, 4:], self.w))
        return self.head(torch.cat([g, g * torch.linspace(-1, 1, 6)], 1))


def networks() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))
    cnn = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 8, 4, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Flatten(), nn.Linear(128, 20), nn.ReLU(), nn.Linear(20, 10),
    )  # fmt: skip
    nets = {"mlp": mlp, "cnn_bn": cnn, "residual": Residual(), "residual_nopool": Residual(pool=False)}
    for net in nets.values():
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):  # non-trivial running statistics
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.uniform_(-0.3, 0.3)
        net.eval().double()
    return nets


def samples(lower: torch.Tensor, upper: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` points of the box of one sample: half random corners, half uniform inside."""
    corners = torch.randint(0, 2, (n // 2, *lower.shape), generator=generator).to(lower.dtype)
    inside = torch.rand((n - n // 2, *lower.shape), generator=generator, dtype=lower.dtype)
    t = torch.cat([corners, inside])
    return lower + t * (upper - lower)
