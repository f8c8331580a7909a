"""The per-example base of ELR and PS-KD (litplug.callbacks.per_example): bad set-ups fail before
training with errors that say what to do; under DDP a mid-epoch resume is exact."""

import pytest
import torch
from foreign import features
from harness import fast_trainer, make_strategy, run_distributed, state_of
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from litplug.callbacks import ELR, PSKD
from litplug.datamodules import Digits, Indexed
from litplug.modules import MLP, Classifier


def test_bad_setups_fail_before_training(tmp_path):
    model = Classifier(MLP(input_shape=[6], num_outputs=3), 3)
    for callback in (ELR(), PSKD()):
        with pytest.raises(TypeError, match="Wrap it: `litplug.datamodules.Indexed"):
            fast_trainer(tmp_path, callbacks=[callback]).fit(model, features())
        wrong = Classifier(MLP(input_shape=[5], num_outputs=3), 3)
        with pytest.raises(ValueError, match=f"{type(callback).__name__} needs a classifier-like module"):
            fast_trainer(tmp_path, callbacks=[callback]).fit(wrong, Indexed(features()))
        assert wrong.global_step == 0


def _ddp_fit(tmp_dir, checkpoints=(), **kwargs):
    seed_everything(0)
    # float64 before fit: Lightning loads a checkpoint into the module before the precision plugin converts it
    model = Classifier(MLP(input_shape=[1, 8, 8], num_outputs=10), num_classes=10).double()
    callbacks = [ELR(beta=0.7, lam=3.0), PSKD(alpha=0.8)]
    trainer = Trainer(
        strategy=make_strategy("ddp"),
        accelerator="cpu",
        devices=2,
        precision="64-true",
        max_epochs=3,
        limit_train_batches=4,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        default_root_dir=str(tmp_dir),
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        callbacks=[*callbacks, *checkpoints],
        **kwargs,
    )
    return trainer, model, Indexed(Digits(batch_size=8)), callbacks


def resume_ddp_worker(strategy, tmp_dir):
    # the uninterrupted run saves a checkpoint at step 6, two batches into its second epoch
    ckpt = ModelCheckpoint(dirpath=tmp_dir / "ckpt", every_n_train_steps=6, save_top_k=-1, filename="{step}")
    trainer, model, data, callbacks = _ddp_fit(tmp_dir / "full", [ckpt])
    trainer.fit(model, data)
    full = state_of(model), [c.state.clone() for c in callbacks]
    trainer, model, data, callbacks = _ddp_fit(tmp_dir / "resumed", enable_checkpointing=False)
    trainer.fit(model, data, ckpt_path=str(tmp_dir / "ckpt" / "step=6.ckpt"))
    return {"full": full, "resumed": (state_of(model), [c.state.clone() for c in callbacks])}


def test_mid_epoch_resume_under_ddp_equals_the_uninterrupted_run(tmp_path):
    """2 ranks, float64: the per-example tables are equal on every rank at every step, so the
    checkpoint rank 0 saves in the middle of an epoch holds the rows rank 1 updated too."""
    ranks = run_distributed(resume_ddp_worker, "ddp", tmp_path)
    for r in ranks:
        (weights, tables), (weights_resumed, tables_resumed) = r["full"], r["resumed"]
        for key, value in weights.items():
            assert torch.equal(weights_resumed[key], value), key
        for name, table, resumed in zip(("ELR", "PSKD"), tables, tables_resumed):
            assert torch.equal(resumed, table), name
            assert torch.equal(table, ranks[0]["full"][1][0 if name == "ELR" else 1]), f"{name}: ranks differ"
