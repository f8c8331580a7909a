"""Model soups: average the weights of several fine-tuned models (Wortsman et al. 2022, "Model
soups: averaging weights of multiple fine-tuned models improves accuracy without increasing
inference time").

Method card
    * uniform soup: the mean of all ingredients' weights.
    * greedy soup: sort the ingredients by their held-out metric, start from the best, and add
      the next one only if the soup of the kept ones plus it *strictly* improves the held-out
      metric. Never worse than the best ingredient on the held-out split.
    * Ingredients share one architecture and, to land in one basin, one starting point
      (fine-tunes of the same pre-trained / same seeded model with different hyperparameters).
    * Cost: one evaluation per ingredient, plus one per candidate (greedy); inference cost of
      the soup = one model.

The recipes are :func:`litplug.functional.uniform_soup` and :func:`litplug.functional.greedy_soup`;
:class:`ModelSoup` loads the ingredients (:func:`load_ingredient`) and runs a recipe on the
validation split under ``litplug validate``.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from typing_extensions import override

from ..board import log_figure, write_charts
from ..figures import greedy_chart
from ..functional.soup import greedy_soup, uniform_soup
from ..loading import find_prefix, load_file
from ..merging.states import State, check_states
from ..plumbing import save_rank_zero, training_mode
from ..validation import check_choice, check_list, check_path
from .classifier import Classifier

Metric = Literal["val/acc", "val/loss"]


# ----------------------------------------------------------------------------- functional core
def load_ingredient(path: str, prefix: str = "backbone.", expected: list[str] | None = None) -> State:
    """The backbone weights in ``path``: a Lightning checkpoint (``state_dict`` keys under
    ``prefix`` are kept, the prefix removed) or a plain state dict (e.g. ``EMA``'s export). With
    ``expected`` (the backbone's parameter names), a checkpoint of any module holding the backbone
    works too: the prefix that makes every expected name a key is found
    (:func:`litplug.loading.find_prefix`)."""
    obj = load_file(path)
    lightning = isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict)
    if lightning:
        state = {k[len(prefix) :]: v for k, v in obj["state_dict"].items() if k.startswith(prefix)}
        if state:
            return state
        found = obj["state_dict"]
    elif isinstance(obj, dict) and obj and all(isinstance(v, Tensor) for v in obj.values()):
        found = obj
    else:
        raise ValueError(f"{path} is neither a Lightning checkpoint nor a plain state dict of tensors")
    found_prefix = find_prefix(expected, found) if expected else None
    if found_prefix:  # "" (the names as they are) keeps every key, so extra ones are reported
        return {k: found[found_prefix + k] for k in expected}
    if found_prefix == "":
        return dict(found)
    if lightning:
        raise ValueError(f"checkpoint {path} has no weights under {prefix!r} in its `state_dict`")
    return dict(found)


def short_names(paths: list[str]) -> list[str]:
    """The parts of ``paths`` that tell them apart (``runs/soup/lr_1e-3/checkpoints/last.ckpt``
    -> ``lr_1e-3``), for labels; the index where two paths are the same."""
    parts = [Path(p).with_suffix("").parts for p in paths]
    width = min(len(p) for p in parts)
    differ = [i for i in range(width) if len({p[i] for p in parts}) > 1]
    if len({len(p) for p in parts}) > 1 or not differ:
        names = [str(Path(p).with_suffix("")) for p in paths]
    else:
        names = ["/".join(p[differ[0] : differ[-1] + 1]) for p in parts]
    return [n if names.count(n) == 1 else f"{i}: {n}" for i, n in enumerate(names)]


def log_greedy_figure(
    trainer: Any, tag: str, names: list[str], scores: list[float], trials: list[tuple[int, float, bool]], metric: str
) -> None:
    """Log the greedy soup's trials (``greedy_soup``'s ``on_trial`` calls) as a figure under ``tag``
    (:func:`litplug.figures.greedy_chart`; rank zero, with a TensorBoard logger)."""
    accepted = sum(k for *_, k in trials)
    rows = [(names[i], scores[i], soup, kept) for i, soup, kept in trials]
    title = f"greedy soup: {accepted} of {len(trials)} ingredients kept"
    log_figure(trainer, tag, lambda: greedy_chart(rows, title, f"held-out {metric}"))


def val_loaders(trainer: Any) -> list[Any]:
    """The Trainer's validation dataloaders as a list (a dict's in its order)."""
    loaders = trainer.val_dataloaders
    if isinstance(loaders, dict):
        return list(loaders.values())
    return list(loaders) if isinstance(loaders, (list, tuple)) else [loaders]


# ----------------------------------------------------------------------------- module
class ModelSoup(Classifier):
    """A classifier whose weights are a soup of fine-tuned checkpoints.

    A classifier whose weights are a soup of fine-tuned checkpoints, built on the validation
    split when validation starts (``litplug validate --config configs/digits/soup.yaml``).

    Logs to the logger ``soup/ingredient_<metric>`` (step = ingredient index, in the order of
    ``checkpoints``), ``soup/kept`` (1 if the ingredient is in the soup) and ``soup/<metric>``;
    the validation epoch then logs ``val/acc`` and ``val/loss`` of the soup as usual. The greedy
    recipe logs the figure ``soup/greedy`` (every ingredient's score in the order tried and the
    soup's score as it grows; rank zero, with a TensorBoard logger) and the custom-scalars section
    ``averaging``. The soup's backbone weights are written to ``output_path`` (a plain state dict).

    Distributed: single process or DDP (the held-out counts are summed over ranks with one
    all-reduce per evaluation). FSDP2 is not supported (raises at setup).

    Args:
        backbone: the architecture of the ingredients (its own weights are replaced).
        checkpoints: ingredient files: Lightning ``.ckpt`` (``backbone.*`` keys) or plain
            backbone state dicts (e.g. ``EMA(export_path=...)``).
        recipe: ``"greedy"`` or ``"uniform"``.
        metric: held-out metric used by the greedy recipe and logged: ``"val/acc"`` (maximised)
            or ``"val/loss"`` (minimised).
        num_classes: number of classes.
        output_path: where to write the soup's backbone state dict (``None``: do not write).

    Example:
        >>> soup = ModelSoup(MLP(), ["a.ckpt", "b.ckpt"], recipe="greedy")  # doctest: +SKIP
        >>> Trainer().validate(soup, Digits())  # doctest: +SKIP
    """

    litplug_charts: ClassVar[dict[str, dict[str, list[str]]]] = {
        "averaging": {
            "model soup: each ingredient's held-out metric, kept or not, and the soup's": [
                "^soup/ingredient_",
                "^soup/kept$",
                "^soup/(acc|loss)$",
            ],
        },
    }

    def __init__(
        self,
        backbone: nn.Module,
        checkpoints: list[str],
        recipe: Literal["greedy", "uniform"] = "greedy",
        metric: Metric = "val/acc",
        num_classes: int = 10,
        output_path: str | None = "runs/soup.pt",
    ) -> None:
        check_list("checkpoints", checkpoints, check_path, nonempty=True)
        check_choice("recipe", recipe, ("greedy", "uniform"))
        check_choice("metric", metric, ("val/acc", "val/loss"))
        check_path("output_path", output_path, allow_none=True)
        super().__init__(backbone, num_classes)
        reference = {k: v for k, v in backbone.state_dict().items()}
        self.ingredients = []
        for path in checkpoints:
            state = load_ingredient(path, expected=list(reference))
            check_states([reference, state], labels=["the backbone", f"checkpoint {path}"])
            self.ingredients.append(state)
        self.checkpoints = list(checkpoints)
        self.recipe = recipe
        self.metric = metric
        self.output_path = output_path
        self.kept: list[int] = []
        self.scores: list[float] = []
        self.trials: list[tuple[int, float, bool]] = []
        self.soup_score: float | None = None
        self._built = False

    @override
    def configure_model(self) -> None:
        if self.device_mesh is not None:
            raise ValueError("ModelSoup does not support ModelParallelStrategy (FSDP2); use a single device or DDP")

    @torch.no_grad()
    def evaluate_state(self, state: State) -> float:
        """Load ``state`` into the backbone and return ``metric`` on the validation split."""
        loss, acc = self.evaluate_loss_and_accuracy(state)
        return acc if self.metric == "val/acc" else loss

    @torch.no_grad()
    def evaluate_loss_and_accuracy(self, state: State, dataloader_idx: int | None = None) -> tuple[float, float]:
        """Load ``state`` into the backbone; mean cross-entropy and accuracy on validation dataloader
        ``dataloader_idx``, or on every validation dataloader pooled (``None``)."""
        self.backbone.load_state_dict(state)
        totals = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss sum, correct, count
        loaders = val_loaders(self.trainer)
        batches = loaders[dataloader_idx] if dataloader_idx is not None else itertools.chain(*loaders)
        with training_mode(self, False):
            for batch in batches:
                x, y = self.trainer.strategy.batch_to_device(batch)
                logits = self(x)
                totals[0] += F.cross_entropy(logits, y, reduction="sum").double()
                totals[1] += (logits.argmax(-1) == y).sum()
                totals[2] += len(y)
        totals = self.trainer.strategy.reduce(totals, reduce_op="sum")
        return float(totals[0] / totals[2]), float(totals[1] / totals[2])

    @override
    def on_validation_start(self) -> None:
        if self._built:
            return
        write_charts(self.trainer)
        maximize = self.metric == "val/acc"
        if self.recipe == "greedy":
            trial = lambda i, score, kept: self.trials.append((i, score, kept))  # noqa: E731
            soup, self.kept, self.scores = greedy_soup(self.ingredients, self.evaluate_state, maximize, trial)
        else:
            self.scores = [self.evaluate_state(s) for s in self.ingredients]
            soup, self.kept = uniform_soup(self.ingredients), list(range(len(self.ingredients)))
        self.soup_score = self.evaluate_state(soup)
        self._built = True
        name = self.metric.split("/")[-1]
        if self.logger is not None:
            for i, score in enumerate(self.scores):
                self.logger.log_metrics({f"soup/ingredient_{name}": score, "soup/kept": float(i in self.kept)}, step=i)
            self.logger.log_metrics({f"soup/{name}": self.soup_score}, step=len(self.scores))
        if self.output_path:
            save_rank_zero({k: v.detach().cpu() for k, v in self.backbone.state_dict().items()}, self.output_path)
        if self.trials:
            names = short_names(self.checkpoints)
            log_greedy_figure(self.trainer, "soup/greedy", names, self.scores, self.trials, self.metric)
