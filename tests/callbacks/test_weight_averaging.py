"""The weight-averaging base of EMA and SWA: arguments checked at setup, checkpoints and exports,
YAML composition, two averaging callbacks on one model, DDP and FSDP2 on 2 CPU ranks."""

import pytest
import torch
from averaging_helpers import assert_states_equal, fit, small_classifier
from harness import fast_trainer, make_strategy, read_scalars, run_distributed, state_of
from lightning.pytorch import Callback, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from litplug.callbacks import EMA, SWA
from litplug.datamodules import Digits
from litplug.functional import ema_decay
from litplug.modules import Classifier


def test_device_must_name_a_torch_device():
    # The bad-input matrix (tests/test_bad_inputs.py) covers every other bad argument; a device
    # string torch cannot parse is this argument's own case.
    with pytest.raises(ValueError, match="`device`"):
        EMA(device="gpu:x")


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
