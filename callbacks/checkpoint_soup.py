"""Checkpoint soup: the uniform and the greedy soup of the last ``k`` epoch-end weights of one
run (latest weight averaging; Wortsman et al. 2022's soups over one trajectory), chosen on
validation data at the end of ``fit``.

Example:
    >>> from litplug.callbacks import CheckpointSoup
    >>> soup = CheckpointSoup(k=3, final_weights="greedy")
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import lightning.pytorch as pl
from lightning.pytorch import Callback
from torch import Tensor
from typing_extensions import override

from ..board import log_figure, write_charts
from ..figures import greedy_chart
from ..merging import linear
from ..validation import check_choice, check_positive_int
from .held_out import check_can_validate, held_out_loss, load_everywhere, log_rank_zero, snapshot

__all__ = ["CheckpointSoup"]

Final = Literal["greedy", "uniform", "live"]


class CheckpointSoup(Callback):
    """A soup of the last epochs' weights, chosen on validation at the end of fit.

    Keep the weights of the last ``k`` training epochs (taken when each epoch ends) and, when
    ``fit`` ends, validate their uniform soup ``mean_i w_i`` and their greedy soup (Wortsman et al.
    2022, "Model soups", Recipe 1: snapshots sorted by validation loss, each added to the soup
    only if the soup's validation loss does not rise), then load ``final_weights``.

    The validation loss is the module's own loss (:func:`litplug.plumbing.loss.module_loss`) on the
    run's first validation loader in eval mode, so the soup is chosen on held-out data; the greedy
    soup is never worse than its best snapshot there. Floating tensors (BatchNorm statistics
    included) are averaged with :func:`litplug.merging.linear`, integer buffers come from the
    first snapshot of the soup. Logs to the logger ``soup/snapshot_loss`` (step = snapshot index,
    oldest first), ``soup/uniform_loss``, ``soup/greedy_loss``, ``soup/greedy_size`` and
    ``soup/live_loss``, the custom-scalars section ``merging`` and the figure ``soup/greedy``
    (each snapshot's loss in the order tried and the soup's loss as it grows; rank zero, with a
    TensorBoard logger). The snapshots live in the callback's state, so a resumed run soups the
    same weights.

    Distributed: single device or DDP. Every rank holds the same snapshots (DDP replicas agree);
    the losses are summed over ranks (one all-reduce per evaluation), so every rank takes the same
    decisions, and rank zero's merged weights are broadcast so every rank ends with the same
    weights. FSDP2, FSDP1 and DeepSpeed are refused at setup.

    Args:
        k: how many of the latest epoch-end weights to keep (>= 1).
        final_weights: ``"greedy"``, ``"uniform"`` or ``"live"`` (keep the trained weights; the
            soups are only validated and logged).

    Example:
        >>> soup = CheckpointSoup(k=3, final_weights="greedy")
    """

    litplug_charts: ClassVar[dict[str, dict[str, list[str]]]] = {
        "merging": {
            "checkpoint soup: validation loss of the snapshots and the soups": [
                "^soup/snapshot_loss$",
                "^soup/(uniform|greedy|live)_loss$",
            ],
        },
    }

    def __init__(self, k: int = 3, final_weights: Final = "greedy") -> None:
        super().__init__()
        check_positive_int("k", k)
        check_choice("final_weights", final_weights, ("greedy", "uniform", "live"))
        self.k = k
        self.final_weights = final_weights
        self.snapshots: list[dict[str, Tensor]] = []
        self.epochs: list[int] = []
        self.losses: dict[str, float] = {}
        self.snapshot_losses: list[float] = []
        self.greedy_members: list[int] = []

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            check_can_validate(trainer, pl_module, "CheckpointSoup")

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        write_charts(trainer)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.snapshots.append(snapshot(pl_module))
        self.epochs.append(trainer.current_epoch)
        del self.snapshots[: -self.k], self.epochs[: -self.k]

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.snapshots:
            return
        live = snapshot(pl_module)
        scores = [held_out_loss(trainer, pl_module, s) for s in self.snapshots]
        uniform = linear(self.snapshots)
        order = sorted(range(len(scores)), key=lambda i: (scores[i], i))
        members, best = [order[0]], scores[order[0]]
        trials = [(order[0], best, True)]
        for i in order[1:]:
            candidate = held_out_loss(trainer, pl_module, linear([self.snapshots[j] for j in [*members, i]]))
            trials.append((i, candidate, candidate <= best))
            if candidate <= best:
                members.append(i)
                best = candidate
        greedy = linear([self.snapshots[j] for j in members])
        self.greedy_members = sorted(members)
        self.snapshot_losses = scores
        self.losses = {
            "uniform": held_out_loss(trainer, pl_module, uniform),
            "greedy": best,
            "live": held_out_loss(trainer, pl_module, live),
        }
        for i, score in enumerate(scores):
            log_rank_zero(trainer, {"soup/snapshot_loss": score}, step=i)
        log_rank_zero(
            trainer,
            {f"soup/{name}_loss": value for name, value in self.losses.items()}
            | {"soup/greedy_size": float(len(members))},
            step=len(scores),
        )
        rows = [(f"epoch {self.epochs[i]}", scores[i], loss, kept) for i, loss, kept in trials]
        title = f"greedy soup: {len(members)} of {len(trials)} snapshots kept"
        log_figure(trainer, "soup/greedy", lambda: greedy_chart(rows, title, "validation loss"))
        chosen = {"greedy": greedy, "uniform": uniform, "live": live}[self.final_weights]
        load_everywhere(trainer, pl_module, chosen)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"snapshots": self.snapshots, "epochs": self.epochs}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.snapshots = list(state_dict["snapshots"])
        self.epochs = list(state_dict["epochs"])
