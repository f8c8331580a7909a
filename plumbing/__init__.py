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
    "grad_scaler",
    "is_sharded",
    "local",
    "local_rows",
    "loss_scale",
    "mix_seed",
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
    at once: a rank whose interpreter finalises with gloo's worker threads around has aborted at
    times (SIGABRT, "terminate called without an active exception") after all its work was
    done, even with the group destroyed first. ``os._exit`` skips ``atexit`` handlers; Lightning's
    loggers have flushed and closed their files when ``fit``/``test`` return.
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
