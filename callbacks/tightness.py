"""How loose interval bounds are, layer by layer, as certified training goes on."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override

from ..bounds import bounded, linear_bounds
from ..protocols import CertifiedModule, require
from ..validation import check_positive_int

__all__ = ["BoundTightness"]


class BoundTightness(Callback):
    """Log how much tighter CROWN bounds are than IBP bounds, layer by layer.

    Per ReLU layer: the width of the CROWN bounds over the width of the IBP bounds of its
    pre-activations on a validation batch (Mao et al. 2023, "Understanding Certified Training
    with Interval Bound Propagation": how far IBP is from the tighter linear relaxation, and how
    training changes that).

    Every ``every_n_epochs`` at the end of validation, on the first ``num_samples`` inputs of the
    first validation batch at the module's ``eps``: ``certified/width_ratio/layer_<i>`` (mean CROWN
    width / mean IBP width of the ``i``-th ReLU input, 1 where IBP is exact, e.g. after the first
    layer) and ``certified/width_ratio/output``. The box is ``pl_module.box(x, eps)`` when the
    module has it (:class:`~litplug.modules.CertifiedClassifier`: the pixel-space ball), else
    ``[x - eps, x + eps]``. The module needs the certified interface
    (:class:`litplug.protocols.CertifiedModule`); :class:`~litplug.modules.CertifiedClassifier`
    also logs the paper's linearised tightness as ``certified/tightness``.

    Cost: one CROWN computation (a backward pass per ReLU layer, one row per neuron) per
    measurement, in eval mode without gradients; training is unchanged. Distributed: each rank
    measures its own batch, the logged values are the mean over ranks (``sync_dist``). No state.

    Args:
        every_n_epochs: how often to measure, >= 1.
        num_samples: inputs of the validation batch to bound, >= 1.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> from litplug.callbacks import BoundTightness, IBPWarmup
        >>> trainer = Trainer(callbacks=[IBPWarmup(ramp_epochs=5), BoundTightness()])  # doctest: +SKIP
    """

    def __init__(self, every_n_epochs: int = 1, num_samples: int = 32) -> None:
        check_positive_int("every_n_epochs", every_n_epochs)
        check_positive_int("num_samples", num_samples)
        self.every_n_epochs = every_n_epochs
        self.num_samples = num_samples
        self._batch: torch.Tensor | None = None

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        require(pl_module, CertifiedModule, "BoundTightness")

    @override
    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if batch_idx == 0 and dataloader_idx == 0 and not trainer.sanity_checking:
            x = batch[0] if isinstance(batch, (list, tuple)) else batch
            self._batch = x[: self.num_samples].detach()

    @override
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        x, self._batch = self._batch, None
        eps = float(pl_module.eps)
        if x is None or eps == 0 or trainer.current_epoch % self.every_n_epochs:
            return
        for name, value in width_ratios(pl_module, x, eps).items():
            pl_module.log(f"certified/width_ratio/{name}", value, sync_dist=True)


@torch.no_grad()
def width_ratios(pl_module: LightningModule, x: torch.Tensor, eps: float) -> dict[str, torch.Tensor]:
    """Mean CROWN width over mean IBP width at every ReLU input and at the output."""
    with torch.autocast(x.device.type, enabled=False):
        x = x.float()
        box = getattr(pl_module, "box", None)
        lower, upper = box(x, eps) if callable(box) else (x - eps, x + eps)
        result = linear_bounds(bounded(pl_module.backbone), lower, upper, "crown", record_relu=True)
    ratios = {}
    for i, ((lo, up), (ibp_lo, ibp_up)) in enumerate(zip(result.relu, result.ibp_relu)):
        ratios[f"layer_{i}"] = (up - lo).mean() / (ibp_up - ibp_lo).mean().clamp(min=1e-12)
    assert result.upper is not None
    width = (result.upper - result.lower).mean()
    ratios["output"] = width / (result.ibp_upper - result.ibp_lower).mean().clamp(min=1e-12)
    return ratios
