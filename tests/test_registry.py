"""Registry-driven checks that every public callback (tests/registry.py) runs under ddp on 2 CPU
ranks with identical weights on both, that a run interrupted at an epoch boundary and resumed
from its checkpoint ends exactly like an uninterrupted one, and that each works on modules
litplug did not write (tests/foreign.py) or refuses them at setup saying why."""

import contextlib
import copy
import inspect

import foreign
import pytest
import torch
from harness import fast_trainer, make_strategy, run_distributed, state_of
from lightning.fabric.utilities.apply_func import apply_to_collection
from lightning.pytorch import Callback, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from registry import CASES, COLUMNS

import litplug.callbacks
from litplug.callbacks import (
    ELR,
    EMA,
    PSKD,
    SAM,
    SWA,
    BoundTightness,
    CheckpointSoup,
    DataPruning,
    GradientAscentSearch,
    IBPWarmup,
    SharpnessMonitor,
    SurrogateSharpness,
    UnlearningEvaluation,
    UnlearningMask,
    WiSEFT,
)

STEPS_PER_EPOCH = 4


def test_every_public_callback_is_registered_under_its_one_name():
    public = {
        name: obj
        for name in litplug.callbacks.__all__
        if inspect.isclass(obj := getattr(litplug.callbacks, name)) and issubclass(obj, Callback)
    }
    # One public name per class: the name is the class's own, and no class is a renamed copy of another.
    assert all(obj.__name__ == name for name, obj in public.items())
    assert not [n for n, obj in public.items() if obj.__base__ in public.values()]
    assert set(public) <= set(CASES), f"callbacks missing from tests/registry.py: {sorted(set(public) - set(CASES))}"


def _fit(case, tmp_dir, epochs, **kwargs):
    seed_everything(0)
    model, data = case.model(), case.data()
    callbacks = case.callbacks()
    trainer = fast_trainer(
        tmp_dir,
        max_epochs=epochs,
        limit_train_batches=STEPS_PER_EPOCH,
        limit_val_batches=2,
        callbacks=list(callbacks),
        **case.trainer,
        **kwargs,
    )
    return trainer, model, data, callbacks


def ddp_worker(strategy, tmp_dir):
    out = {}
    for name, case in CASES.items():
        # A Strategy instance is bound to its first Trainer: every case gets a fresh one.
        trainer, model, data, callback = _fit(case, tmp_dir / name, 2, strategy=make_strategy("ddp"), devices=2)
        trainer.fit(model, data)
        out[name] = state_of(model)
    return out


@pytest.mark.skipif(not CASES, reason="no callbacks registered yet")
def test_every_callback_under_ddp(tmp_path):
    r0, r1 = run_distributed(ddp_worker, "ddp", tmp_path)
    assert set(r0) == set(CASES)
    for name in CASES:
        for key, value in r0[name].items():
            assert torch.equal(value, r1[name][key]), f"{name}: ranks differ at {key}"


def _callback_state(callbacks):
    return [{k: (v.clone() if torch.is_tensor(v) else v) for k, v in c.state_dict().items()} for c in callbacks]


def _assert_same(a, b, where):
    if torch.is_tensor(a):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


class _Cut(Exception):
    pass


class _CutAt(Callback):
    """Raise at the start of the batch of training step ``step`` (a run that dies there)."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step - 1:
            raise _Cut


@pytest.mark.parametrize("at", ["epoch_end", "mid_epoch"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_callback_resume_matches_uninterrupted(name, at, tmp_path):
    """Resumed from the checkpoint of epoch 0's end, or of step 6 (the middle of epoch 1)."""
    case = CASES[name]
    trainer, model, data, callback = _fit(case, tmp_path / "full", 2)
    trainer.fit(model, data)
    full_state, full_cb = state_of(model), _callback_state(callback)

    if at == "epoch_end":
        ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
        trainer, model, data, callback = _fit(case, tmp_path / "part", 1, enable_checkpointing=True)
    else:  # the run is cut by an error at the batch after its step-6 checkpoint
        step = STEPS_PER_EPOCH + 2
        ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=step)
        trainer, model, data, callback = _fit(case, tmp_path / "part", 2, enable_checkpointing=True)
        trainer.callbacks.append(_CutAt(step + 1))
    trainer.callbacks.append(ckpt)
    with pytest.raises(_Cut) if at == "mid_epoch" else contextlib.nullcontext():
        trainer.fit(model, data)
    if at == "mid_epoch":
        assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["global_step"] == step
    trainer, model, data, callback = _fit(case, tmp_path / "resumed", 2)
    trainer.fit(model, data, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))

    for key, value in full_state.items():
        torch.testing.assert_close(
            state_of(model)[key], value, rtol=0, atol=0, msg=f"{name}: {key} differs after resume"
        )
    _assert_same(_callback_state(callback), full_cb, f"{name}.state_dict")


