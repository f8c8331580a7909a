"""`litplug fit` with the rank layout coming from outside, as clusters start it, and the faults
clusters bring: one job that torchrun (2 nodes x 1 process on this machine) starts, loses rank 1
in the middle of a step (torchrun's agent and rank 0 name it) and that is resumed from the last
step checkpoint by processes with SLURM's variables (Lightning's SLURMEnvironment); those get
SLURM's requeue signal (SIGUSR1: Lightning saves ``hpc_ckpt_1.ckpt`` and calls ``scontrol requeue
JOB_ID``, a fake ``scontrol`` here), lose rank 1 (rank 0 names it) and start again as a requeued
job, which resumes from the hpc checkpoint by itself. The job ends with the weights and EMA
average of the uninterrupted 2-rank DDP run Lightning launches, bit for bit, and of one process
on the global batch (float64), with SAM and EMA on."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from harness import assert_same

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent

# 2 epochs of 4 steps, batch 16 per rank; SAM perturbs every 3rd step from the global gradient; a
# checkpoint every 2 steps.
RUN = """
seed_everything: 0
trainer:
  max_epochs: 2
  limit_train_batches: 4
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
      init_args: {dirpath: ckpt, save_last: true, every_n_train_steps: 2}
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
# One process per node on 2 nodes, DDP's collectives (and the rendezvous) timing out after 2 minutes.
NODES = """
trainer:
  num_nodes: 2
  devices: 1
  strategy:
    class_path: lightning.pytorch.strategies.DDPStrategy
    init_args: {process_group_backend: gloo, timeout: "0:02:00"}
"""
# Records its arguments, as `scontrol requeue JOB_ID` would be called on a SLURM cluster.
SCONTROL = """#!/bin/sh
echo "$@" >> "$(dirname "$0")/scontrol.log"
"""
JOB_ID = "4242"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(run_dir: Path, *args: str, env: dict[str, str] | None = None, launcher: tuple[str, ...] = ()):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "run.yaml").write_text(RUN)
    (run_dir / "nodes.yaml").write_text(NODES)
    full_env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
        **(env or {}),
    }
    for key in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        if key not in (env or {}):
            full_env.pop(key, None)
    cmd = [sys.executable, *launcher, "-m", "litplug", "fit", "--config", "run.yaml", *args]
    return subprocess.Popen(cmd, cwd=run_dir, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _torchrun(run_dir: Path, node_rank: int, port: int, *args: str) -> subprocess.Popen:
    launcher = (
        "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(node_rank),
        "--master-addr", "127.0.0.1", "--master-port", str(port),
    )  # fmt: skip
    return _start(run_dir, "--config", "nodes.yaml", *args, launcher=launcher)


def _slurm(run_dir: Path, rank: int, port: int, *args: str) -> subprocess.Popen:
    """One task of ``srun --nodes 2 --ntasks-per-node 1``, as SLURM's variables describe it, with
    the fake ``scontrol`` first on the PATH."""
    env = {
        "SLURM_JOB_ID": JOB_ID, "SLURM_JOB_NAME": "litplug", "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_NNODES": "2", "SLURM_NODELIST": "127.0.0.1", "SLURM_PROCID": str(rank), "SLURM_LOCALID": "0",
        "SLURM_NODEID": str(rank), "MASTER_PORT": str(port),
        "PATH": os.pathsep.join([str(run_dir / "bin"), os.environ.get("PATH", "")]),
    }  # fmt: skip
    return _start(run_dir, "--config", "nodes.yaml", *args, env=env)


def _outputs(procs: list[subprocess.Popen]) -> list[tuple[int, str]]:
    outs = [p.communicate(timeout=600)[0] for p in procs]
    return [(p.returncode, out) for p, out in zip(procs, outs)]


def test_torchrun_job_loses_a_rank_is_requeued_under_slurm_and_ends_as_uninterrupted(tmp_path):
    references = {
        "one": _start(tmp_path / "one", "--data.init_args.batch_size=32"),
        "ddp": _start(tmp_path / "ddp", "--config", str(ROOT / "configs/trainer/ddp.yaml")),
    }
    job = tmp_path / "job"
    (job / "bin").mkdir(parents=True)
    (job / "bin/scontrol").write_text(SCONTROL)
    (job / "bin/scontrol").chmod(0o755)
    kill_rank_1 = ("--trainer.callbacks+=harness.KillAt", "--trainer.callbacks.rank=1")

    # torchrun: rank 1 killed during step 4 (after the step-2 checkpoint).
    port = _free_port()
    outs = _outputs([_torchrun(job, i, port, *kill_rank_1, "--trainer.callbacks.step=3") for i in (0, 1)])
    for rank, (rc, out) in enumerate(outs):
        assert rc != 0, out[-4000:]
        assert f"GLOBAL_RANK: {rank}, MEMBER: {rank + 1}/2" in out, out[-4000:]  # the layout came from torchrun
    assert "Signal 9 (SIGKILL) received by PID" in outs[1][1] and "rank      : 1" in outs[1][1], outs[1][1][-4000:]
    assert "litplug: rank 1 (pid " in outs[0][1], outs[0][1][-4000:]

    # SLURM resumes from step 2; SIGUSR1 at the end of step 5; rank 1 killed during step 8 (after the
    # step-6 checkpoint).
    port = _free_port()
    signal_and_kill = ("--trainer.callbacks+=harness.SignalAt", "--trainer.callbacks.step=5", *kill_rank_1)
    args = ("--ckpt_path", "ckpt/last.ckpt", *signal_and_kill, "--trainer.callbacks.step=7")
    (rc0, out0), (rc1, out1) = _outputs([_slurm(job, i, port, *args) for i in (0, 1)])
    assert rc1 == -9 and rc0 != 0, out0[-4000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in out1, out1[-4000:]  # the layout came from SLURM's variables
    assert "litplug: rank 1 (pid " in out0 and "ended by signal SIGKILL" in out0, out0[-4000:]
    assert (job / "bin/scontrol.log").read_text() == f"requeue {JOB_ID}\n"  # rank 0 only, once
    hpc = torch.load(job / "hpc_ckpt_1.ckpt", weights_only=False)
    assert (hpc["epoch"], hpc["global_step"]) == (1, 5)
    assert torch.load(job / "ckpt/last.ckpt", weights_only=False)["global_step"] == 6

    # The requeued job starts again as it was submitted and resumes from the hpc checkpoint.
    port = _free_port()
    outs = _outputs([_slurm(job, i, port) for i in (0, 1)])
    for rank, (rc, out) in enumerate(outs):
        assert rc == 0, f"rank {rank}:\n{out[-6000:]}"
        assert "terminate called" not in out, out[-6000:]
    assert f"Restoring states from the checkpoint path at {job / 'hpc_ckpt_1.ckpt'}" in outs[0][1], outs[0][1][-4000:]

    for name, (rc, out) in zip(references, _outputs(list(references.values()))):
        assert rc == 0, f"{name}:\n{out[-6000:]}"
    last = {name: torch.load(tmp_path / name / "ckpt/last.ckpt", weights_only=False) for name in ("one", "ddp", "job")}
    assert {c["global_step"] for c in last.values()} == {8}
    ema = {name: next(v for k, v in c["callbacks"].items() if k.startswith("EMA")) for name, c in last.items()}
    for key in ("state_dict", "optimizer_states", "loops"):  # the same two-rank reduction: bit-identical
        assert_same(last["job"][key], last["ddp"][key], key)
    assert_same(ema["job"], ema["ddp"], "EMA")
    for key, value in last["one"]["state_dict"].items():  # one process: another summation order
        assert value.dtype == torch.float64
        torch.testing.assert_close(last["ddp"]["state_dict"][key], value, rtol=1e-10, atol=1e-12, msg=key)
    for key, value in ema["one"]["average"].items():
        torch.testing.assert_close(ema["ddp"]["average"][key], value, rtol=1e-10, atol=1e-12, msg=key)
