"""`litplug fit` with the rank layout coming from outside, as clusters start it: torchrun with
2 nodes x 1 process on this machine, and SLURM's variables (read by Lightning's SLURMEnvironment).
Both end with the same weights and EMA average as the 2-rank single-node DDP run Lightning
launches, and as one process on the global batch (float64), every process exiting with status 0."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

# 2 epochs of 3 steps, batch 16 per rank; SAM perturbs every 3rd step from the global gradient.
RUN = """
seed_everything: 0
trainer:
  max_epochs: 2
  limit_train_batches: 3
  limit_val_batches: 1
  precision: 64-true
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:
    - class_path: SAM
      init_args: {rho: 0.05, every_n_steps: 3, sync_first_pass: true}
    - class_path: EMA
      init_args: {decay: 0.9}
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {dirpath: ckpt, save_last: true}
model:
  class_path: Classifier
  init_args:
    num_classes: 10
    backbone:
      class_path: litplug.modules.MLP
      init_args: {input_shape: [1, 8, 8], num_outputs: 10, hidden: [16]}
data: {class_path: Digits, init_args: {batch_size: 16}}
test_after_fit: false
"""
TWO_NODES = ("--trainer.strategy=ddp", "--trainer.num_nodes=2", "--trainer.devices=1")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(run_dir: Path, *args: str, env: dict[str, str] | None = None, launcher: tuple[str, ...] = ()):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "run.yaml").write_text(RUN)
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    for key in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        if key not in (env or {}):
            full_env.pop(key, None)
    cmd = [sys.executable, *launcher, "-m", "litplug", "fit", "--config", "run.yaml", *args]
    return subprocess.Popen(cmd, cwd=run_dir, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _torchrun(run_dir: Path, node_rank: int, port: int) -> subprocess.Popen:
    launcher = (
        "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(node_rank),
        "--master-addr", "127.0.0.1", "--master-port", str(port),
    )  # fmt: skip
    return _start(run_dir, *TWO_NODES, launcher=launcher)


def _slurm(run_dir: Path, rank: int, port: int) -> subprocess.Popen:
    """One task of ``srun --nodes 2 --ntasks-per-node 1``, as SLURM's variables describe it."""
    env = {
        "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "litplug", "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_NNODES": "2", "SLURM_NODELIST": "127.0.0.1", "SLURM_PROCID": str(rank), "SLURM_LOCALID": "0",
        "SLURM_NODEID": str(rank), "MASTER_PORT": str(port),
    }  # fmt: skip
    return _start(run_dir, *TWO_NODES, env=env)


def test_torchrun_and_slurm_equal_single_node_ddp_and_one_process(tmp_path):
    runs = {
        "one process, global batch": [_start(tmp_path / "one", "--data.init_args.batch_size=32")],
        "ddp": [_start(tmp_path / "ddp", "--config", str(ROOT / "configs/trainer/ddp.yaml"))],
    }
    port = _free_port()
    runs["torchrun"] = [_torchrun(tmp_path / "torchrun", i, port) for i in (0, 1)]
    port = _free_port()
    runs["slurm"] = [_slurm(tmp_path / "slurm", i, port) for i in (0, 1)]
    outputs = {}
    for name, procs in runs.items():
        for i, proc in enumerate(procs):
            out, _ = proc.communicate(timeout=900)
            assert proc.returncode == 0, f"{name} process {i} (rc={proc.returncode}):\n{out[-6000:]}"
            assert "terminate called" not in out, out[-6000:]
            outputs[name, i] = out
    for name in ("torchrun", "slurm"):  # the ranks came from the launcher's variables
        for rank in (0, 1):
            assert f"GLOBAL_RANK: {rank}, MEMBER: {rank + 1}/2" in outputs[name, rank], outputs[name, rank][-3000:]

    last = {name: torch.load(tmp_path / folder / "ckpt/last.ckpt", weights_only=False) for name, folder in (
        ("one", "one"), ("ddp", "ddp"), ("torchrun", "torchrun"), ("slurm", "slurm"),
    )}  # fmt: skip
    assert {c["global_step"] for c in last.values()} == {6}
    ema = {name: next(v for k, v in c["callbacks"].items() if k.startswith("EMA")) for name, c in last.items()}
    for name in ("torchrun", "slurm"):  # the same two-rank reduction: bit-identical
        for key, value in last["ddp"]["state_dict"].items():
            assert torch.equal(last[name]["state_dict"][key], value), f"{name}: {key}"
        assert ema[name]["average"].keys() == ema["ddp"]["average"].keys()
        for key, value in ema["ddp"]["average"].items():
            assert torch.equal(ema[name]["average"][key], value), f"{name}: EMA average {key}"
    for key, value in last["one"]["state_dict"].items():  # one process: another summation order
        assert value.dtype == torch.float64
        torch.testing.assert_close(last["ddp"]["state_dict"][key], value, rtol=1e-10, atol=1e-12, msg=key)
    for key, value in ema["one"]["average"].items():
        torch.testing.assert_close(ema["ddp"]["average"][key], value, rtol=1e-10, atol=1e-12, msg=key)
