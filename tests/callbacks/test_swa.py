"""SWA's learning rate: float64 parity with Lightning's ``StochasticWeightAveraging`` on the same
run, and the scenarios of Lightning's own SWA tests (initial state, scheduler swap at ``start_epoch``,
several parameter groups, resume mid-averaging, DDP and FSDP2 on 2 CPU ranks, bad arguments) run
against litplug's ``SWA``.

Lightning's callback takes its snapshots at the start of epochs ``swa_epoch_start - 1`` to
``max_epochs - 1`` (the weights after epochs ``swa_epoch_start - 2`` to ``max_epochs - 2``);
litplug's ``SWA(start_epoch=swa_epoch_start - 1)`` takes them after epochs ``start_epoch`` to
``max_epochs - 1``.
Both build ``SWALR`` at the start of the same epoch, so the runs share one trajectory and one
learning-rate schedule, and their averages are means over windows one epoch apart.
"""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from averaging_helpers import Probe, assert_states_equal, fit, small_classifier
from harness import fast_trainer, make_strategy, read_scalars, run_distributed, state_of
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint, StochasticWeightAveraging
from lightning.pytorch.loggers import TensorBoardLogger
from sklearn.datasets import load_digits
from torch import nn
from torch.optim.swa_utils import SWALR
from torch.utils.data import DataLoader, TensorDataset

from litplug.callbacks import SWA
from litplug.datamodules import Digits
from litplug.modules import MLP, Classifier

EPOCHS, BATCHES, BATCH = 6, 4, 32


def digits_tensors(dtype=torch.float64):
    x, y = load_digits(return_X_y=True)
    n = BATCHES * BATCH
    return torch.tensor(x[:n] / 16.0, dtype=dtype), torch.tensor(y[:n])


class Net(LightningModule):
    """An MLP on digits: SGD with momentum, optionally two parameter groups, a scheduler, a
    BatchNorm layer, a crash at some epoch, or manual optimisation."""

    def __init__(
        self, batch_norm=False, groups=1, scheduler="step", interval="epoch", crash_on_epoch=None, manual=False
    ):
        super().__init__()
        self.automatic_optimization = not manual
        layers = [nn.Linear(64, 32)] + ([nn.BatchNorm1d(32)] if batch_norm else []) + [nn.ReLU(), nn.Linear(32, 10)]
        self.net = nn.Sequential(*layers)
        self.groups, self.scheduler, self.interval, self.crash_on_epoch = groups, scheduler, interval, crash_on_epoch

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        if self.crash_on_epoch is not None and self.trainer.current_epoch >= self.crash_on_epoch:
            raise RuntimeError("crash for the resume test")
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        if not self.automatic_optimization:
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
        return loss

    def train_dataloader(self):
        return DataLoader(TensorDataset(*digits_tensors()), batch_size=BATCH)

    def configure_optimizers(self):
        first, last = self.net[0], self.net[-1]
        rest = [p for m in self.net if m is not first and m is not last for p in m.parameters()]
        if self.groups == 1:
            params = [{"params": list(self.parameters())}]
        else:
            params = [{"params": list(first.parameters()) + rest, "lr": 0.2}, {"params": last.parameters(), "lr": 0.1}]
        optimizer = torch.optim.SGD(params, lr=0.2, momentum=0.9)
        if self.scheduler is None:
            return optimizer
        if self.scheduler == "two":
            return [optimizer], [
                torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.7),
                torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0),
            ]
        if self.scheduler == "step":
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.7)
        else:  # a constant factor: the scheduler whose restore broke on SWALR's state in Lightning
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": self.interval}}


class Recorder(Callback):
    """The learning rate each epoch runs at, and the weights after each epoch's last step."""

    def __init__(self, epochs=EPOCHS):
        self.epochs, self.lrs, self.weights, self.schedulers = epochs, {}, {}, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0 and trainer.current_epoch < self.epochs:  # not Lightning's extra BatchNorm epoch
            self.lrs[trainer.current_epoch] = [g["lr"] for g in trainer.optimizers[0].param_groups]
            self.schedulers[trainer.current_epoch] = [type(c.scheduler) for c in trainer.lr_scheduler_configs]

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch < self.epochs:
            self.weights[trainer.current_epoch] = {k: v.detach().clone() for k, v in pl_module.named_parameters()}


