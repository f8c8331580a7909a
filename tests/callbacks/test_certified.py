"""IBPWarmup: eps schedule, IBP initialisation, the certified interface on a second module, ddp."""

import math
import os
from functools import partial

import pytest
import torch
from harness import fast_trainer, run_distributed, state_of
from lightning.pytorch import LightningModule, seed_everything
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from litplug.callbacks import IBPWarmup
from litplug.callbacks.certified import eps_schedule, ibp_init_
from litplug.modules import MLP, CertifiedClassifier


def test_bad_arguments():
    with pytest.raises(ValueError, match="`ramp_epochs` must be >= 1, got 0"):
        IBPWarmup(ramp_epochs=0)
    with pytest.raises(ValueError, match="`schedule` must be one of"):
        IBPWarmup(schedule="cosine")
    with pytest.raises(ValueError, match="`start_epoch`"):
        IBPWarmup(start_epoch=-1)
    with pytest.raises(ValueError, match="`mid`"):
        IBPWarmup(mid=1.0)
    with pytest.raises(ValueError, match="`tolerance`"):
        IBPWarmup(tolerance=0.0)


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


class ResidualNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(200, 300)
        self.branch = nn.Linear(300, 300)
        self.out = nn.Linear(300, 10)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        return self.out(h + torch.relu(self.branch(h)))


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


class MinimalCertified(LightningModule):
    """The smallest module with the certified interface: a linear model, loss = CE + eps_t * |W|."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        self.eps = 0.4
        self.current_eps = self.eps
        self.regularizer_weight = 0.0
        self.regularizer_tolerance = 0.5
        self.seen: list[tuple[float, float, float]] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.seen.append((self.current_eps, self.regularizer_weight, self.regularizer_tolerance))
        return (
            nn.functional.cross_entropy(self.backbone(x), y) + self.current_eps * self.backbone[0].weight.abs().mean()
        )

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _loader(n=24, batch=4):
    g = torch.Generator().manual_seed(0)
    return DataLoader(
        TensorDataset(torch.randn(n, 4, generator=g), torch.randint(0, 2, (n,), generator=g)), batch_size=batch
    )


def test_drives_any_module_with_the_certified_interface(tmp_path):
    torch.manual_seed(0)
    module = MinimalCertified()
    callback = IBPWarmup(start_epoch=1, ramp_epochs=2, schedule="linear", regularizer_weight=0.3, tolerance=0.7)
    fast_trainer(tmp_path, max_epochs=4, callbacks=[callback]).fit(module, _loader())
    steps = 6  # batches per epoch
    assert len(module.seen) == 4 * steps and callback.batches == 4 * steps
    for i, (eps, weight, tol) in enumerate(module.seen):
        expected = 0.0 if i < steps else min((i - steps) / (2 * steps), 1.0) * 0.4
        assert eps == pytest.approx(expected)
        in_ramp = 0 < expected < 0.4
        assert weight == pytest.approx(0.3 * (1 - expected / 0.4) if in_ramp else 0.0)
        assert tol == 0.7
    # IBP init ran on the first layer only (the last is left as initialised).
    assert float(module.backbone[0].weight.detach().std()) < 1.5 * math.sqrt(2 * math.pi) / 4

    class NotCertified(MinimalCertified):
        def __init__(self):
            super().__init__()
            del self.regularizer_weight

    with pytest.raises(ValueError, match="regularizer_weight"):
        fast_trainer(tmp_path, max_epochs=1, callbacks=[IBPWarmup()]).fit(NotCertified(), _loader())


def _data(rank=None):
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(64, 1, 8, 8, generator=g), torch.randint(0, 10, (64,), generator=g)
    if rank is not None:  # rank r takes half of every global batch of 32: same global batches as one process
        idx = torch.arange(64).view(2, 2, 16)[:, rank].flatten()
        x, y = x[idx], y[idx]
    return DataLoader(TensorDataset(x, y), batch_size=16 if rank is not None else 32)


def _certified_mlp():
    backbone = MLP(input_shape=[1, 8, 8], num_outputs=10, hidden=[16])  # no BN: ddp == one process
    return CertifiedClassifier(
        backbone,
        10,
        eps=0.05,
        mean=(0.0,),
        std=(1.0,),
        pixel_range=(0.0, 1.0),
        optimizer=partial(torch.optim.SGD, lr=0.1),
    )


def ddp_worker(strategy, tmp_dir):
    seed_everything(0)
    model = _certified_mlp()
    callback = IBPWarmup(start_epoch=0, ramp_epochs=2, regularizer_weight=0.0, ibp_init=False)
    trainer = fast_trainer(
        tmp_dir,
        strategy=strategy,
        devices=2,
        max_epochs=3,
        callbacks=[callback],
        use_distributed_sampler=False,
        precision="64-true",
    )
    trainer.fit(model, _data(int(os.environ.get("LOCAL_RANK", 0))))
    return {"state": state_of(model.backbone), "batches": callback.batches, "eps": model.current_eps}


def test_ddp_matches_single_process_on_the_global_batch(tmp_path):
    # In float64: the two runs sum the global batch's gradient in a different order, and float32
    # rounding grows through unstable ReLUs over the six IBP steps (to ~4e-4 on some CPUs).
    r0, r1 = run_distributed(ddp_worker, "ddp", tmp_path)
    seed_everything(0)
    model = _certified_mlp()
    callback = IBPWarmup(start_epoch=0, ramp_epochs=2, regularizer_weight=0.0, ibp_init=False)
    fast_trainer(tmp_path, max_epochs=3, callbacks=[callback], precision="64-true").fit(model, _data())
    assert r0["batches"] == r1["batches"] == callback.batches == 6
    assert r0["eps"] == r1["eps"] == model.current_eps == pytest.approx(0.05)
    single = state_of(model.backbone)
    for key, value in single.items():
        assert value.dtype == torch.float64
        assert torch.equal(r0["state"][key], r1["state"][key])
        # float64 rounding (1e-16) amplified as much as float32's was (~1e4x): 1e-12; 1e-10 leaves margin
        torch.testing.assert_close(r0["state"][key], value, rtol=0, atol=1e-10)
