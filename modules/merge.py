"""ModelMerge: merge finished models under ``litplug validate`` with one of eight recipes, the
functional cores of ``litplug.merging`` and ``litplug.modules.soup``, optionally after aligning
every ingredient's hidden units onto the base.

Method card
    * ``uniform`` / ``greedy``: model soups (Wortsman et al. 2022), as :class:`ModelSoup`.
    * ``task_arithmetic``: ``base + lambda * sum_t (theta_t - base)`` (Ilharco et al. 2023).
    * ``ties``: TIES-merging (Yadav et al. 2023): trim each whole-model task vector to its
      ``density`` share of largest magnitudes, elect signs, average the agreeing entries.
    * ``dare`` (Yu et al. 2024): Bernoulli drop of task-vector entries, ``1 / density`` rescale.
    * ``breadcrumbs`` (Davari & Belilovsky 2024): drop the largest ``gamma`` and the smallest
      task-vector magnitudes per tensor, keep ``density``.
    * ``model_stock`` (Jang et al. 2024): per tensor, move from the base towards the fine-tunes'
      mean by ``t = N cos / (1 + (N - 1) cos)``.
    * ``align_then_average``: permute every ingredient onto the first by Git Re-Basin weight
      matching (Ainsworth et al. 2023; the permutation structure comes from an fx trace of the
      backbone), then average uniformly: for models trained from *different* initialisations.
    * ``align=True`` does the same before any recipe: every ingredient is permuted onto ``base``
      (onto the first ingredient without a base), so TIES, DARE or model stock can merge models
      that do not share an initialisation; something mergekit does not offer.
    * ``map`` (Li et al. 2024, MAP): per-task coefficients ``c`` of task arithmetic,
      ``base + sum_t c_t (theta_t - base)``; fine-tune ``t`` is scored on validation dataloader
      ``t``, one quadratic per task metric is fitted to the evaluated ``c`` in ``[0, 1]^T``
      (:func:`litplug.merging.map_pareto_front`, ``seed`` draws the points), and the predicted
      front's point with the best mean predicted metric is scored again and loaded (ties: the
      first), unless one of the evaluated points measured better on average: the surrogates are
      not bounded to the metric's range and can be far off, so that point is loaded instead
      (``map_from_front`` says which, ``map_coefficients`` holds the loaded coefficients).
    * With several ``scale`` values (task arithmetic, TIES) the one with the best validation
      metric is kept, as both papers choose ``lambda`` on held-out data.
    * Cost: one evaluation per ingredient and per candidate (greedy soup, scales); alignment
      solves one assignment problem per hidden layer and sweep.

Example:
    >>> merge = ModelMerge(MLP(), ["a.ckpt", "b.ckpt"], recipe="ties", base="base.ckpt")  # doctest: +SKIP
    >>> Trainer().validate(merge, Digits())  # doctest: +SKIP
"""

from __future__ import annotations

import copy
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn
from typing_extensions import override

from ..board import has_tensorboard, log_figure, write_charts
from ..figures import panels, pareto_chart
from ..functional.soup import greedy_soup, uniform_soup
from ..merging import MAPResult, align, breadcrumbs, dare, map_pareto_front, model_stock, task_arithmetic, ties_merge
from ..merging.states import State, check_states
from ..plumbing import save_rank_zero
from ..validation import check_bool, check_choice, check_int, check_list, check_number, check_str
from .classifier import Classifier
from .soup import Metric, ModelSoup, load_ingredient, log_greedy_figure, short_names, val_loaders

Recipe = Literal[
    "uniform", "greedy", "task_arithmetic", "ties", "dare", "breadcrumbs", "model_stock", "align_then_average", "map"
]
RECIPES = (
    "uniform", "greedy", "task_arithmetic", "ties", "dare", "breadcrumbs", "model_stock", "align_then_average", "map"
)  # fmt: skip
WITH_BASE = ("task_arithmetic", "ties", "dare", "breadcrumbs", "model_stock", "map")
SCALED = ("task_arithmetic", "ties", "dare", "breadcrumbs")
PATH_POINTS = 11  # t values of the interpolation figure


