"""Distributed and precision plumbing shared by litplug's callbacks, modules and datamodules.

* :func:`local` / :func:`is_sharded` / :func:`local_rows`: FSDP2 (``ModelParallelStrategy``)
  parameters and gradients are DTensors; litplug computes on their local shards.
* :func:`refuse_flat_strategies`: FSDP1 (``FSDPStrategy``) and DeepSpeed flatten or partition the
  parameters behind the module's back, which the callbacks cannot see through.
* :func:`grad_scaler` / :func:`loss_scale`: the ``torch.amp.GradScaler`` of ``16-mixed``.
* :func:`save_rank_zero`: write a file once (rank 0) under DDP/FSDP2.
* :func:`training_mode`: put a module in train or eval mode and restore every submodule's mode.
* :func:`mix_seed`: one integer seed from a base seed and counters (step, rank, index).
* :func:`end_distributed_run`: end the process of a finished multi-process run cleanly.
* :func:`rank_processes` / :func:`ended_ranks`: name the ranks whose process ended when a
  multi-process run fails.
* :func:`warn`: the one way litplug warns, once per run (global rank zero).

Pure torch: importing it imports no Lightning. Submodules: :mod:`litplug.plumbing.loss` (the
loss of a module's own objective on a batch, for callbacks) and
:mod:`litplug.plumbing.third_party_private` (every private attribute of another library litplug
uses, each with the public hook whose arrival upstream would remove it).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "end_distributed_run",
    "ended_ranks",
    "grad_scaler",
    "is_sharded",
    "local",
    "local_rows",
    "loss_scale",
    "mix_seed",
    "rank_processes",
    "refuse_flat_strategies",
    "save_rank_zero",
    "training_mode",
    "warn",
]


def is_sharded(t: Any) -> bool:
    """Whether ``t`` is a DTensor (an FSDP2 parameter, gradient or optimizer state)."""
    return hasattr(t, "to_local") and hasattr(t, "device_mesh")


def local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (FSDP2 parameters and gradients), the tensor itself otherwise."""
    return t.to_local() if is_sharded(t) else t


def local_rows(full: Tensor, param: Tensor) -> Tensor:
    """The rows of ``full`` that ``param``'s local ``Shard(0)`` block holds (``full`` if plain)."""
    if not is_sharded(param):
        return full
    mesh = param.device_mesh
    chunks = torch.chunk(full, mesh.size(), dim=0)
    r = mesh.get_local_rank()
    return chunks[r] if r < len(chunks) else full[:0]


def refuse_flat_strategies(trainer: Any, who: str) -> None:
    """Raise at setup under FSDP1 (``FSDPStrategy``) or DeepSpeed: both flatten or partition the
    parameters, which litplug's callbacks do not support (FSDP2 and DDP are supported)."""
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

    if isinstance(trainer.strategy, (FSDPStrategy, DeepSpeedStrategy)):
        raise ValueError(
            f"{who} does not support {type(trainer.strategy).__name__} (flattened or partitioned parameters); "
            "use single-device, DDP or ModelParallelStrategy (FSDP2)"
        )


def grad_scaler(trainer: Any) -> Any:
    """The precision plugin's GradScaler (``16-mixed``), None without one."""
    return getattr(trainer.precision_plugin, "scaler", None)


def loss_scale(trainer: Any, like: Tensor) -> Tensor:
    """The GradScaler's current scale as a float32 scalar on ``like``'s device (no host sync); 1
    without a scaler."""
    scaler = grad_scaler(trainer)
    one = torch.ones((), device=like.device, dtype=torch.float32)
    return scaler.scale(one) if scaler is not None else one


def save_rank_zero(obj: Any, path: str | Path) -> None:
    """``torch.save(obj, path)`` on global rank 0 only, creating the parent folders."""
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    rank_zero_only(_save)(obj, path)


def _save(obj: Any, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)


@contextmanager
def training_mode(module: nn.Module, mode: bool) -> Iterator[nn.Module]:
    """Run the block with ``module.train(mode)``; afterwards every submodule gets its own previous
    mode back (a submodule its owner keeps in eval mode stays in eval mode)."""
    modes = {m: m.training for m in module.modules()}
    module.train(mode)
    try:
        yield module
    finally:
        for m, was in modes.items():
            m.training = was


