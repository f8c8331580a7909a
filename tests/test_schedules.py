"""Every step schedule counts training steps: batches that reached an optimizer step, one per batch
however many optimizers a manual module steps (``trainer.global_step`` counts each optimizer's
step). Checked on modules written here: a manual module stepping two optimizers per batch and an
automatic one accumulating gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from harness import fast_trainer
from lightning.pytorch import LightningModule, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from litplug.callbacks import EMA, SAM, SWA, IBPWarmup, SharpnessMonitor, SurrogateSharpness


class TwoOptimizerGAN(LightningModule):
    """Manual optimisation: a "generator" and a "discriminator" optimizer, both stepped per batch."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.generator = nn.Linear(4, 4)
        self.discriminator = nn.Linear(4, 1)
        self.batches = 0

    def forward(self, x):
        return self.discriminator(torch.tanh(self.generator(x)))

    def batch_loss(self, batch):
        (x,) = batch
        return F.softplus(self(x)).mean()

    def training_step(self, batch, batch_idx):
        opt_g, opt_d = self.optimizers()
        for opt, sign in ((opt_d, 1.0), (opt_g, -1.0)):
            opt.zero_grad()
            self.manual_backward(sign * self.batch_loss(batch))
            opt.step()
        self.batches += 1

    def configure_optimizers(self):
        return [
            torch.optim.SGD(self.generator.parameters(), lr=0.01),
            torch.optim.SGD(self.discriminator.parameters(), lr=0.01),
        ]


class Accumulating(LightningModule):
    """Automatic optimisation, one optimizer; run with ``accumulate_grad_batches=2``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(4, 1)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return self.net(x).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _loader(batches: int):
    return DataLoader(TensorDataset(torch.randn(4 * batches, 4)), batch_size=4)


def _fit(tmp_path, model, callbacks, batches=19, **kwargs):
    seed_everything(0)
    args = {"max_epochs": 1, "limit_val_batches": 0, **kwargs}
    trainer = fast_trainer(tmp_path, callbacks=callbacks, **args)
    trainer.fit(model, _loader(batches))
    return trainer


def _expected(batches: int, after: int, every: int) -> list[int]:
    """1-based training steps an update follows: 0-based index i >= after, i % every == 0."""
    return [i + 1 for i in range(batches) if i >= after and i % every == 0]


@pytest.mark.parametrize("every, after", [(2, 0), (3, 0), (4, 0), (2, 5)])
def test_ema_counts_batches_not_optimizer_steps(tmp_path, every, after):
    model = TwoOptimizerGAN()
    ema = EMA(decay=0.5, every_n_steps=every, start_step=after)
    trainer = _fit(tmp_path, model, [ema])
    assert trainer.global_step == 2 * 19 and model.batches == 19
    want = _expected(19, after, every)
    assert ema.steps == 19
    assert ema.updates == len(want) and ema.last_update == want[-1]


def test_ema_counts_accumulated_batches_once(tmp_path):
    ema = EMA(decay=0.5, every_n_steps=2)
    trainer = _fit(tmp_path, Accumulating(), [ema], batches=12, accumulate_grad_batches=2)
    assert trainer.global_step == ema.steps == 6
    assert ema.updates == len(_expected(6, 0, 2)) == 3


def test_ema_step_count_survives_resume(tmp_path):
    ema = EMA(decay=0.5, every_n_steps=3)
    _fit(tmp_path / "a", TwoOptimizerGAN(), [ema], batches=5)
    state = ema.state_dict()
    resumed = EMA(decay=0.5, every_n_steps=3)
    resumed.load_state_dict(state)
    assert resumed.steps == 5 and resumed.last_update == 4


def test_swa_with_max_steps_snapshots_once_per_epoch(tmp_path):
    """``max_steps`` is Lightning's: it counts every optimizer's step (here 2 per batch)."""
    model = TwoOptimizerGAN()
    swa = SWA(start_epoch=1, update_bn=False)
    trainer = _fit(tmp_path, model, [swa], batches=3, max_epochs=None, max_steps=2 * 3 * 4)
    assert trainer.current_epoch == 4 and model.batches == 12
    assert swa.updates == 3 and swa.last_update == 3  # epochs 1, 2, 3


class CountingSAM(SAM):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.perturbed = 0

    def _combine(self, trainer, pl_module):
        self.perturbed += 1
        super()._combine(trainer, pl_module)


def test_sam_every_n_steps_counts_training_steps(tmp_path):
    sam = CountingSAM(rho=0.05, every_n_steps=2)
    trainer = _fit(tmp_path, Accumulating(), [sam], batches=12, accumulate_grad_batches=2)
    assert trainer.global_step == 6 and sam.perturbed == 3  # training steps 1, 3, 5 of 6


def _recording(base):
    class Recording(base):
        """Records the 0-based index (``global_step``) of every step the method acts on."""

        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.acted = []

        def _combine(self, trainer, pl_module):
            self.acted.append(trainer.global_step)
            super()._combine(trainer, pl_module)

    return Recording


@pytest.mark.parametrize(
    "base, kwargs, want",
    [
        (SAM, {"start_step": 3, "every_n_steps": 2}, [4, 6]),  # phase of the step count, as EMA
        (SAM, {"start_step": 5}, [5, 6, 7]),
        (SurrogateSharpness, {"start_step": 6}, [6, 7]),
    ],
)
def test_start_step_counts_training_steps_and_survives_a_mid_epoch_resume(tmp_path, base, kwargs, want):
    """8 training steps of 2 accumulated batches in one epoch; a run resumed from the checkpoint of
    step 3 (mid-epoch) acts on the same later steps as the uninterrupted one."""
    whole = _recording(base)(**kwargs)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    _fit(tmp_path, Accumulating(), [whole, ckpt], batches=16, accumulate_grad_batches=2, enable_checkpointing=True)
    assert whole.acted == want
    resumed = _recording(base)(**kwargs)
    seed_everything(0)
    trainer = fast_trainer(tmp_path, callbacks=[resumed], limit_val_batches=0, accumulate_grad_batches=2)
    trainer.fit(Accumulating(), _loader(16), ckpt_path=tmp_path / "ckpt" / "epoch=0-step=3.ckpt")
    assert trainer.global_step == 8 and resumed.acted == [i for i in want if i >= 3]


@pytest.mark.parametrize(
    "callback, error, refusal",
    [
        (lambda: SAM(), ValueError, "SAM does not support manual optimisation"),
        (lambda: SurrogateSharpness(), ValueError, "SurrogateSharpness does not support manual optimisation"),
        (lambda: IBPWarmup(), TypeError, "IBPWarmup needs the module to satisfy CertifiedModule"),
    ],
)
def test_step_callbacks_that_need_automatic_optimisation_refuse_two_optimizers(tmp_path, callback, error, refusal):
    with pytest.raises(error, match=refusal):
        _fit(tmp_path, TwoOptimizerGAN(), [callback()], batches=2)


class CountingMonitor(SharpnessMonitor):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.measured = 0

    def measure(self, pl_module):
        self.measured += 1
        return super().measure(pl_module)


def test_monitor_every_n_epochs_with_two_optimizers(tmp_path):
    monitor = CountingMonitor(every_n_epochs=2, layerwise=False)
    model = TwoOptimizerGAN()
    trainer = _fit(tmp_path, model, [monitor], batches=2, max_epochs=5)
    assert trainer.global_step == 2 * 2 * 5 and monitor.measured == 2  # after epochs 2 and 4