# --------------------------------------------------------------------------------------------
# Foreign-module matrix: every public callback x modules litplug did not write (registry.COLUMNS).
# A cell works, checked against its equation where one exists, or refuses at setup saying why.
# --------------------------------------------------------------------------------------------

REFUSALS = {
    **{("IBPWarmup", c): "IBPWarmup needs the module to satisfy CertifiedModule" for c in COLUMNS},
    **{("BoundTightness", c): "BoundTightness needs the module to satisfy CertifiedModule" for c in COLUMNS},
    **{
        ("GradientAscentSearch", c): "GradientAscentSearch needs the datamodule to satisfy OfflineDesignsData"
        for c in COLUMNS
    },
    (
        "UnlearningMask",
        "boring",
    ): "needs the datamodule to satisfy ForgetRetainData .*lacks \\['forget_dataloader', 'retain_dataloader'\\]",
    **{
        (name, c): f"{name} does not support manual optimisation"
        for c in ("manual", "two_optimizers")
        for name in ("SAM", "SurrogateSharpness")
    },
    **{
        (name, "boring"): f"{name}.* needs a classifier-like module.*not .inputs, targets."
        for name in ("DataPruning", "ELR", "PSKD")
    },
    **{
        (name, "lm"): f"{name}.* needs a classifier-like module.*targets have shape .1, 8."
        for name in ("DataPruning", "ELR", "PSKD")
    },
    (
        "SurrogateSharpness",
        "lm",
    ): "SurrogateSharpness needs a surrogate whose forward maps the inputs alone to predictions; "
    ".*\\['inputs', 'target'\\]",
}


class Recorder(Callback):
    """Live parameters after every optimizer step and at every epoch end; the micro-batches of the
    first optimizer step."""

    def __init__(self):
        self.steps, self.epochs, self.batches, self._last = [], [], [], 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 0 and pl_module.automatic_optimization:
            self.batches.append(apply_to_collection(batch, torch.Tensor, lambda t: t.detach().clone()))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step != self._last:
            self._last = trainer.global_step
            self.steps.append(_params(pl_module))

    def on_train_epoch_end(self, trainer, pl_module):
        self.epochs.append(_params(pl_module))


