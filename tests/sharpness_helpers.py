"""Shared pieces of the sharpness callbacks' tests (SAM, IGNITE, the monitor): tiny models and
data, a probe of the final gradients, the hand-computed SAM update, and the CLI on shipped configs.
Module level: the distributed workers import them."""

from __future__ import annotations

import copy
from functools import partial

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback
from torch.utils.data import DataLoader, TensorDataset

from litplug.cli import LitplugCLI
from litplug.modules import MLP, Classifier


class Counting(Classifier):
    """Classifier that counts its training_step calls."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = 0

    def training_step(self, batch, batch_idx):
        self.calls += 1
        return super().training_step(batch, batch_idx)


# Tests that compare a run with a hand-computed update, a peer or another run use float64 (F64):
# their float32 results differ by rounding that depends on the CPU's kernels and thread count.
F64 = torch.float64


def tiny(optimizer=None, batch_norm=False, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    optimizer = optimizer or partial(torch.optim.SGD, lr=0.1, momentum=0.9)
    net = MLP(input_shape=[4], num_outputs=3, hidden=[6], batch_norm=batch_norm).to(dtype)
    return Counting(net, num_classes=3, optimizer=optimizer)


def data(n=16, seed=1, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=gen).to(dtype), torch.randint(0, 3, (n,), generator=gen)


def loader(x, y, batch_size):
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class Probe(Callback):
    """Records, per optimizer step, the weights at batch start, the gradient and weights that
    on_before_optimizer_step sees (and how often it is called), and the weights after the step."""

    def __init__(self):
        self.start, self.grads, self.at_step, self.after, self.batches = [], [], [], [], []
        self.backwards = 0

    def on_after_backward(self, trainer, pl_module):
        self.backwards += 1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.start.append([_full(p.detach()).clone() for p in pl_module.parameters()])
        self.batches.append([t.detach().cpu().clone() for t in batch])

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append([_full(p.grad).clone() for p in pl_module.parameters()])
        self.at_step.append([_full(p.detach()).clone() for p in pl_module.parameters()])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after.append([_full(p.detach()).clone() for p in pl_module.parameters()])


def asam_scale(net, adaptive, eta=0.01):
    """T of the ASAM authors' ascent step (SamsungLabs/ASAM, asam.py): |w| + eta for parameters
    whose name contains "weight", 1 for the others; 1 everywhere for SAM."""
    return [
        p.detach().abs() + eta if adaptive and "weight" in n else torch.ones_like(p) for n, p in net.named_parameters()
    ]


def hand_grads(net, batches, rho, adaptive, a, eta=0.01):
    """(1 - a) g + a grad L(w + e) computed from the equations, on a copy of ``net``. The ascent
    step is the ASAM authors': g <- T g on weights, n = ||g|| over all, e = rho T g / n."""
    net = copy.deepcopy(net)
    params = list(net.parameters())

    def grads():
        net.zero_grad()
        loss = sum(F.cross_entropy(net(x), y) for x, y in batches) / len(batches)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in params]

    _, g = grads()
    t = asam_scale(net, adaptive, eta)
    tg = [ti * gi for ti, gi in zip(t, g)]
    norm = torch.sqrt(sum((x**2).sum() for x in tg))
    with torch.no_grad():
        for p, ti, x in zip(params, t, tg):
            p.add_(rho * ti * x / (norm + 1e-12))
    _, g2 = grads()
    return [(1 - a) * gi + a * g2i for gi, g2i in zip(g, g2)]


def hand_step(net, final, optimizer):
    net = copy.deepcopy(net)
    opt = optimizer(net.parameters())
    for p, g in zip(net.parameters(), final):
        p.grad = g.clone()
    opt.step()
    return [p.detach() for p in net.parameters()]


CONFIGS = __import__("pathlib").Path(__file__).resolve().parents[1] / "configs"


def run_cli(*configs, run=True, extra=()):
    args = [a for c in configs for a in ("--config", str(CONFIGS / c))] + list(extra)
    return LitplugCLI(args=["fit", *args] if run else args, run=run)
