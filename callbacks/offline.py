"""Gradient-ascent design search on a trained surrogate: the evaluation step of offline
model-based optimisation.

Method card: after the surrogate ``f`` is fit on the offline designs (``OfflineDesigns``), start
from the ``num_designs`` best offline designs and run ``steps`` projected gradient-ascent steps on
the surrogate in its standardised input space,

    x <- clip(x + step_size * grad_x f(x), lower, upper),

then score the final designs with the task's true objective, normalised over the full task
(``(y - y_min) / (y_max - y_min)``, withheld designs included: 1 matches the best design of the
full dataset), and report the 100th and 50th percentile of those scores: the "Grad" baseline of
Design-Bench (Trabucco et al. 2022, https://arxiv.org/abs/2202.08450) that IGNITE (Dao et al.
2024) regularises. Training is untouched; the cost is ``steps`` forward/backward passes of the
surrogate on ``num_designs`` inputs, once, at the end of ``fit``.

Example:
    >>> from lightning.pytorch import Trainer
    >>> from litplug.callbacks import GradientAscentSearch
    >>> from litplug.datamodules import OfflineDesigns
    >>> from litplug.modules import MLP, Regressor
    >>> search = GradientAscentSearch(num_designs=128, steps=100, step_size=0.05)
    >>> trainer = Trainer(max_epochs=20, callbacks=[search], enable_progress_bar=False)  # doctest: +SKIP
    >>> trainer.fit(Regressor(MLP(input_shape=[8], num_outputs=1)), OfflineDesigns("sphere"))  # doctest: +SKIP
    >>> search.results["offline/score_max"]  # doctest: +SKIP
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override

from ..board import log_figure, write_charts
from ..figures import histograms
from ..functional.offline import gradient_ascent, starting_designs
from ..plumbing import training_mode
from ..protocols import OfflineDesignsData, require
from ..validation import check_choice, check_int, check_number, check_positive_int


class GradientAscentSearch(Callback):
    """Search designs on the trained surrogate at the end of ``fit``.

    Search designs on the trained surrogate at the end of ``fit`` (module docstring) and log
    ``offline/score_max`` and ``offline/score_median`` (normalised true scores of the final
    designs) and ``offline/start_max`` (the best starting design, for reference) to every logger,
    at the last global step. The values are also kept in ``results`` and
    ``trainer.callback_metrics``; the final raw designs in ``designs``. On rank zero with a
    TensorBoard logger, the figure ``offline/designs`` shows the normalised true scores of the
    offline dataset (every kept design), of the starting and of the final designs, with the best
    final design marked; the custom-scalars section ``offline`` holds the surrogate's validation
    rank correlation and the search's scores.

    The datamodule must expose the offline data as ``OfflineDesigns`` does: ``designs``,
    ``scores``, ``lower``, ``upper``, ``score(x)`` and ``unstandardise(x)``
    (:class:`litplug.protocols.OfflineDesignsData`, checked at setup).

    Distributed: every rank runs the same search on the same (replicated) designs; under DDP the
    unwrapped module is called, so no collective is added; under FSDP2 each surrogate forward and
    backward all-gathers the parameter shards as in training (all ranks take part in lockstep), and
    no gradient is reduced since only the designs get gradients. Metrics are written once, by the
    loggers on rank 0. Precision: the surrogate runs under the Trainer's precision plugin
    (autocast for ``*-mixed``); the designs stay float32. Model weights, their gradients, the train
    mode of submodules and the global RNG are left as they were, so training and a resumed run are
    unaffected; the callback has no state to checkpoint.

    Args:
        num_designs: designs searched (the best ``num_designs`` offline ones with ``init="top"``).
        steps: gradient-ascent steps (0 scores the starting designs).
        step_size: step in standardised input units per unit of surrogate gradient, > 0.
        init: the starting designs: ``top`` (best offline designs) or ``random`` (uniform sample of
            offline designs).
        seed: seed of the ``random`` draw.
    """

    litplug_charts: ClassVar[dict[str, dict[str, list[str]]]] = {
        "offline": {
            "surrogate: validation rank correlation and loss": ["^val/spearman$", "^val/loss$"],
            "search: normalised true scores of the designs": ["^offline/"],
        },
    }

    def __init__(
        self,
        num_designs: int = 128,
        steps: int = 100,
        step_size: float = 0.05,
        init: Literal["top", "random"] = "top",
        seed: int = 0,
    ) -> None:
        check_positive_int("num_designs", num_designs)
        check_int("steps", steps, low=0)
        check_number("step_size", step_size, low=0, low_open=True)
        check_choice("init", init, ("top", "random"))
        check_int("seed", seed)
        self.num_designs = num_designs
        self.steps = steps
        self.step_size = step_size
        self.init = init
        self.seed = seed
        self.results: dict[str, float] = {}
        self.designs: torch.Tensor | None = None

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        require(trainer.datamodule, OfflineDesignsData, "GradientAscentSearch", "datamodule")

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        write_charts(trainer)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # `pl_module.log` is not allowed in on_train_end, and the search needs the final weights:
        # the loggers are called directly (they write on rank 0 only).
        dm = trainer.datamodule
        dm.setup("fit")
        device = pl_module.device
        x0 = starting_designs(dm.designs, dm.scores, self.num_designs, self.init, self.seed).to(device)
        precision = trainer.precision_plugin

        def surrogate(x: torch.Tensor) -> torch.Tensor:
            with precision.forward_context():
                return pl_module(precision.convert_input(x)).float()

        with training_mode(pl_module, False), torch.enable_grad(), torch.inference_mode(False):
            x = gradient_ascent(surrogate, x0, self.steps, self.step_size, dm.lower.to(device), dm.upper.to(device))
        final, initial = dm.score(x), dm.score(x0)
        self.designs = dm.unstandardise(x)
        self.results = {
            "offline/score_max": float(final.max()),
            "offline/score_median": float(torch.quantile(final, 0.5)),
            "offline/start_max": float(initial.max()),
        }
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in self.results.items()})
        for logger in trainer.loggers:
            logger.log_metrics(self.results, step=trainer.global_step)
        log_figure(
            trainer,
            "offline/designs",
            lambda: histograms(
                {"offline dataset": dm.score(dm.designs), "start": initial, "found": final},
                f"designs after {self.steps} gradient-ascent steps",
                "normalised true score (1: best of the full task)",
                lines={"best found": float(final.max())},
            ),
        )
