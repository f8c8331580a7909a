"""Smoke tests of the multi-process harness: ddp and FSDP2 (ModelParallelStrategy) on 2 CPU ranks."""

import torch
from harness import fast_trainer, read_scalars, run_distributed, state_of
from lightning.pytorch import seed_everything
from lightning.pytorch.loggers import TensorBoardLogger

from litplug.datamodules import Digits
from litplug.modules import MLP, Classifier


def fit_worker(strategy, tmp_dir, max_steps):
    seed_everything(0)
    model = Classifier(MLP(input_shape=[1, 8, 8], num_outputs=10, hidden=[32]), num_classes=10)
    trainer = fast_trainer(tmp_dir, strategy=strategy, devices=2, max_steps=max_steps, limit_val_batches=2)
    trainer.fit(model, Digits(batch_size=32))
    params = list(model.backbone.parameters())
    return {
        "rank": trainer.global_rank,
        "is_dtensor": [type(p).__name__ == "DTensor" for p in params],
        "local_numel": sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in params),
        "state": state_of(model.backbone),
        "global_step": trainer.global_step,
    }


def test_ddp_ranks_agree(tmp_path):
    r0, r1 = run_distributed(fit_worker, "ddp", tmp_path, max_steps=4)
    assert (r0["rank"], r1["rank"]) == (0, 1)
    assert r0["global_step"] == r1["global_step"] == 4
    assert not any(r0["is_dtensor"])
    for name in r0["state"]:
        torch.testing.assert_close(r0["state"][name], r1["state"][name], rtol=0, atol=0)


def test_fsdp2_shards_parameters(tmp_path):
    r0, r1 = run_distributed(fit_worker, "fsdp2", tmp_path, max_steps=4)
    assert all(r0["is_dtensor"]) and all(r1["is_dtensor"])
    full = sum(v.numel() for k, v in r0["state"].items())
    assert r0["local_numel"] + r1["local_numel"] == full  # each rank holds only its shard
    for name in r0["state"]:
        torch.testing.assert_close(r0["state"][name], r1["state"][name], rtol=0, atol=0)


def test_read_scalars(tmp_path):
    model = Classifier(MLP(input_shape=[1, 8, 8], num_outputs=10, hidden=[16]), num_classes=10)
    trainer = fast_trainer(
        tmp_path,
        logger=TensorBoardLogger(tmp_path),
        max_steps=6,
        log_every_n_steps=1,
        limit_val_batches=1,
        val_check_interval=3,
    )
    trainer.fit(model, Digits(batch_size=32))
    scalars = read_scalars(tmp_path)
    assert [s for s, _ in scalars["train/loss"]] == list(range(6))
    assert "val/acc" in scalars
