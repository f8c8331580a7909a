"""Test helpers shared by every test file (importable as ``harness``; pytest puts tests/ on the
path).

Multi-process runs: Lightning's ``ddp`` and ``ModelParallelStrategy`` launchers re-run
``sys.argv`` for every rank, which cannot work from inside pytest. ``run_distributed`` therefore
starts ``tests/launch.py`` as a child of ``forkserver`` (rank 0 with the imports done; Lightning
starts rank 1 as a new process); that script imports a *worker function* from a test file and
calls it on every rank. The worker builds its Trainer with ``make_strategy(name)``, runs,
and returns anything picklable; ``run_distributed`` returns the list of results ordered by rank.

    def ddp_worker(strategy, tmp_dir, lr):          # in tests/callbacks/test_x.py
        trainer = Trainer(strategy=strategy, accelerator="cpu", devices=2, ...)
        trainer.fit(model, dm)
        return {"weights": ...}

    def test_x_ddp(tmp_path):
        r0, r1 = run_distributed(ddp_worker, "ddp", tmp_path, lr=0.1)
"""

from __future__ import annotations

import inspect
import json
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from forkserver import run_command
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy, Strategy

TESTS_DIR = Path(__file__).resolve().parent
StrategyName = Literal["ddp", "fsdp2"]


def make_strategy(name: StrategyName) -> Strategy:
    """``ddp`` (gloo) or ``fsdp2`` (ModelParallelStrategy, data parallel over 2 ranks)."""
    if name == "ddp":
        return DDPStrategy(process_group_backend="gloo")
    if name == "fsdp2":
        return ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    raise ValueError(f"unknown strategy {name!r}")


def run_distributed(
    worker: Callable[..., Any], strategy: StrategyName, tmp_path: Path, timeout: float = 600, **kwargs: Any
) -> list[Any]:
    """Run ``worker(strategy=<Strategy>, tmp_dir=<Path>, **kwargs)`` on 2 CPU ranks; return the
    per-rank results. ``kwargs`` must be JSON-serialisable. Raises with the workers' output on
    failure."""
    file = Path(inspect.getsourcefile(worker)).resolve()
    out = Path(tmp_path) / f"dist_{worker.__name__}_{strategy}"
    out.mkdir(parents=True, exist_ok=True)
    cmd = [
        "python",
        str(TESTS_DIR / "launch.py"),
        str(file),
        worker.__name__,
        strategy,
        str(out),
        json.dumps(kwargs),
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("LOCAL_RANK", None)
    proc = run_command(cmd, cwd=out, env=env, timeout=timeout)  # rank 0 with the imports done
    if proc.returncode != 0:
        raise RuntimeError(f"distributed worker failed (rc={proc.returncode}):\n{proc.output[-16000:]}")
    results = []
    for rank in range(2):
        path = out / f"rank{rank}.pt"
        if not path.exists():
            raise RuntimeError(f"rank {rank} wrote no result:\n{proc.output[-9000:]}")
        results.append(torch.load(path, weights_only=False))
    return results


def read_scalars(log_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """All scalars of all TensorBoard event files under ``log_dir``: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, list[tuple[int, float]]] = {}
    for event_file in sorted(Path(log_dir).rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(event_file), size_guidance={"scalars": 0, "histograms": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return scalars


def read_histograms(log_dir: str | Path) -> dict[str, list[Any]]:
    """All histogram events under ``log_dir``: tag -> [HistogramEvent]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    hists: dict[str, list[Any]] = {}
    for event_file in sorted(Path(log_dir).rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(event_file), size_guidance={"histograms": 0})
        acc.Reload()
        for tag in acc.Tags()["histograms"]:
            hists.setdefault(tag, []).extend(acc.Histograms(tag))
    return hists


def fast_trainer(tmp_path: Path, **kwargs: Any) -> Trainer:
    """A quiet CPU Trainer for tests: no progress bar, no model summary, no checkpoints unless
    asked for, logs (TensorBoard) under ``tmp_path``."""
    defaults: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        default_root_dir=str(tmp_path),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=False,
        num_sanity_val_steps=0,
    )
    defaults.update(kwargs)
    return Trainer(**defaults)


def state_of(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached full copy of a module's state dict (gathers DTensors to full tensors)."""
    out = {}
    for name, value in module.state_dict().items():
        if hasattr(value, "full_tensor"):
            value = value.full_tensor()
        out[name] = value.detach().clone()
    return out


def write_idx(path: Path, array: Any, compress: bool = False) -> None:
    """Write ``array`` (uint8 values) as an IDX file, MNIST's on-disk format (``.gz`` if ``compress``)."""
    import gzip

    import numpy as np

    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + np.asarray(array).astype(np.uint8).tobytes()
    if compress:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


class _Cut(Exception):
    pass


class _CutAt(Callback):
    """Raise at the start of the batch of training step ``step`` (a run that dies there)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step - 1:
            raise _Cut


def cut_and_resume(build: Any, tmp_path: Path, step: int) -> tuple[Any, Any]:
    """``build(tmp_dir, **trainer_kwargs)`` returns ``(trainer, model, data, probe)``; runs it
    uninterrupted, then checkpointed every ``step`` training steps and cut at the batch after the
    first checkpoint, then resumed from that checkpoint. Returns the ``(model, probe)`` pairs of
    the uninterrupted and the resumed run."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    trainer, model, data, probe = build(tmp_path / "full")
    trainer.fit(model, data)
    full = (model, probe)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=step, save_top_k=0)
    trainer, model, data, _ = build(tmp_path / "part", enable_checkpointing=True)
    trainer.callbacks.extend([_CutAt(step + 1), ckpt])
    try:
        trainer.fit(model, data)
    except _Cut:
        pass
    else:
        raise AssertionError(f"the run ended before training step {step + 1}")
    trainer, model, data, probe = build(tmp_path / "resumed")
    trainer.fit(model, data, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    return full, (model, probe)


def concatenated(loader: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """All inputs and all targets of a loader of ``(x, y)`` batches, concatenated."""
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


def assert_same(a: Any, b: Any, where: str) -> None:
    """``a`` and ``b`` hold the same structure of bit-identical tensors and equal values."""
    if torch.is_tensor(a):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


class KillAt(Callback):
    """SIGKILL this process in the middle of training step ``step`` (0-based: ``step`` steps
    done), after its forward pass and before its backward, on global rank ``rank`` (-1: every
    rank). For ``litplug fit`` subprocesses: ``--trainer.callbacks+=harness.KillAt``."""

    def __init__(self, step: int, rank: int = -1) -> None:
        self.step, self.rank = step, rank

    def on_before_backward(self, trainer: Trainer, pl_module: Any, loss: torch.Tensor) -> None:
        if trainer.global_step == self.step and self.rank in (-1, trainer.global_rank):
            os.kill(os.getpid(), signal.SIGKILL)


class SignalAt(Callback):
    """Send ``signum`` to this process on every rank at the end of the training batch that
    completes step ``step`` (where a step checkpoint would be written), e.g. SLURM's requeue
    signal: ``--trainer.callbacks+=harness.SignalAt``."""

    def __init__(self, step: int, signum: str = "SIGUSR1") -> None:
        self.step, self.signum = step, signal.Signals[signum]

    def on_train_batch_end(self, trainer: Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)