def run(callback, tmp_path, epochs=EPOCHS, ckpt_path=None, extra=(), logger=False, **net):
    """Fit a freshly seeded ``Net(**net)`` in float64 with ``callback`` and a ``Recorder``."""
    seed_everything(0)
    # float64 before fit: Lightning's callback copies the module at setup, before the precision
    # plugin converts it, so a float32 module would get a float32 average.
    model = Net(**net).double()
    recorder = Recorder(epochs)
    trainer = Trainer(
        default_root_dir=tmp_path,
        max_epochs=epochs,
        precision="64-true",
        accelerator="cpu",
        devices=1,
        limit_val_batches=0,
        logger=logger,
        enable_checkpointing=bool(extra),
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback, recorder, *extra],
    )
    trainer.fit(model, ckpt_path=ckpt_path)
    return trainer, model, recorder


def anneal(strategy, t):
    return (1 - math.cos(math.pi * t)) / 2 if strategy == "cos" else t


def expected_lrs(base, swa_lrs, start, annealing_epochs, strategy, gamma=0.7, epochs=EPOCHS):
    """The rate of each epoch: StepLR before ``start``; from ``start`` on, SWALR's interpolation
    from the rate epoch ``start`` ran at to ``swa_lrs`` over ``annealing_epochs`` epoch ends."""
    out = []
    for e in range(epochs):
        lr0 = [b * gamma ** min(e, start) for b in base]
        if e <= start:
            out.append(lr0)
            continue
        a = anneal(strategy, min(1.0, (e - start) / max(1, annealing_epochs)))
        out.append([s * a + lr * (1 - a) for s, lr in zip(swa_lrs, lr0)])
    return out


def mean(weights, epochs):
    return {k: sum(weights[e][k] for e in epochs) / len(epochs) for k in weights[epochs[0]]}


def close(a, b, tol=1e-9):
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=tol, msg=k)


@pytest.mark.parametrize(
    "strategy, groups, batch_norm",
    [("cos", 1, False), ("linear", 1, False), ("cos", 2, False), ("linear", 2, True), ("cos", 1, True)],
)
def test_parity_with_lightning_stochastic_weight_averaging(tmp_path, strategy, groups, batch_norm):
    k, annealing = 3, 2  # Lightning's swa_epoch_start (1-based), litplug's start = k - 1
    swa_lrs = [0.05, 0.01] if groups == 2 else 0.05
    lightning = StochasticWeightAveraging(
        swa_lrs=swa_lrs, swa_epoch_start=k, annealing_epochs=annealing, annealing_strategy=strategy, device=None
    )
    _, ref_model, ref = run(lightning, tmp_path / "lightning", batch_norm=batch_norm, groups=groups)
    litplug = SWA(
        start_epoch=k - 1,
        swa_lrs=swa_lrs,
        annealing_epochs=annealing,
        annealing_strategy=strategy,
        update_bn=batch_norm,
    )
    _, model, rec = run(litplug, tmp_path / "litplug", batch_norm=batch_norm, groups=groups)

    # One learning-rate schedule, the one asked for, and one trajectory.
    assert rec.lrs == ref.lrs
    base = [0.2, 0.1] if groups == 2 else [0.2]
    want = expected_lrs(base, swa_lrs if groups == 2 else [swa_lrs], k - 1, annealing, strategy)
    for got, exp in zip(rec.lrs.values(), want):
        assert got == pytest.approx(exp, rel=1e-12, abs=0)
    assert rec.lrs[EPOCHS - 1] == pytest.approx(swa_lrs if groups == 2 else [swa_lrs], rel=1e-12)
    assert all(s == [SWALR] for e, s in rec.schedulers.items() if e >= k - 1)
    for e in range(EPOCHS):
        close(rec.weights[e], ref.weights[e], tol=0)

    # Both averages are uniform means of that trajectory, over windows one epoch apart. With
    # BatchNorm, Lightning's extra epoch ends on an optimizer step (its last batch steps with the
    # gradient and momentum left from the last training step), so its average is read from the
    # callback's averaged copy of the module; litplug's model ends on its average.
    params = lambda m: {n: p.detach() for n, p in m.named_parameters()}  # noqa: E731
    ours, theirs = params(model), params(lightning._average_model if batch_norm else ref_model)
    close(ours, mean(rec.weights, list(range(k - 1, EPOCHS))))
    close(theirs, mean(ref.weights, list(range(k - 2, EPOCHS - 1))))
    n = EPOCHS - k + 1
    assert litplug.updates == n == int(lightning.n_averaged)
    close(
        {name: n * (ours[name] - theirs[name]) for name in ours},
        {name: rec.weights[EPOCHS - 1][name] - rec.weights[k - 2][name] for name in ours},
    )

    if batch_norm:  # both recompute the statistics of their average with one pass over the data
        for final, average in ((model, ours), (ref_model, theirs)):
            fresh = Net(batch_norm=True).double()
            fresh.load_state_dict({**final.state_dict(), **average})
            torch.optim.swa_utils.update_bn(final.train_dataloader(), fresh)
            for (name, got), want in zip(final.named_buffers(), fresh.buffers()):
                torch.testing.assert_close(got, want, rtol=0, atol=1e-9, msg=name)