def _params(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _fit_cell(column, callbacks, tmp_dir, **kwargs):
    """4 batches in float64; returns the trained module, a copy of its initial state, the Trainer."""
    seed_everything(0)
    model, data = column.model(), column.data()
    start = copy.deepcopy(model).double()
    args = {"limit_train_batches": 4, "limit_val_batches": 0, **column.trainer, **kwargs}
    trainer = fast_trainer(tmp_dir, precision="64-true", callbacks=callbacks, **args)
    trainer.fit(model, data)
    return model, start, trainer


def _loss_value(output):
    return output["loss"] if isinstance(output, dict) else output


def _ema_cell(column, tmp_dir):
    d = 0.5
    rec, ema = Recorder(), EMA(decay=d, evaluate_with="live", final_weights="live")
    _, _, trainer = _fit_cell(column, [rec, ema], tmp_dir)
    w, k = rec.steps, len(rec.steps)  # one per training step: a batch that reached an optimizer step
    assert k == ema.updates == ema.steps >= 2
    assert trainer.global_step == k * len(trainer.optimizers)
    got = ema.averaged_state_dict()
    for name in w[0]:  # avg_k = d^(k-1) w_1 + sum_{t>=2} (1 - d) d^(k-t) w_t
        want = d ** (k - 1) * w[0][name] + sum((1 - d) * d ** (k - t) * w[t - 1][name] for t in range(2, k + 1))
        torch.testing.assert_close(got[name], want, rtol=1e-12, atol=1e-12)


def _swa_cell(column, tmp_dir):
    rec, swa = Recorder(), SWA(start_epoch=0, update_bn=False, evaluate_with="live", final_weights="live")
    _fit_cell(column, [rec, swa], tmp_dir, max_epochs=2, limit_train_batches=2)
    assert swa.updates == 2
    got = swa.averaged_state_dict()
    for name, first in rec.epochs[0].items():
        torch.testing.assert_close(got[name], (first + rec.epochs[1][name]) / 2, rtol=1e-12, atol=1e-12)


def _sam_cell(column, tmp_dir, rho=0.05, lr=0.1):
    """One optimizer step equals a hand-written SAM step with the module's own training_step:
    g at w over the micro-batches, e = rho g / ||g||, g' at w + e, clipped, w - lr g'."""
    rec = Recorder()
    model, ref, _ = _fit_cell(column, [rec, SAM(rho=rho)], tmp_dir, max_steps=1)
    micro = [
        apply_to_collection(b, torch.Tensor, lambda t: t.double() if t.is_floating_point() else t) for b in rec.batches
    ]
    params = [p for p in ref.parameters() if p.requires_grad]
    w0 = [p.detach().clone() for p in params]

    def grads():
        for p in params:
            p.grad = None
        for b in micro:
            (_loss_value(ref.training_step(b, 0)) / len(micro)).backward()
        return [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]

    ref.train()
    g = grads()
    norm = torch.sqrt(sum((t**2).sum() for t in g))
    with torch.no_grad():
        for p, t in zip(params, g):
            p.add_(rho * t / (norm + 1e-12))
    g2 = grads()
    clip = column.trainer.get("gradient_clip_val")
    if clip:
        coef = min(1.0, clip / (float(torch.sqrt(sum((t**2).sum() for t in g2))) + 1e-6))
        g2 = [t * coef for t in g2]
    got = [p for p in model.parameters() if p.requires_grad]
    for p, w, t in zip(got, w0, g2):
        torch.testing.assert_close(p.detach(), w - lr * t, rtol=1e-10, atol=1e-12)
    assert len(micro) == column.trainer.get("accumulate_grad_batches", 1)


def _ignite_cell(column, tmp_dir, rho=0.05, radius=0.05, lam=0.1, lr=0.1):
    """One optimizer step equals IGNITE's update by hand, G the mean prediction on the inputs:
    grad L(w) + (lam rho / radius) (grad G(w + radius grad G / ||grad G||) - grad G(w)), clipped."""
    rec, cb = Recorder(), SurrogateSharpness(rho=rho, radius=radius, epsilon=0.0, lambda_init=lam, lambda_lr=0.1)
    model, ref, _ = _fit_cell(column, [rec, cb], tmp_dir, max_steps=1)
    assert cb.multiplier > lam  # dual ascent on rho ||grad G|| > epsilon = 0
    micro = [
        apply_to_collection(b, torch.Tensor, lambda t: t.double() if t.is_floating_point() else t) for b in rec.batches
    ]
    params = [p for p in ref.parameters() if p.requires_grad]
    w0 = [p.detach().clone() for p in params]

    def grads(objective):
        for p in params:
            p.grad = None
        for b in micro:
            (objective(b) / len(micro)).backward()
        return [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]

    def mean_prediction(b):
        return ref(b if isinstance(b, torch.Tensor) else b[0]).mean()

    ref.train()
    g_loss = grads(lambda b: _loss_value(ref.training_step(b, 0)))
    g_g = grads(mean_prediction)
    norm = torch.sqrt(sum((t**2).sum() for t in g_g))
    with torch.no_grad():
        for p, t in zip(params, g_g):
            p.add_(radius * t / (norm + 1e-12))
    g_hat = grads(mean_prediction)
    c = float(torch.tensor(lam, dtype=torch.float32) * rho / radius)  # the multiplier is float32 state
    final = [gl + c * (gh - gg) for gl, gg, gh in zip(g_loss, g_g, g_hat)]
    clip = column.trainer.get("gradient_clip_val")
    if clip:
        coef = min(1.0, clip / (float(torch.sqrt(sum((t**2).sum() for t in final))) + 1e-6))
        final = [t * coef for t in final]
    for p, w, t in zip([p for p in model.parameters() if p.requires_grad], w0, final):
        torch.testing.assert_close(p.detach(), w - lr * t, rtol=1e-10, atol=1e-12)


def _monitor_cell(column, tmp_dir):
    plain, _, _ = _fit_cell(column, [], tmp_dir / "plain")
    model, _, trainer = _fit_cell(column, [SharpnessMonitor(rho=0.05)], tmp_dir / "monitored")
    for (name, a), b in zip(plain.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), f"the monitor changed training at {name}"
    assert torch.isfinite(trainer.callback_metrics["sharpness/model"])
    if not model.automatic_optimization:
        assert model.steps == 4 and trainer.global_step == 4 * len(trainer.optimizers)


def _mask_cell(column, tmp_dir):
    mask = UnlearningMask("saliency", ratio=0.3)
    model, start, _ = _fit_cell(column, [mask], tmp_dir)
    now, before = dict(model.named_parameters()), dict(start.named_parameters())
    moved = False
    for name, keep in mask.masks.items():
        p, s = now[name].detach(), before[name].detach()
        assert torch.equal(p[~keep], s[~keep]), f"{name}: a frozen entry moved"
        moved |= not torch.equal(p[keep], s[keep])
    assert moved and sum(int(m.sum()) for m in mask.masks.values()) == mask.num_selected


def _pruning_cell(column, tmp_dir):
    """GraNd after epoch 0 keeps half of the 64 samples; epoch 1 trains on exactly those."""
    from litplug.datamodules import Indexed

    class Seen(Callback):
        def __init__(self):
            self.seen = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.current_epoch == 1:
                self.seen += trainer.datamodule.batch_index.tolist()

    seen, pruning = Seen(), DataPruning("grand", keep=0.5, score_epoch=0)
    seed_everything(0)
    model = column.model()
    args = {"limit_train_batches": 4, "limit_val_batches": 0, **column.trainer}
    trainer = fast_trainer(tmp_dir, max_epochs=2, precision="64-true", callbacks=[pruning, seen], **args)
    trainer.fit(model, Indexed(column.data()))
    assert len(pruning.kept) == 32 and torch.isfinite(pruning.scores).all()
    assert seen.seen and set(seen.seen) <= set(pruning.kept.tolist())


def _evaluation_cell(column, tmp_dir):
    """Classifier columns (forget/retain loaders of (inputs, class) batches) are scored against a
    retain model (a fresh copy of the column's module); the others have no evaluation sets."""
    net = column.model()
    path = tmp_dir / "retain.pt"
    torch.save(getattr(net, "backbone", net).state_dict(), path)
    evaluation = UnlearningEvaluation(str(path))
    if column.data is foreign.features:
        _fit_cell(column, [evaluation], tmp_dir, limit_val_batches=1)
        assert 0 <= evaluation.results["forget_quality"] <= 1 and 0 <= evaluation.results["mia_loss"] <= 1
    else:
        with pytest.raises(TypeError, match="evaluation_sets"):
            _fit_cell(column, [evaluation], tmp_dir)


def _soup_cell(column, tmp_dir):
    """The uniform soup of the last two epoch ends is their mean."""
    rec = Recorder()
    model, _, _ = _fit_cell(column, [rec, CheckpointSoup(k=2, final_weights="uniform")], tmp_dir, max_epochs=3,
                            limit_val_batches=2)  # fmt: skip
    for name, value in model.named_parameters():
        want = (rec.epochs[1][name] + rec.epochs[2][name]) / 2
        torch.testing.assert_close(value.detach(), want, rtol=1e-12, atol=1e-12)


def _wise_cell(column, tmp_dir):
    """WiSE-FT with one alpha is the interpolation of the start and the trained weights."""
    rec = Recorder()
    model, start, _ = _fit_cell(column, [rec, WiSEFT(alpha=0.25)], tmp_dir, limit_val_batches=2)
    before = dict(start.named_parameters())
    for name, value in model.named_parameters():
        want = torch.lerp(before[name].detach(), rec.epochs[-1][name], 0.25)
        torch.testing.assert_close(value.detach(), want, rtol=1e-12, atol=1e-12)


def _noisy_cell(make):
    """The callback trains the module to finite weights that differ from plain training (its term
    reaches the gradient whatever the module's optimisation), with state for every sample seen."""

    def cell(column, tmp_dir):
        from litplug.datamodules import Indexed

        def fit(callbacks):
            seed_everything(0)
            model = column.model()
            args = {"limit_train_batches": 4, "limit_val_batches": 0, "max_epochs": 2, **column.trainer}
            fast_trainer(tmp_dir, precision="64-true", callbacks=callbacks, **args).fit(model, Indexed(column.data()))
            return model

        plain, callback = fit([]), make()
        model = fit([callback])
        assert all(torch.isfinite(p).all() for p in model.parameters())
        assert any(not torch.equal(a, b) for a, b in zip(plain.parameters(), model.parameters()))
        assert ((callback.state >= 0).all(dim=1) & (callback.state.sum(1) > 0)).sum() >= 8

    return cell


CELLS = {
    "CheckpointSoup": _soup_cell,
    "WiSEFT": _wise_cell,
    "DataPruning": _pruning_cell,
    "ELR": _noisy_cell(ELR),
    "PSKD": _noisy_cell(PSKD),
    "EMA": _ema_cell,
    "SWA": _swa_cell,
    "SAM": _sam_cell,
    "SurrogateSharpness": _ignite_cell,
    "SharpnessMonitor": _monitor_cell,
    "UnlearningMask": _mask_cell,
    "UnlearningEvaluation": _evaluation_cell,
    "IBPWarmup": lambda column, tmp_dir: _fit_cell(column, [IBPWarmup()], tmp_dir),
    "BoundTightness": lambda column, tmp_dir: _fit_cell(column, [BoundTightness()], tmp_dir),
    "GradientAscentSearch": lambda column, tmp_dir: _fit_cell(column, [GradientAscentSearch()], tmp_dir),
}


def test_matrix_covers_every_public_callback():
    single = {name for name in CASES if "+" not in name and "(" not in name}  # "X(variant)": X with other settings
    assert set(CELLS) == single


@pytest.mark.parametrize("column", sorted(COLUMNS))
@pytest.mark.parametrize("callback", sorted(CELLS))
def test_foreign_module_matrix(callback, column, tmp_path):
    refusal = REFUSALS.get((callback, column))
    if refusal is None:
        CELLS[callback](COLUMNS[column], tmp_path)
    else:
        # A module or datamodule lacking a Protocol's members is a TypeError; an unsupported setting a ValueError.
        with pytest.raises(TypeError if "to satisfy" in refusal else ValueError, match=refusal):
            CELLS[callback](COLUMNS[column], tmp_path)


def lm_ddp_worker(strategy, tmp_dir):
    out = {}
    for name, make in {
        "EMA": lambda: EMA(decay=0.5),
        "SWA": lambda: SWA(start_epoch=0),
        "SAM": lambda: SAM(rho=0.05),
        "SharpnessMonitor": lambda: SharpnessMonitor(),
        "UnlearningMask": lambda: UnlearningMask("saliency", ratio=0.3),
    }.items():
        seed_everything(0)
        column = COLUMNS["lm"]
        model, data, cb = column.model(), column.data(), make()
        trainer = fast_trainer(tmp_dir / name, strategy=copy.deepcopy(strategy), devices=2, max_epochs=2,
                               limit_train_batches=2, limit_val_batches=0, callbacks=[cb])  # fmt: skip
        trainer.fit(model, data)
        out[name] = {"state": state_of(model), "masks": getattr(cb, "masks", None)}
    return out


def test_lm_column_under_ddp(tmp_path):
    r0, r1 = run_distributed(lm_ddp_worker, "ddp", tmp_path)
    for name in r0:
        for key, value in r0[name]["state"].items():
            assert torch.equal(value, r1[name]["state"][key]), f"{name}: ranks differ at {key}"
    for key, mask in r0["UnlearningMask"]["masks"].items():
        assert torch.equal(mask, r1["UnlearningMask"]["masks"][key])
