"""A `litplug fit` killed with SIGKILL between two step checkpoints (``every_n_train_steps``) and
resumed with ``--ckpt_path`` from the last one ends exactly like an uninterrupted run: weights,
optimizer, every callback's state and the logged metrics, with UnlearningMask + SAM(every_n_steps=3)
+ EMA on, on one process and under DDP on 2 ranks (one rank killed: the job stops, saying which)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import torch
from harness import read_scalars
from lightning.pytorch import Callback

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
TESTS = Path(__file__).resolve().parent

# 2 epochs of 5 steps; a checkpoint every 2 steps (step 6 is the second step of epoch 1).
RUN = """
seed_everything: 0
trainer:
  max_epochs: 2
  limit_train_batches: 5
  limit_val_batches: 1
  log_every_n_steps: 1
  enable_progress_bar: false
  enable_model_summary: false
  logger:
    class_path: lightning.pytorch.loggers.TensorBoardLogger
    init_args: {save_dir: runs, name: litplug}
  callbacks:
    - class_path: UnlearningMask
      init_args: {criterion: saliency, ratio: 0.5, num_batches: 2}
    - class_path: SAM
      init_args: {rho: 0.05, every_n_steps: 3}
    - class_path: EMA
      init_args: {decay: 0.9}
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {dirpath: ckpt, save_last: true, every_n_train_steps: 2}
model:
  class_path: Unlearner
  init_args:
    checkpoint: null
    method: gradient_difference
    num_classes: 10
    backbone:
      class_path: litplug.modules.MLP
      init_args: {input_shape: [1, 8, 8], num_outputs: 10, hidden: [16]}
data:
  class_path: ForgetRetain
  init_args:
    scenario: class
    forget_classes: [0]
    datamodule: {class_path: Digits, init_args: {batch_size: 32}}
test_after_fit: false
"""
KILL_STEP = 7  # after the step-6 checkpoint, before the step-8 one; step 7 is not a SAM step, 9 is


class KillAt(Callback):
    """Test-only: SIGKILL this process at the start of the batch of training step ``step`` on
    global rank ``rank`` (-1: every rank)."""

    def __init__(self, step: int, rank: int = -1) -> None:
        self.step, self.rank = step, rank

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step and self.rank in (-1, trainer.global_rank):
            os.kill(os.getpid(), signal.SIGKILL)


def _start(run_dir: Path, *extra: str) -> subprocess.Popen:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "run.yaml").write_text(RUN)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    env.pop("LOCAL_RANK", None)
    cmd = [sys.executable, "-m", "litplug", "fit", "--config", "run.yaml", *extra]
    return subprocess.Popen(cmd, cwd=run_dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=900)
    return proc.returncode, out


def _assert_equal(a, b, where):
    if torch.is_tensor(a):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def _kill_and_resume(tmp_path: Path, kill: tuple[str, ...], extra: tuple[str, ...] = ()) -> str:
    """Run uninterrupted and killed side by side, resume the killed one, compare; return the killed
    run's output."""
    kill_args = ("--trainer.callbacks+=test_faults.KillAt", f"--trainer.callbacks.step={KILL_STEP}", *kill)
    full = _start(tmp_path / "full", *extra)
    killed = _start(tmp_path / "killed", *extra, *kill_args)
    (rc_full, out_full), (rc_killed, out_killed) = _finish(full), _finish(killed)
    assert rc_full == 0, out_full[-4000:]
    assert rc_killed != 0, out_killed[-4000:]
    last = tmp_path / "killed/ckpt/last.ckpt"
    state = torch.load(last, weights_only=False)
    assert (state["epoch"], state["global_step"]) == (1, 6)  # saved in the middle of epoch 1
    assert state["loops"]["fit_loop"]["state_dict"]["combined_loader"]  # the loaders' positions
    rc, out = _finish(_start(tmp_path / "killed", *extra, "--ckpt_path", str(last)))
    assert rc == 0, out[-4000:]
    assert "not resumable" not in out  # Lightning's warning for a loader that cannot resume mid-epoch

    a = torch.load(tmp_path / "full/ckpt/last.ckpt", weights_only=False)
    b = torch.load(last, weights_only=False)
    assert a["epoch"] == b["epoch"] == 1 and a["global_step"] == b["global_step"] == 10
    _assert_equal(b["state_dict"], a["state_dict"], "state_dict")
    _assert_equal(b["optimizer_states"], a["optimizer_states"], "optimizer_states")
    _assert_equal(b["loops"], a["loops"], "loops")
    # Every callback's state (the mask, EMA's average and counters, SAM's step phase) but the
    # checkpoint callback's own (paths of its run folder).
    states = sorted(k for k in a["callbacks"] if not k.startswith("ModelCheckpoint"))
    assert states == sorted(k for k in b["callbacks"] if not k.startswith("ModelCheckpoint"))
    assert any(k.startswith("EMA") for k in states) and any(k.startswith("UnlearningMask") for k in states)
    for key in states:
        _assert_equal(b["callbacks"][key], a["callbacks"][key], key)
    # The resumed run logs what the uninterrupted run logged at the same steps, value for value
    # (wall-clock times aside).
    full_log = read_scalars(tmp_path / "full/runs/litplug/version_0")
    resumed_log = read_scalars(tmp_path / "killed/runs/litplug/version_1")
    assert "unlearn/train_loss" in resumed_log
    for tag, points in resumed_log.items():
        if tag != "unlearn/run_time":
            assert points and set(points) <= set(full_log[tag]), tag
    return out_killed


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(tmp_path):
    _kill_and_resume(tmp_path, kill=())


def test_ddp_rank_killed_mid_epoch_stops_the_job_then_resumes_exactly(tmp_path):
    out = _kill_and_resume(
        tmp_path, kill=("--trainer.callbacks.rank=1",), extra=("--config", str(CONFIGS / "trainer/ddp.yaml"))
    )
    assert "rank 1" in out and "SIGKILL" in out, out[-4000:]