# -- Lightning's test scenarios, against litplug's SWA ---------------------------------------------


def test_initial_state():
    swa = SWA(swa_lrs=0.01, start_epoch=0.1, annealing_epochs=1, annealing_strategy="linear")
    assert (swa.swa_lrs, swa.start_epoch, swa.annealing_epochs, swa.annealing_strategy) == (0.01, 0.1, 1, "linear")
    assert swa.updates == 0 and swa.average_tensors() == {} and swa.last_update == -1
    assert swa.state_dict()["scheduler"] is None
    assert SWA().swa_lrs is None  # the user's schedule keeps running


@pytest.mark.parametrize("interval", ["epoch", "step"])
def test_scheduler_swapped_for_swalr_at_start(tmp_path, interval):
    swa = SWA(start_epoch=2, swa_lrs=0.1, annealing_epochs=2)
    with pytest.warns(UserWarning, match=rf"from epoch 2 .* replaces the scheduler .*StepLR\(interval='{interval}'"):
        trainer, _, rec = run(swa, tmp_path, interval=interval)
    assert all(rec.schedulers[e] == [torch.optim.lr_scheduler.StepLR] for e in range(2))
    assert all(rec.schedulers[e] == [SWALR] for e in range(2, EPOCHS))
    config = trainer.lr_scheduler_configs[0]
    assert (config.interval, config.frequency) == ("epoch", 1)
    assert config.scheduler._step_count == EPOCHS - 2 + 1  # once when built, then at every epoch end
    assert rec.lrs[4] == rec.lrs[5] == [0.1]
    assert swa.updates == EPOCHS - 2
    if interval == "epoch":
        assert rec.lrs[2] == pytest.approx([0.2 * 0.7**2], rel=1e-12)  # epoch `start_epoch` keeps its rate
    else:  # StepLR stepped after every batch before the swap
        assert rec.lrs[2] == pytest.approx([0.2 * 0.7 ** (2 * BATCHES)], rel=1e-12)


def test_without_a_scheduler_swalr_is_added_and_none_keeps_the_users(tmp_path):
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="SWA: from epoch")  # nothing is replaced: no warning
        _, _, rec = run(SWA(start_epoch=1, swa_lrs=0.05, annealing_epochs=0), tmp_path / "none", scheduler=None)
    assert rec.schedulers[0] == [] and rec.schedulers[1] == [SWALR]
    assert [lrs[0] for lrs in rec.lrs.values()] == [0.2] + [0.05] * (EPOCHS - 1)  # 0 epochs: at once

    _, _, rec = run(SWA(start_epoch=1), tmp_path / "users")  # swa_lrs=None: StepLR runs to the end
    assert [lrs[0] for lrs in rec.lrs.values()] == pytest.approx([0.2 * 0.7**e for e in range(EPOCHS)], rel=1e-12)
    assert all(s == [torch.optim.lr_scheduler.StepLR] for s in rec.schedulers.values())


def test_several_schedulers_are_all_replaced_with_a_warning(tmp_path):
    with pytest.warns(UserWarning, match=r"replaces all 2 schedulers .*StepLR.*LambdaLR"):
        _, _, rec = run(SWA(start_epoch=1, swa_lrs=0.05, annealing_epochs=1), tmp_path, scheduler="two")
    assert rec.schedulers[1] == [SWALR] and rec.lrs[EPOCHS - 1] == [0.05]