class ModelMerge(Classifier):
    """A classifier whose weights are merged from finished models.

    A classifier whose weights are merged from finished models when validation starts
    (``litplug validate --config configs/digits/merge/<recipe>.yaml``).

    Logs to the logger ``merge/ingredient_<metric>`` (step = ingredient index, in the order of
    ``checkpoints``), ``merge/kept`` (greedy: 1 if the ingredient is in the soup),
    ``merge/scale_<metric>`` and ``merge/scale`` (step = index in ``scale``, when several are
    tried) and ``merge/<metric>``; the validation epoch then logs ``val/acc`` and ``val/loss`` of
    the merged model. Figures (rank zero, with a TensorBoard logger): ``merge/interpolation``
    (:meth:`interpolation_path`) and, for ``greedy``, ``merge/greedy`` (every ingredient's score in
    the order tried and the soup's score as it grows); the custom-scalars section ``merging``.
    ``map`` logs ``merge/map_coefficient`` and ``merge/map_<metric>`` (step = task: the chosen
    coefficients, the chosen merge's measured metric per task) and the figure ``merge/pareto``
    (:func:`litplug.figures.pareto_chart`: the evaluated points' measured metrics, the predicted
    front and the loaded merge's measured metrics; with more than two tasks, the first two); with
    several validation dataloaders the validation epoch logs ``val/acc/dataloader_idx_<k>`` and
    ``val/loss/dataloader_idx_<k>``. Its backbone weights are written to ``output_path`` (a plain
    state dict).

    Distributed: single process or DDP (every rank merges identically; held-out counts are summed
    with one all-reduce per evaluation). FSDP2 is not supported (raises at setup).

    Args:
        backbone: the architecture of the ingredients (its own weights are replaced).
        checkpoints: ingredient files: Lightning ``.ckpt`` (``backbone.*`` keys) or plain backbone
            state dicts; for the task-vector recipes the fine-tunes of ``base``.
        recipe: ``uniform``, ``greedy``, ``task_arithmetic``, ``ties``, ``dare``, ``breadcrumbs``,
            ``model_stock``, ``align_then_average`` or ``map`` (two or more fine-tunes and one
            validation dataloader per fine-tune, in the order of ``checkpoints``).
        base: the pre-trained weights the fine-tunes started from (``task_arithmetic``, ``ties``,
            ``dare``, ``breadcrumbs``, ``model_stock``, ``map`` only).
        scale: ``lambda`` of task arithmetic / TIES / DARE / breadcrumbs, or a list of candidates
            chosen on the validation split (unused by the other recipes).
        density: share of task-vector entries kept by TIES, DARE and breadcrumbs, in (0, 1].
        gamma: share of the largest task-vector magnitudes breadcrumbs drops, in [0, 1).
        seed: seed of DARE's drop masks and of MAP's sampled coefficients.
        align: permute every ingredient onto ``base`` (onto the first ingredient without one) by
            weight matching before merging.
        metric: held-out metric used to choose (greedy, scales) and logged: ``"val/acc"``
            (maximised) or ``"val/loss"`` (minimised).
        num_classes: number of classes.
        output_path: where to write the merged backbone's state dict (``None``: do not write).
    """

    litplug_charts: ClassVar[dict[str, dict[str, list[str]]]] = {
        "merging": {
            "each ingredient's held-out metric, kept or not, and the merge's": [
                "^merge/ingredient_",
                "^merge/kept$",
                "^merge/(acc|loss)$",
            ],
            "held-out metric of each scale tried": ["^merge/scale"],
            "MAP: chosen coefficient and measured metric per task": ["^merge/map_"],
        },
    }

    evaluate_state = ModelSoup.evaluate_state
    evaluate_loss_and_accuracy = ModelSoup.evaluate_loss_and_accuracy

    def __init__(
        self,
        backbone: nn.Module,
        checkpoints: list[str],
        recipe: Recipe = "uniform",
        base: str | None = None,
        scale: float | list[float] = 1.0,
        density: float = 0.2,
        gamma: float = 0.01,
        seed: int = 0,
        align: bool = False,
        metric: Metric = "val/acc",
        num_classes: int = 10,
        output_path: str | None = "runs/merge.pt",
    ) -> None:
        check_choice("recipe", recipe, tuple(RECIPES))
        check_choice("metric", metric, ("val/acc", "val/loss"))
        check_list("checkpoints", checkpoints, check_str, nonempty=True)
        check_str("base", base, allow_none=True)
        needs_base = recipe in WITH_BASE
        if needs_base and base is None:
            raise ValueError(f"`base` (the pre-trained weights) is required by recipe {recipe!r}")
        if not needs_base and base is not None:
            raise ValueError(f"`base` is only used by recipes {', '.join(WITH_BASE)}, got recipe {recipe!r}")
        if recipe == "map" and len(checkpoints) < 2:
            raise ValueError(f"recipe 'map' trades off tasks: `checkpoints` needs 2 or more, got {checkpoints}")
        if isinstance(scale, (list, tuple)):
            scales = check_list("scale", scale, check_number, nonempty=True)
        else:
            scales = [check_number("scale", scale)]
        check_number("density", density, 0, 1, low_open=True)
        check_number("gamma", gamma, 0, 1, high_open=True)
        check_int("seed", seed)
        check_bool("align", align)
        check_str("output_path", output_path, allow_none=True)
        super().__init__(backbone, num_classes)
        reference = dict(backbone.state_dict())
        self.ingredients: list[State] = []
        for path in checkpoints:
            state = load_ingredient(path, expected=list(reference))
            check_states([reference, state], labels=["the backbone", f"checkpoint {path}"])
            self.ingredients.append(state)
        self.base_state: State | None = None
        if base is not None:
            self.base_state = load_ingredient(base, expected=list(reference))
            check_states([reference, self.base_state], labels=["the backbone", f"base {base}"])
        self.checkpoints = list(checkpoints)
        self.recipe = recipe
        self.scales = [float(s) for s in scales]
        self.density = float(density)
        self.gamma = float(gamma)
        self.seed = int(seed)
        self.align = bool(align)
        self.metric = metric
        self.output_path = output_path
        self.kept: list[int] = []
        self.scores: list[float] = []
        self.trials: list[tuple[int, float, bool]] = []
        self.scale_scores: list[float] = []
        self.chosen_scale: float | None = None
        self.merged_score: float | None = None
        self.map_result: MAPResult | None = None
        self.map_choice: int | None = None  # row of map_result.coefficients: the front's best predicted mean
        self.map_coefficients: list[float] = []  # the loaded coefficients
        self.map_from_front = True  # False: an evaluated point measured better than the front's choice
        self.map_scores: list[float] = []  # the loaded merge's measured metric per task
        self._built = False

    @override
    def configure_model(self) -> None:
        if self.device_mesh is not None:
            raise ValueError("ModelMerge does not support ModelParallelStrategy (FSDP2); use a single device or DDP")

    def _better(self, a: float, b: float) -> bool:
        return a > b if self.metric == "val/acc" else a < b

    def _example_input(self) -> Tensor:
        batch = next(iter(val_loaders(self.trainer)[0]))
        return self.trainer.strategy.batch_to_device(batch)[0]

    def _aligned(self, states: list[State], reference: State) -> list[State]:
        """Every state permuted onto ``reference`` by weight matching (on a validation batch)."""
        x = self._example_input()
        architecture = copy.deepcopy(self.backbone)
        architecture.load_state_dict(reference)
        return [state if state is reference else align(architecture, state, x) for state in states]

    def merge(self) -> State:
        """Run the recipe (needs the trainer's validation split) and return the merged state."""
        states = self.ingredients
        if self.align or self.recipe == "align_then_average":
            states = self._aligned(states, states[0] if self.base_state is None else self.base_state)
        if self.recipe == "map":
            return self._map(states)
        if self.recipe == "greedy":
            self.trials = []
            trial = lambda i, score, kept: self.trials.append((i, score, kept))  # noqa: E731
            merged, self.kept, self.scores = greedy_soup(states, self.evaluate_state, self.metric == "val/acc", trial)
            return merged
        self.scores = [self.evaluate_state(s) for s in states]
        self.kept = list(range(len(states)))
        if self.recipe in ("uniform", "align_then_average"):
            return uniform_soup(states)
        if self.recipe == "model_stock":
            return model_stock(self.base_state, states)
        best: tuple[State, float] | None = None
        for s in self.scales:
            if self.recipe == "task_arithmetic":
                candidate = task_arithmetic(self.base_state, states, s)
            elif self.recipe == "ties":
                candidate = ties_merge(self.base_state, states, density=self.density, scale=s)
            elif self.recipe == "dare":
                candidate = dare(self.base_state, states, density=self.density, seed=self.seed, scale=s)
            else:
                candidate = breadcrumbs(self.base_state, states, density=self.density, gamma=self.gamma, scale=s)
            score = self.evaluate_state(candidate) if len(self.scales) > 1 else float("nan")
            self.scale_scores.append(score)
            if best is None or self._better(score, best[1]):  # ties keep the first (smaller) scale
                best, self.chosen_scale = (candidate, score), s
        return best[0]

    def _map(self, states: list[State]) -> State:
        tasks = len(val_loaders(self.trainer))
        if tasks != len(states):
            raise ValueError(
                f"recipe 'map' scores fine-tune k on validation dataloader k: `checkpoints` holds {len(states)} "
                f"fine-tunes but the datamodule has {tasks} validation dataloader(s)"
            )
        acc = self.metric == "val/acc"

        def evaluate(c: list[float]) -> list[float]:
            merged = task_arithmetic(self.base_state, states, c)
            return [self.evaluate_loss_and_accuracy(merged, k)[1 if acc else 0] for k in range(tasks)]

        self.map_result = result = map_pareto_front(evaluate, tasks, maximize=acc, seed=self.seed)
        mean = result.values.mean(1)
        self.map_choice = int(mean.argmax() if acc else mean.argmin())  # argmax/argmin: the first of ties
        chosen = result.coefficients[self.map_choice].tolist()
        self.map_scores = evaluate(chosen)
        # The surrogates can be far off (a quadratic is not bounded to an accuracy's range): when an
        # evaluated merge measured better on average than the predicted front's choice, load that one.
        measured = result.evaluated_values.mean(1)
        best = int(measured.argmax() if acc else measured.argmin())
        gain = float(measured[best]) - sum(self.map_scores) / tasks
        self.map_from_front = not (gain > 0 if acc else gain < 0)
        if not self.map_from_front:
            chosen, self.map_scores = result.evaluated[best].tolist(), result.evaluated_values[best].tolist()
        self.map_coefficients = chosen
        self.scores, self.kept = [], list(range(len(states)))
        merged = task_arithmetic(self.base_state, states, chosen)
        self.backbone.load_state_dict(merged)
        return merged

    def _log_map(self) -> None:
        result, name = self.map_result, self.metric.split("/")[-1]
        chosen = self.map_coefficients
        if self.logger is not None:
            for k, (c, score) in enumerate(zip(chosen, self.map_scores)):
                self.logger.log_metrics({"merge/map_coefficient": c, f"merge/map_{name}": score}, step=k)
        labels = [f"{self.metric} on dataloader {k}" for k in range(2)]
        title = f"MAP front: {result.evaluations} merges evaluated, {len(result.coefficients)} front points"
        if result.evaluated.shape[1] > 2:
            title += " (first two tasks)"
        log_figure(
            self.trainer,
            "merge/pareto",
            lambda: pareto_chart(result.evaluated_values, result.values, self.map_scores, title, labels),
        )

    @override
    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        if len(val_loaders(self.trainer)) == 1:
            return super().validation_step(batch, batch_idx)
        x, y = batch
        logits = self(x)  # several dataloaders: one weighted mean per dataloader (Lightning suffixes the names)
        self.log("val/loss", self.loss(logits, y), sync_dist=True, batch_size=len(y))
        self.log("val/acc", (logits.argmax(-1) == y).float().mean(), sync_dist=True, batch_size=len(y))

    @override
    def on_validation_start(self) -> None:
        if self._built:
            return
        write_charts(self.trainer)
        merged = self.merge()
        if self.map_result is not None:  # the mean over the tasks' dataloaders
            self.merged_score = sum(self.map_scores) / len(self.map_scores)
        else:
            self.merged_score = self.evaluate_state(merged)
        self._built = True
        name = self.metric.split("/")[-1]
        if self.logger is not None:
            for i, score in enumerate(self.scores):
                self.logger.log_metrics(
                    {f"merge/ingredient_{name}": score, "merge/kept": float(i in self.kept)}, step=i
                )
            if len(self.scales) > 1 and self.recipe in SCALED:
                for i, (s, score) in enumerate(zip(self.scales, self.scale_scores)):
                    self.logger.log_metrics({f"merge/scale_{name}": score, "merge/scale": s}, step=i)
            self.logger.log_metrics({f"merge/{name}": self.merged_score}, step=len(self.scores))
        if self.output_path:
            save_rank_zero({k: v.detach().cpu() for k, v in self.backbone.state_dict().items()}, self.output_path)
        self._log_interpolation(merged)
        if self.map_result is not None:
            self._log_map()
        if self.trials:
            names = short_names(self.checkpoints)
            log_greedy_figure(self.trainer, "merge/greedy", names, self.scores, self.trials, self.metric)

    def interpolation_path(self, points: int = PATH_POINTS) -> dict[str, dict[str, list[float]]]:
        """Validation loss and accuracy (every validation dataloader pooled) of ``(1 - t) w_0 + t w_1``
        between the first two ingredients at ``points`` evenly spaced ``t`` (``naive``), and to ``w_1``
        permuted onto ``w_0`` by weight matching (``aligned``, with ``align`` or ``align_then_average``):
        the loss barrier of linear mode connectivity. Floating-point buffers (BatchNorm statistics) are
        interpolated too. Cost: ``points`` evaluations of the validation split per path; all ranks take part."""
        first, second = self.ingredients[0], self.ingredients[1]
        ends = {"naive": second}
        if self.align or self.recipe == "align_then_average":
            ends["aligned"] = self._aligned([first, second], first)[1]
        out: dict[str, dict[str, list[float]]] = {}
        for name, end in ends.items():
            scores = [self.evaluate_loss_and_accuracy(_lerp(first, end, t)) for t in _grid(points)]
            out[name] = {"loss": [s[0] for s in scores], "accuracy": [s[1] for s in scores]}
        return out

    def _log_interpolation(self, merged: State) -> None:
        if len(self.ingredients) < 2 or not has_tensorboard(self.trainer):
            return
        path = self.interpolation_path()
        self.backbone.load_state_dict(merged)  # the evaluations loaded the path's states
        log_figure(
            self.trainer,
            "merge/interpolation",
            lambda: panels(_grid(PATH_POINTS), path, "between the first two ingredients", "t"),
        )


def _grid(points: int) -> list[float]:
    return [i / (points - 1) for i in range(points)]


def _lerp(a: State, b: State, t: float) -> State:
    return {k: torch.lerp(v, b[k].to(v.dtype), t) if v.is_floating_point() else v for k, v in a.items()}
