"""A `litplug fit` killed with SIGKILL in the middle of an epoch and resumed with `--ckpt_path` from
its last checkpoint ends exactly like an uninterrupted run: weights, optimizer, EMA average, SAM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import torch
from lightning.pytorch import Callback

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
TESTS = Path(__file__).resolve().parent

RUN = [
    "--config", str(CONFIGS / "digits/classifier.yaml"),
    "--config", str(CONFIGS / "callbacks/ema.yaml"),
    "--config", str(CONFIGS / "callbacks/sam.yaml"),
    "--trainer.max_epochs=3", "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=1",
    "--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
    "--test_after_fit=false", "--model.init_args.backbone.init_args.hidden=[16]",
]  # fmt: skip

CHECKPOINT = """
trainer:
  callbacks+:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {dirpath: ckpt, save_last: true, every_n_epochs: 1}
"""
KILLER = """
trainer:
  callbacks+:
    - class_path: test_faults.KillDuringEpoch
      init_args: {epoch: 1, batch: 1}
"""


class KillDuringEpoch(Callback):
    """Test-only: the process SIGKILLs itself at the start of batch ``batch`` of epoch ``epoch``
    (after that epoch's first optimizer steps, before its checkpoint)."""

    def __init__(self, epoch: int, batch: int) -> None:
        self.epoch, self.batch = epoch, batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            os.kill(os.getpid(), signal.SIGKILL)


def _start(run_dir: Path, *fragments: str, extra: tuple[str, ...] = ()) -> subprocess.Popen:
    run_dir.mkdir(parents=True, exist_ok=True)
    args = list(RUN)
    for i, text in enumerate(fragments):
        (run_dir / f"fragment{i}.yaml").write_text(text)
        args += ["--config", str(run_dir / f"fragment{i}.yaml")]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    env.pop("LOCAL_RANK", None)
    cmd = [sys.executable, "-m", "litplug", "fit", *args, *extra]
    return subprocess.Popen(cmd, cwd=run_dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=300)
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


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(tmp_path):
    full = _start(tmp_path / "full", CHECKPOINT)
    killed = _start(tmp_path / "killed", CHECKPOINT, KILLER)
    (rc_full, out_full), (rc_killed, out_killed) = _finish(full), _finish(killed)
    assert rc_full == 0, out_full[-4000:]
    assert rc_killed == -signal.SIGKILL, out_killed[-4000:]
    last = tmp_path / "killed/ckpt/last.ckpt"
    assert torch.load(last, weights_only=False)["epoch"] == 0  # epoch 1 was cut short
    rc, out = _finish(_start(tmp_path / "killed", CHECKPOINT, extra=("--ckpt_path", str(last))))
    assert rc == 0, out[-4000:]

    a = torch.load(tmp_path / "full/ckpt/last.ckpt", weights_only=False)
    b = torch.load(last, weights_only=False)
    assert a["epoch"] == b["epoch"] == 2 and a["global_step"] == b["global_step"] == 9
    _assert_equal(b["state_dict"], a["state_dict"], "state_dict")
    _assert_equal(b["optimizer_states"], a["optimizer_states"], "optimizer_states")
    # Every callback state (EMA's average and counters; SAM keeps none between steps), but the
    # checkpoint callback's own (paths of its run folder).
    states = sorted(k for k in a["callbacks"] if not k.startswith("ModelCheckpoint"))
    assert states == sorted(k for k in b["callbacks"] if not k.startswith("ModelCheckpoint"))
    for key in states:
        _assert_equal(b["callbacks"][key], a["callbacks"][key], key)
    (ema,) = [a["callbacks"][k] for k in states if k.startswith("EMA")]
    assert ema["updates"] == 9 and ema["average"]
    # fit ended on the EMA average, exported as a plain state dict: the same in both runs
    _assert_equal(
        torch.load(tmp_path / "killed/runs/ema_backbone.pt"),
        torch.load(tmp_path / "full/runs/ema_backbone.pt"),
        "export",
    )
