"""A `litplug fit` killed with SIGKILL in the middle of a step between two step checkpoints
(``every_n_train_steps``) and resumed with ``--ckpt_path`` from the last one ends exactly like an
uninterrupted run: weights, optimizer, every callback's state and the logged metrics, with
UnlearningMask + SAM(every_n_steps=3) + EMA on, on one process and under DDP on 2 ranks (rank 0
killed: rank 1 stops at its next collective, naming rank 0). Lost ranks under torchrun and SLURM:
tests/test_launchers.py. Also: how lost ranks are found, and the shutdown abort that
``end_distributed_run`` avoids."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from forkserver import run_command
from harness import assert_same, read_scalars

from litplug.plumbing import ended_ranks, rank_processes

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
KILL_STEP = 7  # killed during step 8: after the step-6 checkpoint, before the step-8 one
# Lightning's DDP on 2 CPU ranks, collectives (and the rendezvous) timing out after 2 minutes instead of 30.
DDP = """
trainer:
  accelerator: cpu
  devices: 2
  strategy:
    class_path: lightning.pytorch.strategies.DDPStrategy
    init_args: {process_group_backend: gloo, timeout: "0:02:00"}
"""


def _start(run_dir: Path, *extra: str, fork: bool = False) -> Callable[[], tuple[int, str]]:
    """Start ``litplug fit`` in ``run_dir``; the returned function waits for it: ``(status,
    output)``. ``fork``: one process, run to its end at once as a child of the session's fork
    server (torch, Lightning and litplug imported once)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "run.yaml").write_text(RUN)
    (run_dir / "ddp.yaml").write_text(DDP)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    env.pop("LOCAL_RANK", None)
    if fork:
        result = run_command(["litplug", "fit", "--config", "run.yaml", *extra], cwd=run_dir, env=env, timeout=600)
        return lambda: (result.returncode, result.output)
    cmd = [sys.executable, "-m", "litplug", "fit", "--config", "run.yaml", *extra]
    proc = subprocess.Popen(cmd, cwd=run_dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def finish() -> tuple[int, str]:
        out, _ = proc.communicate(timeout=600)
        return proc.returncode, out

    return finish


def _kill_and_resume(tmp_path: Path, kill: tuple[str, ...], extra: tuple[str, ...] = (), fork: bool = False) -> str:
    """Run uninterrupted and killed (side by side unless ``fork``), resume the killed one, compare;
    return the killed run's output."""
    kill_args = ("--trainer.callbacks+=harness.KillAt", f"--trainer.callbacks.step={KILL_STEP}", *kill)
    full = _start(tmp_path / "full", *extra, fork=fork)
    killed = _start(tmp_path / "killed", *extra, *kill_args, fork=fork)
    (rc_full, out_full), (rc_killed, out_killed) = full(), killed()
    assert rc_full == 0, out_full[-4000:]
    assert rc_killed != 0, out_killed[-4000:]
    last = tmp_path / "killed/ckpt/last.ckpt"
    state = torch.load(last, weights_only=False)
    assert (state["epoch"], state["global_step"]) == (1, 6)  # saved in the middle of epoch 1
    assert state["loops"]["fit_loop"]["state_dict"]["combined_loader"]  # the loaders' positions
    rc, out = _start(tmp_path / "killed", *extra, "--ckpt_path", str(last), fork=fork)()
    assert rc == 0, out[-4000:]
    assert "not resumable" not in out  # Lightning's warning for a loader that cannot resume mid-epoch

    a = torch.load(tmp_path / "full/ckpt/last.ckpt", weights_only=False)
    b = torch.load(last, weights_only=False)
    assert a["epoch"] == b["epoch"] == 1 and a["global_step"] == b["global_step"] == 10
    assert_same(b["state_dict"], a["state_dict"], "state_dict")
    assert_same(b["optimizer_states"], a["optimizer_states"], "optimizer_states")
    assert_same(b["loops"], a["loops"], "loops")
    # Every callback's state (the mask, EMA's average and counters, SAM's step phase) but the
    # checkpoint callback's own (paths of its run folder).
    states = sorted(k for k in a["callbacks"] if not k.startswith("ModelCheckpoint"))
    assert states == sorted(k for k in b["callbacks"] if not k.startswith("ModelCheckpoint"))
    assert any(k.startswith("EMA") for k in states) and any(k.startswith("UnlearningMask") for k in states)
    for key in states:
        assert_same(b["callbacks"][key], a["callbacks"][key], key)
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
    _kill_and_resume(tmp_path, kill=(), fork=True)


def test_ddp_rank_zero_killed_mid_step_stops_the_job_naming_it_then_resumes_exactly(tmp_path):
    # Rank 0 (Lightning's launcher, rank 1's parent) dies: rank 1's next collective fails and it
    # names rank 0 before leaving; the job's output ends when rank 1 has exited.
    out = _kill_and_resume(tmp_path, kill=("--trainer.callbacks.rank=0",), extra=("--config", "ddp.yaml"))
    assert "litplug: rank 0 (pid " in out and "the run stopped" in out, out[-4000:]


def test_ended_ranks_names_the_ranks_whose_process_ended_on_this_machine():
    host = socket.gethostname()
    procs = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) for _ in range(2)]
    roster = [rank_processes()[0], (host, procs[0].pid), (host, procs[1].pid), ("elsewhere", procs[0].pid)]
    try:
        assert ended_ranks(roster, wait=0) == []  # all running
        os.kill(procs[0].pid, signal.SIGKILL)
        # Not waited for yet (what a launcher's parent sees): the signal is named.
        assert ended_ranks(roster, wait=5) == [f"rank 1 (pid {procs[0].pid}) ended by signal SIGKILL"]
        procs[0].wait()
        assert ended_ranks(roster, wait=0) == [f"rank 1 (pid {procs[0].pid}) has ended"]  # gone
    finally:
        for p in procs:
            p.kill()
            p.wait()


EXIT_RANK = """
import sys, threading, time
import torch
import torch.distributed as dist

dist.init_process_group("gloo")
group = dist.new_group([0, 1])
x = torch.ones(8)


def collectives():
    while True:
        dist.all_reduce(x, group=group)


threading.Thread(target=collectives, daemon=True).start()
time.sleep(0.5)  # the thread is in its collectives
if sys.argv[1] == "end":
    from litplug.plumbing import end_distributed_run

    end_distributed_run()
"""


def _exit_job(script, how: str) -> list[subprocess.Popen]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "OMP_NUM_THREADS": "1",
    }
    return [
        subprocess.Popen(
            [sys.executable, str(script), how],
            env={**env, "RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]


def test_a_thread_in_a_collective_aborts_the_interpreter_shutdown_and_end_distributed_run_exits_cleanly(tmp_path):
    """The abort ``end_distributed_run`` avoids, on demand: a rank whose interpreter finalises while
    a thread of it is inside a gloo collective aborts after its work is done ("terminate called
    without an active exception", SIGABRT); ending it with ``end_distributed_run`` (no
    finalisation) exits with status 0."""
    script = tmp_path / "rank.py"
    script.write_text(EXIT_RANK)
    jobs = {how: _exit_job(script, how) for how in ("finalise", "end")}
    results = {how: [(p.communicate(timeout=300)[0], p.returncode) for p in procs] for how, procs in jobs.items()}
    for out, rc in results["end"]:
        assert rc == 0, out[-3000:]
    aborted = [(out, rc) for out, rc in results["finalise"] if rc == -signal.SIGABRT]
    assert aborted, results["finalise"]
    assert "terminate called without an active exception" in aborted[0][0]
