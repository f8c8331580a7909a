"""Shared plumbing of litplug's LightningModules: backbone, optimizer/scheduler callables that
are validated at construction, and FSDP2 sharding under ``ModelParallelStrategy``."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from ..board import write_charts


def check_optimizer(optimizer: OptimizerCallable, lr_scheduler: LRSchedulerCallable | None) -> None:
    """Build the optimizer (and scheduler) once on a dummy parameter so that impossible values
    (``lr=-1``, ``momentum=2``, a wrong keyword) fail at construction time, not after setup."""
    dummy = [nn.Parameter(torch.zeros(1))]
    try:
        opt = optimizer(dummy)
    except (ValueError, TypeError) as err:
        raise ValueError(f"`optimizer` rejected its arguments{_keywords(optimizer)}: {err}") from err
    if lr_scheduler is not None:
        try:
            lr_scheduler(opt)
        except (ValueError, TypeError) as err:
            raise ValueError(f"`lr_scheduler` rejected its arguments{_keywords(lr_scheduler)}: {err}") from err


def _keywords(factory: Any) -> str:
    keywords = getattr(factory, "keywords", None)  # functools.partial, as jsonargparse builds them
    return " (" + ", ".join(f"{k}={v!r}" for k, v in keywords.items()) + ")" if keywords else ""


def shard_backbone(backbone: nn.Module, mesh: Any) -> None:
    """Apply FSDP2 ``fully_shard`` to every direct child that owns parameters, then the root.

    Parameters become ``DTensor``s sharded along dim 0 over ``mesh``; each child is one
    all-gather unit, so peak memory stays at one block's full weights.
    """
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if isinstance(backbone, FSDPModule):  # configure_model runs again for validate/test
        return
    for child in backbone.children():
        if any(p.requires_grad for p in child.parameters()):
            fully_shard(child, mesh=mesh)
    fully_shard(backbone, mesh=mesh)


class TrainingModule(LightningModule):
    """Base of litplug's modules: ``self.backbone`` plus configurable optimizer and scheduler.

    Args:
        backbone: the network trained (any ``nn.Module``; see ``litplug.modules.networks``).
        optimizer: callable ``params -> Optimizer`` (LightningCLI's ``OptimizerCallable``).
        lr_scheduler: optional callable ``optimizer -> LRScheduler``; ``ReduceLROnPlateau``
            monitors ``val/loss``.
    """

    def __init__(
        self,
        backbone: nn.Module,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(backbone, nn.Module):
            raise TypeError(f"`backbone` must be an nn.Module, got {type(backbone).__name__}")
        if not callable(optimizer):
            raise TypeError(
                "`optimizer` must be a callable params -> Optimizer (an optimizer class or a partial of one), "
                f"got {optimizer!r}"
            )
        if lr_scheduler is not None and not callable(lr_scheduler):
            raise TypeError(f"`lr_scheduler` must be None or a callable optimizer -> LRScheduler, got {lr_scheduler!r}")
        check_optimizer(optimizer, lr_scheduler)
        self.backbone = backbone
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler

    #: TensorBoard custom-scalars charts of this module (see ``litplug.board.write_charts``).
    litplug_charts: ClassVar[dict[str, dict[str, list[str]]]] = {
        "training": {"loss: train vs validation": ["^train/loss$", "^val/loss$"]},
    }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def on_fit_start(self) -> None:
        write_charts(self.trainer)

    def configure_model(self) -> None:
        # Only ModelParallelStrategy sets a device mesh; every other strategy leaves it None.
        mesh = self.device_mesh
        if mesh is not None:
            dp_mesh = mesh["data_parallel"] if mesh.mesh_dim_names and "data_parallel" in mesh.mesh_dim_names else mesh
            shard_backbone(self.backbone, dp_mesh)

    def configure_optimizers(self) -> Any:
        opt = self.optimizer(self.parameters())
        if self.lr_scheduler is None:
            return opt
        scheduler = self.lr_scheduler(opt)
        config: dict[str, Any] = {"scheduler": scheduler}
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            config["monitor"] = "val/loss"
        return {"optimizer": opt, "lr_scheduler": config}
