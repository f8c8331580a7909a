"""The per-example base of ELR and PS-KD (litplug.callbacks.per_example): bad set-ups fail before
training with errors that say what to do; under DDP a mid-epoch resume is exact (DataPruning's
too, in the same runs); under FSDP2 they equal one process."""

from functools import partial

import pytest
import torch
from foreign import Sharded, features
from harness import fast_trainer, make_strategy, run_distributed, state_of
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from litplug.callbacks import ELR, PSKD, DataPruning
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
    # pruned from epoch 1: the checkpoint is in the middle of a pruned epoch (Lightning's
    # DistributedSamplerWrapper around the kept set's shuffle)
    callbacks = [ELR(beta=0.7, lam=3.0), PSKD(alpha=0.8), DataPruning("grand", keep=0.5, score_epoch=0)]
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


def _states(callbacks):
    elr, pskd, pruning = callbacks
    return [elr.state.clone(), pskd.state.clone(), pruning.kept.clone(), pruning.scores.clone()]


def _sharded_fit(tmp_dir, world, **kwargs):
    """ELR and PS-KD on a float64 model at precision 32-true (ModelParallelStrategy refuses
    64-true); ``world`` ranks of batch 8 see the batches of one process of batch 16."""
    seed_everything(0)
    model = Classifier(MLP(input_shape=[6], num_outputs=3, hidden=[8]), 3, optimizer=partial(torch.optim.SGD, lr=0.5))
    callbacks = [ELR(beta=0.7, lam=3.0), PSKD(alpha=0.8)]
    trainer = fast_trainer(tmp_dir, max_epochs=3, precision="32-true", callbacks=callbacks, **kwargs)
    trainer.fit(model.double(), Indexed(Sharded(16 // world, world, torch.float64)))
    sharded = all(type(p).__name__ == "DTensor" for p in model.parameters())
    return state_of(model), [c.state.clone() for c in callbacks], sharded


def resume_ddp_worker(strategy, tmp_dir):
    # the uninterrupted run saves a checkpoint at step 6, two batches into its second epoch
    ckpt = ModelCheckpoint(dirpath=tmp_dir / "ckpt", every_n_train_steps=6, save_top_k=-1, filename="{step}")
    trainer, model, data, callbacks = _ddp_fit(tmp_dir / "full", [ckpt])
    trainer.fit(model, data)
    full = state_of(model), _states(callbacks)
    trainer, model, data, callbacks = _ddp_fit(tmp_dir / "resumed", enable_checkpointing=False)
    trainer.fit(model, data, ckpt_path=str(tmp_dir / "ckpt" / "step=6.ckpt"))
    resumed = state_of(model), _states(callbacks)
    fsdp2 = _sharded_fit(
        tmp_dir / "fsdp2", 2, strategy=make_strategy("fsdp2"), devices=2, use_distributed_sampler=False
    )
    return {"full": full, "resumed": resumed, "fsdp2": fsdp2}


def test_mid_epoch_resume_under_ddp_and_fsdp2_equal_one_process(tmp_path):
    """2 ranks, float64. DDP: the per-example tables are equal on every rank at every step, so the
    checkpoint rank 0 saves in the middle of an epoch holds the rows rank 1 updated too; with
    DataPruning's kept set and scores (pruned from epoch 1: the cut is inside a pruned epoch).
    FSDP2 (DTensor parameters, ELR's and PS-KD's hook on the sharded module): weights and tables
    equal one process's with the global batch."""
    ranks = run_distributed(resume_ddp_worker, "ddp", tmp_path)
    names = ("ELR", "PSKD", "DataPruning.kept", "DataPruning.scores")
    for r in ranks:
        (weights, tables), (weights_resumed, tables_resumed) = r["full"], r["resumed"]
        for key, value in weights.items():
            assert torch.equal(weights_resumed[key], value), key
        for name, table, resumed, rank0 in zip(names, tables, tables_resumed, ranks[0]["full"][1]):
            assert torch.equal(resumed, table), name
            assert torch.equal(table, rank0), f"{name}: ranks differ"
    assert len(tables[2]) == 647  # half of 1294
    weights, tables, _ = _sharded_fit(tmp_path / "single", 1)
    for r in ranks:
        assert r["fsdp2"][2], "FSDP2 shards the parameters"
        for key, value in weights.items():
            torch.testing.assert_close(r["fsdp2"][0][key], value, rtol=0, atol=1e-10)
        for name, table, sharded in zip(("ELR", "PSKD"), tables, r["fsdp2"][1]):
            assert sharded.dtype == torch.float64, name
            torch.testing.assert_close(sharded, table, rtol=0, atol=1e-10)
