"""Small networks for the bound tests (importable as ``bound_networks``): an MLP, a CNN with batch
norm, a residual block with average pooling (and without, for auto_LiRPA 0.3), and a network of
the remaining operators of the relaxation table, the engine's test networks (``engine_networks``,
``FunctionalOps``); box sampling with corners, a batch-norm warm-up and the plain-rule reference
bounds."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from litplug.modules import CNN7, MLP, ConvNet


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
    """The remaining operators of the table: cat, slicing, subtraction (of two activations, of a
    constant from one and of one from a constant; operator and torch.sub), constant scale and
    shift, negation, view, F.linear, Conv1d, BatchNorm1d, Tensor.relu and torch.relu."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 3, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm1d(3)
        self.w = nn.Parameter(torch.randn(6, 12) * 0.5)
        self.head = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn(self.conv(x.view(x.size(0), 1, -1))).relu()  # [B, 3, 4]
        h = torch.cat([h, -h[:, :1] * 0.5 + 1.0, 0.3 - h[:, 1:2]], 1).flatten(1)  # [B, 20]
        g = torch.relu(F.linear(h[:, :12] - h[:, 4:16] - 0.25, self.w))
        return self.head(torch.cat([g, torch.sub(g * torch.linspace(-1, 1, 6), 0.1)], 1))


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


class FunctionalOps(nn.Module):
    """Exercises the functional ops: residual add, concat, reshape, pooling, activations."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.block = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.LeakyReLU(0.1), nn.Conv2d(4, 4, 1))
        self.pool = nn.MaxPool2d(2)
        self.avg = nn.AvgPool2d(2)
        self.adapt = nn.AdaptiveAvgPool2d(2)
        self.conv1d = nn.Conv1d(8, 3, 2)
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Identity(), nn.Linear(64 + 16 + 24, 5))

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x)))
        h = h + self.block(h)
        h = torch.tanh(h) - 0.5 * torch.sigmoid(h)
        a = self.pool(h).flatten(1)
        b = self.adapt(self.avg(h) * 2.0).reshape(x.size(0), -1)
        c = F.relu(self.conv1d(h.view(x.size(0), 8, 32)[:, :, :9])).flatten(1)
        return self.head(torch.cat([a, b, c], dim=1))


def engine_networks():
    torch.manual_seed(0)
    return {
        "mlp": MLP(input_shape=[1, 8, 8], num_outputs=10, hidden=[32, 16], batch_norm=True),
        "convnet": ConvNet(input_shape=[1, 8, 8], num_outputs=10, channels=[4, 8], hidden=16),
        "cnn7": CNN7(input_shape=[1, 8, 8], num_outputs=10, width=4, linear_size=16),
        "sigmoid": MLP(input_shape=[1, 8, 8], num_outputs=10, hidden=[16], activation="sigmoid"),
    }


def warm_bn(net, x):
    net.train()
    with torch.no_grad():
        net(x)
    return net.eval()


def plain_bounds(engine, lower, upper, **kwargs):
    """The reference: the plain rules with gradients on (``weight.abs()`` each call, no box overwritten)."""
    with torch.enable_grad():
        out = engine(lower, upper, fused=False, **kwargs)
    return out.lower.detach(), out.upper.detach(), None if out.clean is None else out.clean.detach()
