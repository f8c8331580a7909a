"""A non-finite loss never silently poisons an average, a mask, a perturbation or a multiplier:
what each callback does with NaN/inf (documented in its docstring)."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from harness import fast_trainer, state_of
from lightning.pytorch import Callback
from torch.utils.data import DataLoader, TensorDataset

from litplug.callbacks import EMA, SAM, SWA, SharpnessMonitor, SurrogateSharpness, UnlearningMask
from litplug.datamodules import Digits, ForgetRetain
from litplug.modules import MLP, Classifier, Unlearner

NAN = float("nan")


class Poisoned(Classifier):
    """A classifier whose loss is NaN from optimizer step ``from_step`` on (None: never); it
    records the weights every time its training_step runs."""

    def __init__(self, from_step=None, seed=0):
        torch.manual_seed(seed)
        super().__init__(
            MLP(input_shape=[4], num_outputs=3, hidden=[6]), num_classes=3, optimizer=partial(torch.optim.SGD, lr=0.1)
        )
        self.from_step = from_step
        self.seen: list[list[torch.Tensor]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append([p.detach().clone() for p in self.parameters()])
        loss = super().training_step(batch, batch_idx)
        if self.from_step is not None and self.global_step >= self.from_step:
            loss = loss * NAN
        return loss

    def batch_loss(self, batch):  # the loss SharpnessMonitor measures, poisoned the same way
        loss = super().batch_loss(batch)
        return loss * NAN if self.from_step is not None and self.global_step >= self.from_step else loss


def loader(n=16, batch_size=4):
    gen = torch.Generator().manual_seed(1)
    return DataLoader(
        TensorDataset(torch.randn(n, 4, generator=gen), torch.randint(0, 3, (n,), generator=gen)), batch_size=batch_size
    )


def _finite(state):
    return all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_ema_skips_non_finite_weights_and_warns(tmp_path):
    clean = EMA(decay=0.5, final_weights="live")
    fast_trainer(tmp_path, max_steps=2, callbacks=[clean]).fit(Poisoned(), loader())
    ema = EMA(decay=0.5, final_weights="live")
    with pytest.warns(UserWarning, match="EMA: the weights are not finite .* step 3.*skipped"):
        fast_trainer(tmp_path, max_steps=4, callbacks=[ema]).fit(Poisoned(from_step=2), loader())
    assert ema.updates == 2 and ema.skipped == 2  # steps 3 and 4 ended on NaN weights
    average = ema.averaged_state_dict("")
    assert _finite(average)
    for k, v in clean.averaged_state_dict("").items():
        assert torch.equal(average[k], v), k  # the average of the two finite steps, bit-exact


def test_swa_skips_a_non_finite_snapshot(tmp_path):
    swa = SWA(start_epoch=0, update_bn=False, final_weights="live")
    with pytest.warns(UserWarning, match="SWA: the weights are not finite"):
        fast_trainer(tmp_path, max_epochs=3, callbacks=[swa]).fit(Poisoned(from_step=5), loader())
    assert swa.updates == 1 and swa.skipped == 2  # epoch 0 averaged; epochs 1 and 2 ended on NaN
    assert _finite(swa.averaged_state_dict(""))


def test_sam_does_not_perturb_along_a_non_finite_gradient(tmp_path):
    model = Poisoned(from_step=0)
    with pytest.warns(UserWarning, match="gradient norm is not finite .*not perturbed"):
        fast_trainer(tmp_path, max_steps=1, callbacks=[SAM(rho=0.1)]).fit(model, loader())
    first, second = model.seen  # Lightning's pass, then SAM's at the (unperturbed) weights
    assert all(torch.isfinite(p).all() for p in second)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_sam_perturbs_normally_on_finite_losses(tmp_path):
    model = Poisoned()
    fast_trainer(tmp_path, max_steps=1, callbacks=[SAM(rho=0.1)]).fit(model, loader())
    first, second = model.seen
    assert not all(torch.equal(a, b) for a, b in zip(first, second))


class OutputPoison(Callback):
    """Makes the model's forward return NaN from the batch ``at`` on (the surrogate's G too)."""

    def __init__(self, at):
        self.at = at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        pl_module.poison_output = batch_idx >= self.at


class NaNOutput(Poisoned):
    poison_output = False

    def forward(self, x):
        out = super().forward(x)
        return out * NAN if self.poison_output else out


def test_surrogate_multiplier_ignores_a_non_finite_loss_and_output(tmp_path):
    lambdas = {}
    for name, model in (("finite", Poisoned()), ("nan_loss", Poisoned(from_step=0))):
        cb = SurrogateSharpness(rho=0.5, radius=0.1, epsilon=0.01, lambda_init=1.0, lambda_lr=0.5)
        fast_trainer(tmp_path, max_steps=1, callbacks=[cb]).fit(model, loader())
        lambdas[name] = cb.state_dict()["lambda"]
    # the dual step uses ||grad G|| only: a NaN loss leaves it exactly as on the finite run
    assert torch.isfinite(lambdas["nan_loss"]) and torch.equal(lambdas["nan_loss"], lambdas["finite"])
    assert float(lambdas["finite"]) != 1.0
    cb = SurrogateSharpness(rho=0.5, radius=0.1, epsilon=0.01, lambda_init=1.0, lambda_lr=0.5)
    fast_trainer(tmp_path, max_steps=2, callbacks=[cb, OutputPoison(at=1)]).fit(NaNOutput(), loader())
    assert torch.equal(cb.state_dict()["lambda"], lambdas["finite"])  # step 2's G is NaN: lambda kept


def test_monitor_logs_nan_and_restores_the_weights():
    gen = torch.Generator().manual_seed(0)
    model = Poisoned(from_step=0)
    model.train()
    before = state_of(model)
    monitor = SharpnessMonitor(rho=0.1)
    monitor.held = [(torch.randn(4, 4, generator=gen), torch.randint(0, 3, (4,), generator=gen))]
    values = monitor.measure(model)
    assert values and all(torch.isnan(v) for v in values.values())
    after = state_of(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_unlearning_mask_refuses_non_finite_scores(tmp_path):
    model = Classifier(MLP(input_shape=[4], num_outputs=3, hidden=[6]), num_classes=3)
    with torch.no_grad():
        model.backbone[1][0].weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"'magnitude' scores are not finite .*backbone.1.0.weight \(1 of 24\)"):
        fast_trainer(tmp_path, max_steps=1, callbacks=[UnlearningMask("magnitude", ratio=0.5)]).fit(model, loader())
    # saliency on a NaN forget loss (a NaN weight in the last layer): every score of the net is NaN
    unlearner = Unlearner(MLP(input_shape=[1, 8, 8], num_outputs=10, hidden=[8]), None, "gradient_ascent")
    with torch.no_grad():
        unlearner.backbone[2].bias[0] = NAN
    data = ForgetRetain(Digits(batch_size=32), scenario="class", forget_classes=[0])
    with pytest.raises(ValueError, match=r"'saliency' scores are not finite .*backbone.1.0.weight"):
        fast_trainer(tmp_path, max_steps=1, callbacks=[UnlearningMask("saliency", num_batches=1)]).fit(unlearner, data)