def test_multiple_parameter_groups(tmp_path):
    swa_lrs = [0.123, 0.321]
    logger = TensorBoardLogger(tmp_path / "tb")
    swa = SWA(start_epoch=1, swa_lrs=swa_lrs, annealing_epochs=2)
    trainer, _, rec = run(swa, tmp_path, groups=2, scheduler=None, logger=logger)
    groups = trainer.optimizers[0].param_groups
    assert [g["swa_lr"] for g in groups] == swa_lrs
    assert rec.lrs[1] == [0.2, 0.1] and rec.lrs[3] == rec.lrs[EPOCHS - 1] == swa_lrs
    assert rec.lrs[2] == pytest.approx([0.2 / 2 + 0.123 / 2, 0.1 / 2 + 0.321 / 2], rel=1e-12)  # cos at t = 1/2
    scalars = read_scalars(tmp_path / "tb")  # the rate each epoch ran at, from the swap on, per group
    for i in range(2):
        logged = [v for _, v in scalars[f"swa/lr_{i}"]]
        assert logged == pytest.approx([rec.lrs[e][i] for e in range(1, EPOCHS)], rel=1e-6)

    with pytest.raises(ValueError, match=r"`swa_lrs` has 3 learning rates .* 2 parameter groups"):
        run(SWA(start_epoch=1, swa_lrs=[0.1, 0.2, 0.3]), tmp_path / "bad", groups=2)


