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
from litplug.modules import MLP, CertifiedClassifier


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
    callback = IBPWarmup(
        start_epoch=1, ramp_epochs=2, schedule="linear", regularizer_weight=0.3, regularizer_tolerance=0.7
    )
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

    with pytest.raises(TypeError, match="CertifiedModule.*regularizer_weight"):
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