def mix_seed(seed: int, *counters: int, prime: int = 1_000_003) -> int:
    """One integer seed from ``seed`` and ``counters`` (Horner's rule in base ``prime``):
    ``mix_seed(s, i) = s * prime + i``, ``mix_seed(s, i, j) = (s * prime + i) * prime + j``.

    Example:
        >>> mix_seed(3, 7), mix_seed(3, 7, prime=100_003)
        (3000016, 300016)
    """
    out = seed
    for c in counters:
        out = out * prime + c
    return out


def end_distributed_run() -> None:
    """End this rank's process once a multi-process run has finished on every rank: wait for every
    rank, destroy the process groups, flush stdout/stderr and leave with status 0 at once,
    without finalising the interpreter. Does nothing without an initialised process group (one
    process: the caller goes on).

    Call it as the last statement of each rank (the ``litplug`` command and the tests' launcher
    do), not after an error: a rank that failed never reaches the barrier. Why the process leaves
    at once: a rank whose interpreter finalises while a thread of it is inside a gloo collective
    aborts (SIGABRT, "terminate called without an active exception": the interpreter ends the
    thread with ``pthread_exit`` inside a C++ destructor of torch's bindings), after all its work
    is done. ``os._exit`` skips ``atexit`` handlers; Lightning's loggers have flushed and closed
    their files when ``fit``/``test`` return.
    """
    import sys

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def rank_processes() -> list[tuple[str, int]]:
    """``(host name, process id)`` of every rank of the default process group, in rank order.

    A collective (``all_gather_object``): call it on every rank, once the group is initialised;
    one process gets its own entry only."""
    import socket

    import torch.distributed as dist

    mine = (socket.gethostname(), os.getpid())
    if not (dist.is_available() and dist.is_initialized()):
        return [mine]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, mine)
    return [(str(host), int(pid)) for host, pid in out]


def ended_ranks(processes: list[tuple[str, int]], wait: float = 10.0) -> list[str]:
    """One line per rank in ``processes`` (from :func:`rank_processes`) that runs on this machine
    and whose process has ended, e.g. ``rank 1 (pid 4242) ended by signal SIGKILL`` (the status
    is read while the process waits for its parent, ``has ended`` once it is gone). Waits up to
    ``wait`` seconds for one to end: a dying process resets its sockets (the error the caller
    sees) a moment before it ends. Ranks on other machines are not checked (torchrun's agent and
    srun report those).

    Why: a rank killed in the middle of a step leaves the others with gloo's "Connection reset by
    peer", which names an address, not a rank, whichever launcher started the processes.

    Example:
        >>> ended_ranks(rank_processes(), wait=0)  # one process, still running
        []
    """
    import socket
    import time

    host, me = socket.gethostname(), os.getpid()
    local = [(rank, pid) for rank, (h, pid) in enumerate(processes) if h == host and pid != me]
    deadline = time.monotonic() + wait
    while True:
        ended = [(rank, pid, how) for rank, pid in local if (how := _process_end(pid)) is not None]
        if ended or time.monotonic() >= deadline:
            return [f"rank {rank} (pid {pid}) {how}" for rank, pid, how in ended]
        time.sleep(0.1)


def _process_end(pid: int) -> str | None:
    """How process ``pid`` ended (``ended by signal SIGKILL``, ``ended with exit status 1``,
    ``has ended``), None while it runs. Linux's ``/proc/PID/stat`` shows an ended process that
    its parent has not waited for (state ``Z``) with its wait status as the last field."""
    import signal

    if not Path("/proc/self/stat").exists():  # not Linux: alive while a signal 0 reaches it
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return "has ended"
        except OSError:
            pass
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return "has ended"
    if fields[0] not in ("Z", "X"):
        return None
    status = int(fields[-1]) if len(fields) >= 50 else 0
    if status & 0x7F:
        try:
            return f"ended by signal {signal.Signals(status & 0x7F).name}"
        except ValueError:
            return f"ended by signal {status & 0x7F}"
    return f"ended with exit status {status >> 8}" if status else "has ended"


def warn(message: str) -> None:
    """A ``UserWarning`` from global rank zero only (one per run, not one per process).

    Example:
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     warn("EMA: an update is skipped")
        >>> str(caught[0].message)
        'EMA: an update is skipped'
    """
    from lightning.pytorch.utilities.rank_zero import rank_zero_warn

    rank_zero_warn(message, category=UserWarning)