@pytest.mark.parametrize("scheduler", ["step", "lambda"])
@pytest.mark.parametrize("crash_on_epoch", [1, 3])
def test_resume_mid_averaging_is_bit_exact(tmp_path, crash_on_epoch, scheduler):
    """Interrupted before the swap (epoch 1) or inside the annealing (epoch 3 of start 2 and 3
    annealing epochs) and resumed from the last epoch-end checkpoint: the same rates, the same
    average, the same final weights (with BatchNorm recomputed) as an uninterrupted run."""
    make = lambda: SWA(start_epoch=2, swa_lrs=0.05, annealing_epochs=3)  # noqa: E731
    net = {"batch_norm": True, "scheduler": scheduler}
    full_swa = make()
    _, full, full_rec = run(full_swa, tmp_path / "full", **net)

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    with pytest.raises(RuntimeError, match="crash for the resume test"):
        run(make(), tmp_path / "crashed", extra=[ckpt], crash_on_epoch=crash_on_epoch, **net)
    swa = make()
    _, resumed, rec = run(swa, tmp_path / "resumed", ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"), **net)

    assert sorted(rec.lrs) == list(range(crash_on_epoch, EPOCHS))
    assert all(rec.lrs[e] == full_rec.lrs[e] for e in rec.lrs)
    assert swa.updates == full_swa.updates == EPOCHS - 2
    for name, value in full.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name


def test_resume_without_scheduler_state_starts_swalr_late_with_a_warning(tmp_path):
    """A checkpoint of a run without ``swa_lrs``, resumed with it after ``start_epoch``: SWALR begins at
    the resumed epoch (from the rate the user's schedule reached), and a warning says so."""
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    with pytest.raises(RuntimeError, match="crash for the resume test"):
        run(SWA(start_epoch=2), tmp_path / "crashed", extra=[ckpt], crash_on_epoch=4)
    swa = SWA(start_epoch=2, swa_lrs=0.05, annealing_epochs=1)
    with pytest.warns(UserWarning, match=r"begins at epoch 4, after `start_epoch` \(epoch 2\)"):
        _, _, rec = run(swa, tmp_path / "resumed", ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert rec.lrs[4] == pytest.approx([0.2 * 0.7**4], rel=1e-12) and rec.lrs[5] == [0.05]
    assert rec.schedulers[4] == [SWALR] and swa.updates == EPOCHS - 2


def ddp_worker(strategy, tmp_dir, kind):
    from functools import partial

    from litplug.datamodules import Digits

    seed_everything(0)
    model = Classifier(
        MLP(input_shape=[1, 8, 8], num_outputs=10, hidden=[16], batch_norm=True),
        optimizer=partial(torch.optim.SGD, lr=0.2),
        lr_scheduler=partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.7),
    )
    swa, rec = SWA(start_epoch=1, swa_lrs=0.05, annealing_epochs=2, annealing_strategy="linear"), Recorder(4)
    trainer = Trainer(
        default_root_dir=tmp_dir, strategy=make_strategy(kind), accelerator="cpu", devices=2, max_epochs=4,
        limit_train_batches=3, limit_val_batches=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[swa, rec],
    )  # fmt: skip
    trainer.fit(model, Digits(batch_size=16))
    return {"lrs": rec.lrs, "schedulers": rec.schedulers, "average": swa.averaged_state_dict(), "updates": swa.updates}


@pytest.mark.parametrize("kind", ["ddp", "fsdp2"])
def test_ddp_and_fsdp2_ranks_follow_one_schedule(tmp_path, kind):
    r0, r1 = run_distributed(ddp_worker, kind, tmp_path, kind=kind)
    want = [0.2, 0.2 * 0.7, 0.2 * 0.7 / 2 + 0.05 / 2, 0.05]  # linear, 2 annealing epochs from epoch 1
    for r in (r0, r1):
        assert [lr for (lr,) in r["lrs"].values()] == pytest.approx(want, rel=1e-12)
        assert r["schedulers"][0] != [SWALR] and r["schedulers"][1] == [SWALR] and r["updates"] == 3
    assert r0["lrs"] == r1["lrs"]
    for name, value in r0["average"].items():
        assert torch.equal(value, r1["average"][name]), name


def test_manual_optimisation_is_refused_with_swa_lrs_and_runs_without(tmp_path):
    with pytest.raises(ValueError, match=r"swa_lrs=0.05.*automatic_optimization = False.*swa_lrs=None"):
        run(SWA(start_epoch=1, swa_lrs=0.05), tmp_path / "refused", manual=True, scheduler=None)
    swa = SWA(start_epoch=1)
    run(swa, tmp_path / "runs", manual=True, scheduler=None)
    assert swa.updates == EPOCHS - 1


def test_swa_start_beyond_max_epochs_fails_at_setup(tmp_path):
    with pytest.raises(ValueError, match="`start_epoch` = 5"):
        fit(tmp_path, SWA(start_epoch=5), epochs=3)


def test_swa_mean_of_epoch_snapshots_and_bn_pass(tmp_path):
    probe = Probe()
    swa = SWA(start_epoch=0.5, update_bn=True)
    logger = TensorBoardLogger(tmp_path / "tb")
    trainer, model = fit(tmp_path, swa, epochs=4, probe=probe, logger=logger, log_every_n_steps=1)
    assert swa.updates == 2  # epochs 2 and 3 of 4
    final = state_of(model)
    snaps = probe.epoch_snapshots[2:]
    for k in final:
        if k.startswith("backbone.") and "running" not in k and "num_batches" not in k:
            torch.testing.assert_close(final[k], (snaps[0][k] + snaps[1][k]) / 2, rtol=1e-6, atol=1e-6, msg=k)
    # BatchNorm statistics: one pass over the (limited) training data with the averaged weights
    ref = small_classifier().backbone
    ref.load_state_dict({k[len("backbone.") :]: v for k, v in final.items()})
    loader = Digits(batch_size=32).train_dataloader()
    loader.sampler.set_epoch(3)  # the pass runs at the end of fit, over the last epoch's order
    batches = [b for _, b in zip(range(4), loader)]
    torch.optim.swa_utils.update_bn(batches, ref)
    assert_states_equal({"backbone." + k: v for k, v in state_of(ref).items()}, final)
    assert_states_equal(swa.averaged_state_dict(""), final)
    scalars = read_scalars(tmp_path / "tb")
    assert [v for _, v in scalars["swa/updates"]] == [1.0, 2.0]
    assert [v for _, v in scalars["swa/weight"]] == [1.0, 0.5]


class _Stream(torch.utils.data.IterableDataset):
    """8 samples of 8x8 digits-like data, no length."""

    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        for _ in range(8):
            yield torch.rand(1, 8, 8, generator=g, dtype=torch.float64), int(torch.randint(0, 10, (), generator=g))


class _EpochEnds(Callback):
    def __init__(self):
        self.weights = []

    def on_train_epoch_end(self, trainer, pl_module):
        self.weights.append({k: v.detach().clone() for k, v in pl_module.named_parameters()})


def test_swa_snapshots_data_without_length_and_integer_start_with_max_steps(tmp_path):
    from torch.utils.data import DataLoader

    loader = DataLoader(_Stream(), batch_size=4)  # 2 batches per epoch, unknown to the Trainer
    for name, kwargs in (("epochs", {"max_epochs": 3}), ("steps", {"max_steps": 6, "max_epochs": None})):
        seed_everything(0)
        swa, ends = SWA(start_epoch=1, update_bn=False, final_weights="live"), _EpochEnds()
        model = small_classifier(batch_norm=False)
        fast_trainer(tmp_path / name, precision="64-true", limit_val_batches=0, callbacks=[ends, swa], **kwargs).fit(
            model, loader
        )
        assert swa.updates == 2, name  # epochs 1 and 2
        avg = swa.averaged_state_dict()
        for key in ends.weights[0]:
            want = (ends.weights[1][key] + ends.weights[2][key]) / 2
            torch.testing.assert_close(avg[key], want, rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match="SWA\\(start_epoch=0.5\\) is a fraction of `max_epochs`.*epoch index"):
        fast_trainer(tmp_path, max_steps=2, max_epochs=None, callbacks=[SWA(start_epoch=0.5)]).fit(
            small_classifier(), loader
        )
