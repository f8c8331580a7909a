"""WiSE-FT: interpolate between the weights a fine-tune started from and the fine-tuned ones
(Wortsman et al. 2022, "Robust fine-tuning of zero-shot models"), evaluated at the end of ``fit``.

Example:
    >>> from litplug.callbacks import WiSEFT
    >>> wise = WiSEFT(alpha=[0.25, 0.5, 0.75, 1.0])
"""

from __future__ import annotations

from typing import Any, ClassVar

import lightning.pytorch as pl
from lightning.pytorch import Callback
from torch import Tensor
from typing_extensions import override

from ..board import write_charts
from ..merging import interpolate
from ..validation import check_list, check_number
from .held_out import check_can_validate, held_out_loss, load_everywhere, log_rank_zero, snapshot

__all__ = ["WiSEFT"]


class WiSEFT(Callback):
    """Weight-space ensembling of a fine-tune with its starting point (WiSE-FT).

    Weight-space ensembling of a fine-tune with its starting point: the weights at the start of
    ``fit`` (``theta_0``, e.g. a pre-trained or zero-shot model) are kept, and when ``fit`` ends the
    module gets ``theta_alpha = (1 - alpha) theta_0 + alpha theta_1`` (:func:`litplug.merging.
    interpolate`; ``theta_1`` the fine-tuned weights). With several ``alpha`` the one of lowest
    validation loss (the module's own loss on the run's first validation loader, eval mode) is
    kept, the smaller on a tie; with one it is applied as given and still evaluated.

    Logs to the logger ``wise_ft/loss`` at step ``round(1000 * alpha)`` for every candidate and
    ``wise_ft/alpha`` (the chosen one), and the custom-scalars section ``merging``. ``theta_0``
    lives in the callback's state, so a resumed run interpolates from the first start's weights,
    not the resumed ones.

    Distributed: single device or DDP; the losses are summed over ranks (one all-reduce per
    candidate) and rank zero's result is broadcast, so every rank ends with the same weights.
    FSDP2, FSDP1 and DeepSpeed are refused at setup.

    Args:
        alpha: the mixing coefficient(s) (0: the start, 1: the fine-tune); finite numbers
            (extrapolation beyond [0, 1] is allowed, as in the paper's appendix).

    Example:
        >>> wise = WiSEFT(alpha=0.5)
    """

    litplug_charts: ClassVar[dict[str, dict[str, list[str]]]] = {
        "merging": {"WiSE-FT: validation loss against 1000 alpha": ["^wise_ft/loss$"]},
    }

    def __init__(self, alpha: float | list[float] = 0.5) -> None:
        super().__init__()
        if isinstance(alpha, (list, tuple)):
            alphas = check_list("alpha", alpha, check_number, nonempty=True)
        else:
            alphas = [check_number("alpha", alpha)]
        self.alpha = alpha
        self.alphas = [float(a) for a in alphas]
        self.initial: dict[str, Tensor] | None = None
        self.losses: list[float] = []
        self.chosen: float | None = None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            check_can_validate(trainer, pl_module, "WiSEFT")

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        write_charts(trainer)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.initial is None:  # a resumed run keeps the first start's weights
            self.initial = snapshot(pl_module)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.initial is None:
            return
        finetuned = snapshot(pl_module)
        candidates = [interpolate(self.initial, finetuned, a) for a in self.alphas]
        self.losses = [held_out_loss(trainer, pl_module, c) for c in candidates]
        best = min(range(len(self.alphas)), key=lambda i: (self.losses[i], self.alphas[i]))
        self.chosen = self.alphas[best]
        for a, loss in zip(self.alphas, self.losses):
            log_rank_zero(trainer, {"wise_ft/loss": loss}, step=round(1000 * a))
        log_rank_zero(trainer, {"wise_ft/alpha": self.chosen}, step=round(1000 * max(self.alphas)))
        load_everywhere(trainer, pl_module, candidates[best])

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"initial": self.initial}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.initial = state_dict["initial"]
