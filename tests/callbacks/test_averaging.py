"""EMA and SWA: functional core against closed forms, Trainer behaviour, logging, export, bad
input, DDP and FSDP2 on 2 CPU ranks."""

import pytest
import torch
from harness import fast_trainer, make_strategy, read_scalars, run_distributed, state_of
from lightning.pytorch import Callback, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from litplug.callbacks import EMA, SWA
from litplug.datamodules import Digits
from litplug.functional import ema_decay
from litplug.modules import MLP, Classifier


def small_classifier(batch_norm=True):
    return Classifier(MLP(input_shape=[1, 8, 8], num_outputs=10, hidden=[16], batch_norm=batch_norm), num_classes=10)


class Probe(Callback):
    """Records full copies of the module's state at hooks (runs after the callback under test)."""

    def __init__(self):
        self.after_step, self.val_start, self.val_end, self.epoch_snapshots = [], [], [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after_step.append(state_of(pl_module))
        if batch_idx + 1 == trainer.num_training_batches:
            self.epoch_snapshots.append(self.after_step[-1])

    def on_validation_epoch_start(self, trainer, pl_module):
        self.val_start.append(state_of(pl_module))

    def on_validation_epoch_end(self, trainer, pl_module):
        self.val_end.append(state_of(pl_module))

    def on_test_epoch_start(self, trainer, pl_module):
        self.test_start = state_of(pl_module)


def fit(tmp_path, callback, epochs=2, batches=4, model=None, probe=None, **kwargs):
    seed_everything(0)
    model = model or small_classifier()
    callbacks = [callback] + ([probe] if probe else [])
    trainer = fast_trainer(
        tmp_path, max_epochs=epochs, limit_train_batches=batches, limit_val_batches=1, callbacks=callbacks, **kwargs
    )
    trainer.fit(model, Digits(batch_size=32))
    return trainer, model


def assert_states_equal(a, b, keys=None):
    for k in keys or a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_device_must_name_a_torch_device():
    # The bad-input matrix (tests/test_bad_inputs.py) covers every other bad argument; a device
    # string torch cannot parse is this argument's own case.
    with pytest.raises(ValueError, match="`device`"):
        EMA(device="gpu:x")


def test_swa_start_beyond_max_epochs_fails_at_setup(tmp_path):
    with pytest.raises(ValueError, match="`start_epoch` = 5"):
        fit(tmp_path, SWA(start_epoch=5), epochs=3)


def test_unverified_sharding_strategies_raise(tmp_path):
    from lightning.pytorch.strategies import FSDPStrategy

    trainer = fast_trainer(tmp_path, callbacks=[EMA()])
    trainer.strategy.__class__ = type("FakeFSDP", (FSDPStrategy,), {})  # FSDP1 itself needs CUDA to build
    with pytest.raises(ValueError, match="FakeFSDP"):
        EMA().setup(trainer, small_classifier(), "fit")


def test_mismatched_saved_average_raises():
    ema = EMA()
    ema.load_state_dict({"updates": 1, "last_step": 1, "steps": 1, "average": {"nope": torch.zeros(1)}})
    with pytest.raises(ValueError, match="missing"):
        ema._bind(small_classifier())


# ----------------------------------------------------------------------------- Trainer behaviour
def test_ema_swaps_for_validation_exactly_and_ends_on_average(tmp_path):
    probe = Probe()
    ema = EMA(decay=0.9, warmup=True, export_path=str(tmp_path / "ema.pt"))
    logger = TensorBoardLogger(tmp_path / "tb")
    trainer, model = fit(tmp_path, ema, probe=probe, logger=logger, log_every_n_steps=1, val_check_interval=2)
    assert ema.updates == 8 and len(probe.val_start) == 4
    # during validation the model holds the average, afterwards the live weights bit-exactly
    live_before_val = [probe.after_step[i] for i in (1, 3, 5, 7)]
    for before, during, after in zip(live_before_val, probe.val_start, probe.val_end):
        assert_states_equal(before, after)
        assert any(not torch.equal(before[k], during[k]) for k in before if k.endswith("weight"))
    # the average equals a hand-rolled EMA of the recorded live states, paired by name
    avg = {k: v.clone() for k, v in probe.after_step[0].items()}
    for t, live in enumerate(probe.after_step[1:], start=1):
        d = ema_decay(t, 0.9, warmup=True)
        for k, v in live.items():
            avg[k] = v.clone() if not v.is_floating_point() else d * avg[k] + (1 - d) * v
    final = state_of(model)
    for k in avg:
        torch.testing.assert_close(final[k], avg[k], rtol=1e-5, atol=1e-6, msg=k)
    assert (
        final["backbone.1.1.num_batches_tracked"] == probe.after_step[-1]["backbone.1.1.num_batches_tracked"]
    )  # copied
    assert_states_equal(probe.val_start[-1], final)  # last validation ran on the (final) average
    # logs: ema/decay follows the warmup rule, ema/updates counts
    scalars = read_scalars(tmp_path / "tb")
    assert [v for _, v in scalars["ema/updates"]] == [float(i) for i in range(1, 9)]
    assert [v for _, v in scalars["ema/decay"]] == pytest.approx([ema_decay(t, 0.9, True) for t in range(8)])
    # export: a plain state dict that loads into the bare backbone
    exported = torch.load(tmp_path / "ema.pt")
    bare = MLP(input_shape=[1, 8, 8], num_outputs=10, hidden=[16], batch_norm=True)
    bare.load_state_dict(exported)
    assert_states_equal({"backbone." + k: v for k, v in state_of(bare).items()}, final)
    assert_states_equal(exported, ema.averaged_state_dict("auto"))
    assert_states_equal(exported, ema.averaged_state_dict("backbone."))


def test_ema_without_update_keeps_trained_weights(tmp_path):
    probe = Probe()
    ema = EMA(start_step=100)
    trainer, model = fit(tmp_path, ema, probe=probe)
    assert ema.updates == 0
    assert_states_equal(probe.after_step[-1], state_of(model))
    assert_states_equal(probe.after_step[3], probe.val_start[0])  # validation used the live weights
    assert_states_equal(ema.averaged_state_dict(), state_of(model))


def test_ema_live_final_weights_every_n_steps(tmp_path):
    probe = Probe()
    ema = EMA(decay=0.5, every_n_steps=3, final_weights="live", evaluate_with="live")
    trainer, model = fit(tmp_path, ema, probe=probe)
    assert ema.updates == 3 and ema.last_update == 7  # after steps 1, 4 and 7 of 8
    assert_states_equal(probe.after_step[-1], state_of(model))
    assert_states_equal(probe.after_step[3], probe.val_start[0])
    avg = ema.averaged_state_dict()
    k = "backbone.2.weight"
    w = [probe.after_step[i][k] for i in (0, 3, 6)]
    torch.testing.assert_close(avg[k], 0.5 * (0.5 * w[0] + 0.5 * w[1]) + 0.5 * w[2])
    # test on the average, then back to the live weights, also after the module's storage moved
    # (as Lightning's teardown on GPUs does): the callback rebinds its average by name
    ema.evaluate_with = "average"
    model.to(torch.float64).to(torch.float32)
    trainer.test(model, Digits(batch_size=32), verbose=False)
    assert_states_equal(probe.test_start, ema.averaged_state_dict())
    assert_states_equal(probe.after_step[-1], state_of(model))


@pytest.mark.parametrize("after,every", [(0, 3), (2, 3)])
def test_ema_update_steps_match_lightning(tmp_path, after, every):
    """EMA updates after the same optimizer steps as Lightning's EMAWeightAveraging (both run in
    one Trainer): step index i = global_step - 1 with i >= start_step, i % n == 0."""
    from lightning.pytorch.callbacks import EMAWeightAveraging

    ours = EMA(decay=0.5, start_step=after, every_n_steps=every, final_weights="live", evaluate_with="live")
    peer = EMAWeightAveraging(decay=0.5, update_every_n_steps=every, update_starting_at_step=after)

    class Steps(Callback):
        ours_at, peer_at = [], []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if ours.updates > len(self.ours_at):
                self.ours_at.append(trainer.global_step)
            if int(peer._average_model.n_averaged) > len(self.peer_at):
                self.peer_at.append(trainer.global_step)

    steps = Steps()
    seed_everything(0)
    trainer = fast_trainer(
        tmp_path, max_epochs=1, limit_train_batches=11, limit_val_batches=0, callbacks=[ours, peer, steps]
    )
    trainer.fit(small_classifier(batch_norm=False), Digits(batch_size=32))
    assert steps.ours_at == steps.peer_at == [t for t in range(1, 12) if t - 1 >= after and (t - 1) % every == 0]


def test_ema_bf16_model_fp32_average(tmp_path):
    ema16, ema32 = EMA(decay=0.999), EMA(decay=0.999, dtype="float32")
    for ema in (ema16, ema32):
        trainer, model = fit(tmp_path, ema, model=small_classifier(batch_norm=False), precision="bf16-true")
        assert next(model.parameters()).dtype == torch.bfloat16
    assert next(iter(ema16.average_tensors().values())).dtype == torch.bfloat16
    assert next(iter(ema32.average_tensors().values())).dtype == torch.float32
    a16, a32 = ema16.averaged_state_dict(), ema32.averaged_state_dict()
    # the fp32 average moved away from the first snapshot where the bf16 one rounded updates away
    assert sum(int((a32[k].bfloat16() != a16[k]).sum()) for k in a16) > 0


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


# ----------------------------------------------------------------------------- YAML composition
@pytest.mark.parametrize("name, kind", [("ema", EMA), ("swa", SWA)])
def test_yaml_composition_with_classifier(tmp_path, monkeypatch, name, kind):
    from pathlib import Path

    from litplug.cli import LitplugCLI

    root = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(tmp_path)
    args = [
        "fit",
        "--config", str(root / "configs/digits/classifier.yaml"),
        "--config", str(root / f"configs/callbacks/{name}.yaml"),
        "--trainer.max_epochs=2", "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=1",
        "--trainer.enable_progress_bar=false", "--trainer.log_every_n_steps=1", "--test_after_fit=false",
        "--model.init_args.backbone.init_args.hidden=[16]",
    ]  # fmt: skip
    cli = LitplugCLI(args=args)
    callback = next(c for c in cli.trainer.callbacks if isinstance(c, kind))
    assert callback.updates == (6 if name == "ema" else 1)
    assert Path(callback.export_path).exists()
    scalars = read_scalars(tmp_path / "runs")
    assert f"{name}/updates" in scalars


def test_two_averaging_callbacks_on_the_model_conflict(tmp_path):
    with pytest.raises(ValueError, match="evaluate_with"):
        fit(tmp_path, EMA(), probe=SWA(start_epoch=0))
    fit(tmp_path, EMA(), probe=SWA(start_epoch=0, evaluate_with="live", final_weights="live"))  # composes


# ----------------------------------------------------------------------------- DDP and FSDP2
class ReferenceEMA(Callback):
    """Test-side single-process EMA of the gathered full weights (runs after the EMA callback)."""

    def __init__(self, decay):
        self.decay, self.t, self.avg = decay, 0, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        full = {k: v.double() if v.is_floating_point() else v for k, v in state_of(pl_module).items()}
        d = ema_decay(self.t, self.decay, warmup=True)
        if self.avg is None:
            self.avg = full
        else:
            self.avg = {k: (d * self.avg[k] + (1 - d) * v) if v.is_floating_point() else v for k, v in full.items()}
        self.t += 1


def distributed_worker(strategy, tmp_dir, kind):
    out = {}
    seed_everything(0)
    ema, ref = EMA(decay=0.8, warmup=True, final_weights="live"), ReferenceEMA(0.8)
    trainer = fast_trainer(
        tmp_dir / "ema",
        strategy=strategy,
        devices=2,
        max_epochs=2,
        limit_train_batches=3,
        limit_val_batches=1,
        callbacks=[ema, ref],
    )
    model = small_classifier()
    trainer.fit(model, Digits(batch_size=16))
    avg = ema.averaged_state_dict()
    # BatchNorm buffers are rank-local until the end of fit (then rank 0's are broadcast), so the
    # per-rank reference covers the parameters.
    params = [k for k, _ in model.named_parameters()]
    out["ema_err"] = max(float((avg[k].double() - ref.avg[k].double()).abs().max()) for k in params)
    out["ema_avg"] = avg
    out["local_numel"] = sum(a.numel() for a in ema.average_tensors().values())
    out["full_numel"] = sum(v.numel() for v in avg.values())
    live, final = ema.live_state_dict(), state_of(model)
    out["live_is_model"] = live.keys() == final.keys() and all(torch.equal(live[k], final[k]) for k in live)

    seed_everything(0)
    swa = SWA(start_epoch=0)
    trainer = fast_trainer(
        tmp_dir / "swa",
        strategy=make_strategy(kind),
        devices=2,
        max_epochs=2,
        limit_train_batches=3,
        limit_val_batches=1,
        callbacks=[swa],
    )
    model = small_classifier()
    trainer.fit(model, Digits(batch_size=16))
    out["swa_state"] = state_of(model)

    if kind == "fsdp2":  # interrupted at the epoch boundary and resumed: same average as above

        def run(epochs, sub, ckpt=None, checkpoint=None):
            seed_everything(0)
            cb = EMA(decay=0.8, warmup=True, final_weights="live")
            extra = [checkpoint] if checkpoint else []
            tr = fast_trainer(tmp_dir / sub, strategy=make_strategy(kind), devices=2, max_epochs=epochs,
                              limit_train_batches=3, limit_val_batches=1, callbacks=[cb, *extra],
                              enable_checkpointing=bool(checkpoint))  # fmt: skip
            tr.fit(small_classifier(), Digits(batch_size=16), ckpt_path=ckpt)
            return cb

        ckdir = tmp_dir / "ckpt"
        run(1, "part", checkpoint=ModelCheckpoint(dirpath=ckdir, save_last=True))
        resumed = run(2, "resumed", ckpt=str(ckdir / "last.ckpt"))
        out["resumed_avg"] = resumed.averaged_state_dict("")
        out["resumed_updates"] = resumed.updates
    return out


def test_ema_swa_ddp_ranks_agree(tmp_path):
    r0, r1 = run_distributed(distributed_worker, "ddp", tmp_path, kind="ddp")
    assert r0["ema_err"] < 1e-6 and r0["live_is_model"]
    assert r0["local_numel"] == r0["full_numel"]
    assert_states_equal(r0["ema_avg"], r1["ema_avg"])  # gathered: identical averages, no communication
    assert_states_equal(r0["swa_state"], r1["swa_state"])  # BN statistics all-reduced


def test_ema_fsdp2_shard_local_equals_single_process_and_resumes(tmp_path):
    r0, r1 = run_distributed(distributed_worker, "fsdp2", tmp_path, kind="fsdp2")
    for r in (r0, r1):
        assert r["ema_err"] < 1e-6 and r["live_is_model"]
    assert r0["local_numel"] + r1["local_numel"] < 2 * r0["full_numel"]  # each rank holds its shard only
    assert_states_equal(r0["ema_avg"], r1["ema_avg"])
    assert_states_equal(r0["swa_state"], r1["swa_state"])
    assert r0["resumed_updates"] == 6
    # Parameters resume exactly. BatchNorm buffers are rank-local under FSDP2 (not synchronised)
    # and the distributed checkpoint keeps one copy of the live ones, so they are not compared.
    params = [k for k in r0["ema_avg"] if "running_" not in k and "num_batches" not in k]
    assert_states_equal(r0["resumed_avg"], r0["ema_avg"], params)
    assert_states_equal(r1["resumed_avg"], r1["ema_avg"], params)


def test_checkpoints_hold_the_weights_their_metrics_were_measured_on(tmp_path):
    """evaluate_with="average": a checkpoint's state_dict is the average that ModelCheckpoint
    ranked; loading it fresh, or test(ckpt_path=...) with or without the callback (or on the
    training Trainer, whose callback holds a later average), evaluates exactly those weights."""
    seed_everything(0)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", monitor="val/loss", save_top_k=-1, filename="{epoch}")
    weights = ModelCheckpoint(
        dirpath=tmp_path / "w",
        monitor="val/loss",
        mode="max",
        save_top_k=-1,
        filename="{epoch}",
        save_weights_only=True,
    )
    trainer = fast_trainer(tmp_path, max_epochs=2, limit_train_batches=3, limit_val_batches=2, limit_test_batches=2,
                           callbacks=[EMA(decay=0.5), ckpt, weights], enable_checkpointing=True)  # fmt: skip
    model, data = small_classifier(), Digits(batch_size=16)
    with pytest.warns(UserWarning, match="save_weights_only=True\\) files hold the live weights"):
        trainer.fit(model, data)
    first = str(tmp_path / "ck" / "epoch=0.ckpt")
    ranked = float(ckpt.best_k_models[first])

    def fresh():
        return Classifier.load_from_checkpoint(first, backbone=small_classifier().backbone, weights_only=False)

    val = fast_trainer(tmp_path / "v", limit_val_batches=2).validate(fresh(), data, verbose=False)[0]["val/loss"]
    assert val == ranked
    test = [
        fast_trainer(tmp_path / "t0", limit_test_batches=2).test(fresh(), data, verbose=False),
        fast_trainer(tmp_path / "t1", limit_test_batches=2).test(
            small_classifier(), data, ckpt_path=first, verbose=False
        ),
        fast_trainer(tmp_path / "t2", limit_test_batches=2, callbacks=[EMA(decay=0.5)]).test(
            small_classifier(), data, ckpt_path=first, verbose=False
        ),
        trainer.test(model, data, ckpt_path=first, verbose=False),
    ]
    assert len({t[0]["test/loss"] for t in test}) == 1, test
    full = torch.load(first, weights_only=False)
    assert not torch.equal(
        full["callbacks"]["EMA"]["live"]["backbone.2.weight"], full["state_dict"]["backbone.2.weight"]
    )
    weights_only = torch.load(tmp_path / "w" / "epoch=0.ckpt", weights_only=False)["state_dict"]
    assert all(
        torch.equal(weights_only[k], v) for k, v in full["callbacks"]["EMA"]["live"].items() if k in weights_only
    )


def test_averaged_state_dict_uses_the_modules_own_names(tmp_path):
    from lightning.pytorch.demos.boring_classes import BoringModel

    seed_everything(0)
    ema = EMA(decay=0.5, export_path=str(tmp_path / "ema.pt"))
    model = BoringModel()
    fast_trainer(tmp_path, max_steps=2, limit_val_batches=0, callbacks=[ema]).fit(model)
    avg = ema.averaged_state_dict()
    assert avg.keys() == model.state_dict().keys() == {"layer.weight", "layer.bias"}
    BoringModel().load_state_dict(avg)
    assert_states_equal(avg, ema.averaged_state_dict("auto"))  # no backbone: nothing stripped
    assert_states_equal(avg, torch.load(tmp_path / "ema.pt"))
    assert ema.averaged_state_dict("layer.").keys() == {"weight", "bias"}


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
