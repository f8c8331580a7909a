"""The held-out score both in-training merges (checkpoint soups, WiSE-FT) choose with: the
module's own loss on the run's validation batches, summed over ranks."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor

from ..plumbing import refuse_flat_strategies, training_mode
from ..plumbing.loss import module_loss, require_loss
from ..plumbing.third_party_private import muted


def check_can_validate(trainer: Trainer, pl_module: LightningModule, who: str) -> None:
    """At setup: a held-out loss needs validation data, the module's own loss and replicated
    parameters (single device or DDP)."""
    refuse_flat_strategies(trainer, who)
    if getattr(pl_module, "device_mesh", None) is not None:
        raise ValueError(f"{who} does not support ModelParallelStrategy (FSDP2); use a single device or DDP")
    require_loss(pl_module, who)
    owners = [o for o in (trainer.datamodule, pl_module) if o is not None]
    if trainer.limit_val_batches == 0 or not any(is_overridden("val_dataloader", o) for o in owners):
        raise ValueError(
            f"{who} chooses its merge on validation data: give the datamodule (or module) a `val_dataloader` "
            f"and keep `limit_val_batches` > 0 (got {trainer.limit_val_batches})"
        )


def _val_batches(trainer: Trainer, pl_module: LightningModule) -> tuple[Any, float]:
    """The first validation loader and how many of its batches to use: the Trainer's (with its
    distributed sampler and ``limit_val_batches``) when its validation loop has loaded them, else
    the datamodule's (or module's) own ``val_dataloader`` (a module without ``validation_step``)."""
    loaders = trainer.val_dataloaders
    limit: float = trainer.num_val_batches[0] if loaders is not None and trainer.num_val_batches else float("inf")
    if loaders is None:
        owner = trainer.datamodule
        if owner is None or not is_overridden("val_dataloader", owner):
            owner = pl_module
        loaders = owner.val_dataloader()
        if isinstance(trainer.limit_val_batches, int):
            limit = trainer.limit_val_batches
    loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
    return loader, limit


@torch.no_grad()
def held_out_loss(trainer: Trainer, pl_module: LightningModule, state: Mapping[str, Tensor]) -> float:
    """Mean of the module's own loss (:func:`litplug.plumbing.loss.module_loss`, eval mode, logging
    muted) over the first validation loader with ``state`` loaded, weighted by batches and summed
    over ranks (one all-reduce); the module's weights are put back."""
    live = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
    loader, limit = _val_batches(trainer, pl_module)
    total = torch.zeros(2, dtype=torch.float64, device=pl_module.device)
    pl_module.load_state_dict(state)
    try:
        with muted(pl_module, None, freeze_bn_stats=False), training_mode(pl_module, False):
            for i, batch in enumerate(loader):
                if i >= limit:
                    break
                batch = trainer.precision_plugin.convert_input(trainer.strategy.batch_to_device(batch))
                total[0] += module_loss(pl_module, batch, i).double()
                total[1] += 1
    finally:
        pl_module.load_state_dict(live)
    total = trainer.strategy.reduce(total, reduce_op="sum")
    return float(total[0] / total[1].clamp(min=1))


def load_everywhere(trainer: Trainer, pl_module: LightningModule, state: Mapping[str, Tensor]) -> None:
    """Load rank zero's ``state`` on every rank (one broadcast under DDP), so every replica ends
    with the same weights."""
    state = trainer.strategy.broadcast({k: v.cpu() for k, v in state.items()}, src=0)
    pl_module.load_state_dict(state)


def snapshot(pl_module: LightningModule) -> dict[str, Tensor]:
    """A CPU copy of the module's state dict."""
    return {k: v.detach().to("cpu", copy=True) for k, v in pl_module.state_dict().items()}


def log_rank_zero(trainer: Trainer, metrics: dict[str, float], step: int) -> None:
    if trainer.logger is not None and trainer.is_global_zero:
        trainer.logger.log_metrics(metrics, step=step)
