"""Machine unlearning: start from a trained model and make it forget part of its training data.

Method card. Given the original weights (``checkpoint``) and a ``ForgetRetain`` datamodule whose
batches carry a forget and a retain part, each step minimises one of (CE = the model's mean
negative log-likelihood: cross-entropy of the labels for ``objective="classification"``, the
token-level next-token NLL for ``objective="causal_lm"``):

- ``retrain``: CE(retain) from scratch (the gold standard; ``checkpoint`` must be None);
- ``finetune``: CE(retain) from the original weights;
- ``gradient_ascent``: -CE(forget);
- ``gradient_difference``: -CE(forget) + gamma CE(retain);
- ``random_label``: CE(forget with every label replaced by a random *other* class) + gamma CE(retain)
  (Golatkar et al. 2020; the unlearning step of SalUn, Fan et al. 2024, eq. 6 with alpha = gamma);
- ``npo``: -(2 / beta) mean log sigmoid(-beta (log p(y|x) - log p_orig(y|x))) on forget, against
  the frozen original model (Negative Preference Optimization, Zhang et al. 2024), alone: no retain
  term (``gamma`` is ignored, as by ``gradient_ascent``); for a causal LM, log p(y|x) is the
  log-likelihood of a whole sequence (the sum of its tokens' log-probabilities, as in the NPO
  paper), the mean is over sequences;
- ``npo_rt``: ``npo`` + gamma CE(retain) (the NPO paper's NPO-RT);
- ``simnpo``: -(2 / beta) mean log sigmoid(beta (-log p(y|x) / |y| - delta)) on forget + gamma
  CE(retain) (SimNPO, Fan et al. 2024: length-normalised, no reference model; |y| is the number of
  predicted tokens, 1 for a class label; delta is scaled by beta as in the authors' code, which the
  paper writes as a margin gamma = beta delta);
- ``rmu``: mean squared distance between the activations of the backbone's submodule ``layer`` on
  forget data and ``steering`` u, + gamma mean squared distance between that submodule's activations
  on retain data and those of the frozen original model (Representation Misdirection for
  Unlearning, Li et al. 2024); u is a fixed unit vector drawn uniformly from [0, 1)^d then
  normalised (as in the WMDP code), seeded by ``seed``; only the parameters of ``rmu_modules`` are
  trained, by default the MLPs of the steered block and of the two blocks before it (WMDP: three
  consecutive layers' MLPs, the activations read at the last of them); every other parameter is
  frozen (``requires_grad=False``);
- ``l1_sparse``: CE(retain) + alpha_t ||theta||_1 with alpha_t = alpha (1 - t / T) decaying
  linearly to 0 over the T optimizer steps of the run (Jia et al. 2023, "Model sparsity can
  simplify machine unlearning"); the L1 subgradient alpha_t sign(theta) is added to the gradients
  after backward, so it needs no full parameters under FSDP2.

Metrics (validation and test, logged as ``unlearn/{val,test}/…``, in percent): UA = 100 - forget
accuracy, RA = retain accuracy, TA = held-out accuracy (without forgotten classes for class
forgetting), ``forget_test_acc`` (class forgetting: held-out accuracy on the forgotten classes),
MIA = MIA-efficacy: a confidence-based membership-inference SVM (scikit-learn) fit on retain
(member) vs held-out (non-member) true-class confidences, applied to the forget set; the percentage
of forget samples it calls non-members (Jia et al. 2023). ``unlearn/run_time`` is the wall time of
``fit`` so far in seconds, without validation.

Language models (``objective="causal_lm"``; ``random_label`` does not apply): batches are token
ids ``[B, T]`` (a tensor, a tuple whose first element it is, or a mapping with ``input_ids``); the
backbone returns next-token logits ``[B, T, V]`` or an output with ``logits`` (a Hugging Face
``*ForCausalLM``). The metrics are ``forget_loss``, ``retain_loss``, ``test_loss`` (and
``forget_test_loss``): per-token NLL in nats over each whole set, and ``MIA``, the AUC (percent) of
membership inference by loss: the probability that a forget sequence has a lower per-token loss
than a held-out one (50 = chance, the ideal after unlearning; 100 = every forget sequence is
recognised as trained on; well below 50 = recognisable as *unlearned*).

DDP/FSDP2: per-sample confidences and correctness are all-gathered once per evaluation epoch
(Lightning's ``DistributedSampler`` pads each loader, so a few samples can count twice); the
scores are then computed identically on every rank. The reference model of ``npo``, ``npo_rt`` and
``rmu`` is a plain replicated copy on every rank (not sharded).

Example:
    >>> from lightning.pytorch import Trainer
    >>> from litplug.datamodules import Digits, ForgetRetain
    >>> from litplug.modules import MLP, Unlearner
    >>> model = Unlearner(MLP(input_shape=[1, 8, 8], num_outputs=10), "original.ckpt", "random_label")  # doctest: +SKIP
    >>> Trainer(max_epochs=2).fit(model, ForgetRetain(Digits(), "class", [3]))  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import math
import time
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from typing_extensions import override

from ..board import log_figure
from ..figures import histograms
from ..functional.unlearning import (
    l1_alpha,
    loss_mia_auc,
    mia_efficacy,
    npo_loss,
    random_other_labels,
    rmu_direction,
    rmu_loss,
    simnpo_loss,
)
from ..loading import load_weights
from ..plumbing import mix_seed
from ..validation import check_bool, check_choice, check_int, check_list, check_number, check_path, check_str
from .base import TrainingModule
from .language import labels_of, logits_of, sequence_log_likelihood, tokens_of

Method = Literal[
    "retrain",
    "finetune",
    "gradient_ascent",
    "gradient_difference",
    "random_label",
    "npo",
    "npo_rt",
    "simnpo",
    "rmu",
    "l1_sparse",
]
METHODS: tuple[str, ...] = Method.__args__  # type: ignore[attr-defined]
Objective = Literal["classification", "causal_lm"]


def _submodule(backbone: nn.Module, layer: str, argument: str = "layer") -> nn.Module:
    names = [name for name, _ in backbone.named_modules() if name]
    if layer not in names:
        raise ValueError(f"`{argument}` must name a submodule of the backbone, one of {names}, got {layer!r}")
    return backbone.get_submodule(layer)


def _mlp_of(block: nn.Module) -> list[str]:
    """The MLP of a transformer block as names of its submodules: ``mlp`` (Hugging Face GPT-2,
    Llama, ...) or ``linear1``/``linear2`` (``nn.TransformerEncoderLayer``/``DecoderLayer``); the
    whole block (``""``) where it has neither."""
    children = dict(block.named_children())
    if "mlp" in children:
        return ["mlp"]
    if "linear1" in children and "linear2" in children:
        return ["linear1", "linear2"]
    return [""]


def _rmu_default_modules(backbone: nn.Module, layer: str, num_layers: int = 3) -> list[str]:
    """The submodules RMU trains by default: the MLPs of the block holding ``layer`` and of the
    ``num_layers - 1`` blocks before it (fewer in a shallower network), as the WMDP code does (steered
    layer 7, layers 5, 6, 7 updated). ``layer`` is, or lies inside, the ``i``-th element of a
    numbered block list (``blocks.layers.1``, ``transformer.h.5``, ``model.layers.7``, or ``1`` in a
    ``Sequential``)."""
    parts = layer.split(".")
    index = max((k for k, part in enumerate(parts) if part.isdigit()), default=None)
    if index is None:
        raise ValueError(
            f"`layer`={layer!r} is not inside a numbered block list (e.g. 'transformer.h.5'): name the trained "
            "submodules with `rmu_modules`"
        )
    prefix, i = ".".join(parts[:index]), int(parts[index])
    container = backbone.get_submodule(prefix) if prefix else backbone
    names = []
    for j in range(max(0, i - num_layers + 1), i + 1):
        if not hasattr(container, str(j)):
            continue
        block = f"{prefix}.{j}" if prefix else str(j)
        names += [f"{block}.{m}" if m else block for m in _mlp_of(container.get_submodule(str(j)))]
    return names


class Unlearner(TrainingModule):
    """Make a trained model forget part of its training data.

    Unlearn the forget set of a ``ForgetRetain`` datamodule with one of ``METHODS`` (see the
    module docstring for the losses and metrics).

    Args:
        backbone: the network (same architecture as the original model).
        checkpoint: the original model's weights: a Lightning checkpoint of any module holding the
            backbone (its key prefix, e.g. ``backbone.`` or ``model.``, is found), a state dict,
            a safetensors file (tied weights stored once are fine) or a Hugging Face
            ``save_pretrained`` folder; read by :func:`litplug.loading.load_weights` without
            running code from the file. None only for ``retrain`` (which starts from scratch).
        method: one of ``retrain``, ``finetune``, ``gradient_ascent``, ``gradient_difference``,
            ``random_label``, ``npo``, ``npo_rt``, ``simnpo``, ``rmu``, ``l1_sparse``.
        num_classes: number of classes (>= 2; unused for a causal LM).
        gamma: weight of the retain loss for ``gradient_difference``, ``random_label``, ``npo_rt``,
            ``simnpo`` and ``rmu`` (>= 0).
        beta: NPO and SimNPO temperature (> 0).
        alpha: initial L1 weight of ``l1_sparse`` (>= 0).
        seed: seed of the random labels and of the MIA subsampling.
        optimizer: optimizer callable (default Adam, lr 1e-3).
        lr_scheduler: optional scheduler callable.
        objective: ``classification`` (batches ``(x, y)``, the backbone gives class logits) or
            ``causal_lm`` (batches of token ids, the backbone gives next-token logits; any
            causal LM, e.g. ``CausalTransformer`` or a Hugging Face ``GPT2LMHeadModel``).
        trust_checkpoint: read a ``checkpoint`` that names Python globals beyond tensors and plain
            values, which runs code from the file: only for a file from someone you trust.
        delta: SimNPO's margin (>= 0).
        layer: ``rmu``'s submodule of the backbone, as a path of ``named_modules()`` (e.g.
            ``blocks.1`` or ``transformer.h.1``); required for ``rmu``, refused otherwise. A module
            returning a tuple (a Hugging Face block) contributes its first element.
        steering: ``rmu``'s scale c of the random unit vector (> 0).
        rmu_modules: ``rmu``'s trained submodules of the backbone (paths of ``named_modules()``);
            every other parameter is frozen. None: the MLPs of the block holding ``layer`` and of
            the two blocks before it (the whole block where it has no ``mlp``), e.g. ``blocks.layers.0.linear1``,
            ``blocks.layers.0.linear2``, ``blocks.layers.1.linear1``, ``blocks.layers.1.linear2`` for
            ``layer="blocks.layers.1"`` in a ``CausalTransformer``, ``transformer.h.{3,4,5}.mlp`` for
            ``layer="transformer.h.5"`` in a GPT-2. Refused for other methods.
    """

    litplug_charts: ClassVar[dict[str, dict[str, list[str]]]] = {
        "unlearning": {
            "UA / RA / TA / MIA (validation)": ["^unlearn/val/(UA|RA|TA|MIA)$"],
            "losses on forget / retain / test (validation, language models)": ["^unlearn/val/.*_loss$"],
            "training loss": ["^unlearn/train_loss$"],
        },
    }

    def __init__(
        self,
        backbone: nn.Module,
        checkpoint: str | None = None,
        method: Method = "finetune",
        num_classes: int = 10,
        gamma: float = 1.0,
        beta: float = 0.1,
        alpha: float = 5e-4,
        seed: int = 0,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        objective: Objective = "classification",
        trust_checkpoint: bool = False,
        delta: float = 0.0,
        layer: str | None = None,
        steering: float = 20.0,
        rmu_modules: list[str] | None = None,
    ) -> None:
        check_path("checkpoint", checkpoint, allow_none=True)
        check_bool("trust_checkpoint", trust_checkpoint)
        check_choice("method", method, METHODS)
        check_choice("objective", objective, ("classification", "causal_lm"))
        if objective == "causal_lm" and method == "random_label":
            raise ValueError("`method`='random_label' needs class labels; with `objective`='causal_lm' use one of "
                             f"{[m for m in METHODS if m != 'random_label']}")  # fmt: skip
        check_int("num_classes", num_classes, low=2)
        check_number("gamma", gamma, low=0)
        check_number("beta", beta, low=0, low_open=True)
        check_number("alpha", alpha, low=0)
        check_int("seed", seed)
        check_number("delta", delta, low=0)
        check_str("layer", layer, allow_none=True)
        check_number("steering", steering, low=0, low_open=True)
        if rmu_modules is not None:
            check_list("rmu_modules", rmu_modules, check_str, nonempty=True)
        if (method == "rmu") != (layer is not None):
            raise ValueError(
                "`layer` is required by method='rmu' and used by no other method, got "
                f"method={method!r}, layer={layer!r}"
            )
        if rmu_modules is not None and method != "rmu":
            raise ValueError(f"`rmu_modules` is used by method='rmu' only, got method={method!r}")
        if layer is not None:
            _submodule(backbone, layer)
            if rmu_modules is None:
                rmu_modules = _rmu_default_modules(backbone, layer)
            trained = {id(p) for name in rmu_modules for p in _submodule(backbone, name, "rmu_modules").parameters()}
            if not trained:
                raise ValueError(f"`rmu_modules` {rmu_modules!r} hold no parameters to train")
            for p in backbone.parameters():
                if id(p) not in trained:
                    p.requires_grad_(False)
        if method == "retrain" and checkpoint is not None:
            raise ValueError(
                f"`checkpoint` must be None for method='retrain' (it trains from scratch), got {checkpoint!r}"
            )
        super().__init__(backbone, optimizer, lr_scheduler)
        if checkpoint is not None:
            try:
                load_weights(backbone, checkpoint, trust_checkpoint)
            except ValueError as err:
                raise ValueError(f"`checkpoint`: {err}") from err
        self.checkpoint = checkpoint
        self.trust_checkpoint = trust_checkpoint
        self.method = method
        self.objective = objective
        self.num_classes = num_classes
        self.gamma, self.beta, self.alpha, self.seed = gamma, beta, alpha, seed
        self.delta, self.layer, self.steering, self.rmu_modules = delta, layer, steering, rmu_modules
        # A list, not a submodule: the frozen reference stays out of parameters(), the optimizer,
        # FSDP2 sharding and the checkpoint (it is rebuilt from `checkpoint`).
        self._reference: list[nn.Module] = []
        if method in ("npo", "npo_rt", "rmu"):
            reference = copy.deepcopy(backbone).eval().requires_grad_(False)
            self._reference.append(reference)
        self._outputs: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._fit_start = 0.0
        self._eval_seconds = 0.0
        self._eval_start = 0.0

    # --- training -------------------------------------------------------------------------
    @override
    def forward(self, x: Any) -> torch.Tensor:
        return logits_of(self.backbone(x))

    def log_likelihood(self, batch: Any, model: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample log-likelihoods under ``model`` (default: the backbone) and the number of
        predictions in each: ``(log p(y|x), 1)`` per sample for classification, ``(sum of the
        token log-probabilities, T - 1)`` per sequence for a causal LM."""
        model = self.backbone if model is None else model
        if self.objective == "causal_lm":
            tokens = tokens_of(batch)
            return sequence_log_likelihood(logits_of(model(tokens)), tokens, labels_of(batch))
        x, y = batch
        logp = -F.cross_entropy(logits_of(model(x)), y, reduction="none")
        return logp, torch.ones_like(y)

    def batch_loss(self, batch: Any) -> torch.Tensor:
        """The model's mean NLL on one forget or retain batch as its loader yields it: the
        cross-entropy for classification, the token-level NLL (mean over predicted tokens) for a
        causal LM (:class:`litplug.protocols.HasBatchLoss`): the loss whose gradients
        ``UnlearningMask`` scores."""
        if self.objective == "classification":
            x, y = batch
            return F.cross_entropy(self(x), y)
        logp, count = self.log_likelihood(batch)
        return -logp.sum() / count.sum()

    def _ce(self, batch: Any) -> torch.Tensor:
        return self.batch_loss(batch)

    def unlearning_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """The loss of ``self.method`` on a ``{"forget": batch, "retain": batch}`` batch."""
        method = self.method
        if method in ("retrain", "finetune", "l1_sparse"):
            return self._ce(batch["retain"])
        if method == "gradient_ascent":
            return -self._ce(batch["forget"])
        if method == "gradient_difference":
            return -self._ce(batch["forget"]) + self.gamma * self._ce(batch["retain"])
        if method == "random_label":
            x, y = batch["forget"]
            gen = torch.Generator().manual_seed(mix_seed(self.seed, self.global_step * 101 + self.global_rank))
            forget = F.cross_entropy(self(x), random_other_labels(y, self.num_classes, gen))
            return forget + self.gamma * self._ce(batch["retain"]) if self.gamma > 0 else forget
        if method == "rmu":
            forget = self.activations(batch["forget"])
            target = self.steering * rmu_direction(forget.shape[-1], self.seed).to(forget)
            retain = self.activations(batch["retain"])
            with torch.no_grad():
                retain_ref = self.activations(batch["retain"], self._reference[0])
            return rmu_loss(forget, target, retain, retain_ref, self.gamma)
        if method == "simnpo":
            logp, count = self.log_likelihood(batch["forget"])
            loss = simnpo_loss(logp, count, self.beta, self.delta)
        else:  # npo, npo_rt: per-sample (per-sequence) log-likelihoods against the frozen original model
            logp, _ = self.log_likelihood(batch["forget"])
            with torch.no_grad():
                logp_ref, _ = self.log_likelihood(batch["forget"], self._reference[0])
            loss = npo_loss(logp, logp_ref, self.beta)
            if method == "npo":
                return loss
        return loss + self.gamma * self._ce(batch["retain"]) if self.gamma > 0 else loss

    def activations(self, batch: Any, model: nn.Module | None = None) -> torch.Tensor:
        """The output of ``model``'s (default: the backbone's) submodule ``self.layer`` on ``batch``."""
        model = self.backbone if model is None else model
        captured: list[torch.Tensor] = []

        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            captured.append(output[0] if isinstance(output, (tuple, list)) else output)

        handle = _submodule(model, self.layer).register_forward_hook(hook)
        try:
            model(tokens_of(batch) if self.objective == "causal_lm" else batch[0])
        finally:
            handle.remove()
        return captured[0]

    @override
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.unlearning_loss(batch)
        self.log("unlearn/train_loss", loss, prog_bar=True)
        return loss

    @override
    def on_after_backward(self) -> None:
        if self.method != "l1_sparse" or self.alpha == 0:
            return
        alpha_t = l1_alpha(self.alpha, self.global_step, self.trainer.estimated_stepping_batches)
        scale = alpha_t / self.trainer.accumulate_grad_batches  # the CE gradient is averaged the same way
        with torch.no_grad():
            for p in self.backbone.parameters():
                if p.grad is not None:
                    p.grad.add_(p.sign(), alpha=scale)
        self.log("unlearn/l1_alpha", alpha_t)

    @override
    def setup(self, stage: str) -> None:
        if stage == "fit":
            self._fit_start, self._eval_seconds = time.perf_counter(), 0.0

    @override
    def on_fit_start(self) -> None:
        super().on_fit_start()
        for reference in self._reference:
            reference.to(self.device)

    # --- evaluation -----------------------------------------------------------------------
    def _eval_names(self) -> list[str]:
        dm = self.trainer.datamodule
        if hasattr(dm, "loader_names"):
            return dm.loader_names("test" if self.trainer.testing else "validate")
        names = getattr(dm, "eval_names", None)
        if names is None:
            raise ValueError("Unlearner needs a ForgetRetain datamodule (validation/test loaders forget/retain/test)")
        return names

    def _evaluate(self, batch: Any, dataloader_idx: int) -> None:
        with torch.no_grad():
            if self.objective == "causal_lm":
                logp, count = self.log_likelihood(batch)
                stats = (logp.float(), count.float())
            else:
                x, y = batch
                logits = self(x).float()
                conf = logits.softmax(-1).gather(1, y.view(-1, 1)).squeeze(1)
                stats = (conf, (logits.argmax(-1) == y).float())
        name = self._eval_names()[dataloader_idx]
        self._outputs.setdefault(name, []).append(stats)

    @override
    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch, dataloader_idx)

    @override
    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch, dataloader_idx)

    def _gathered(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = self._outputs.get(name, [])
        first = torch.cat([a for a, _ in pairs]) if pairs else torch.zeros(0, device=self.device)
        second = torch.cat([b for _, b in pairs]) if pairs else torch.zeros(0, device=self.device)
        if self.trainer.world_size > 1:
            first, second = (self.all_gather(t).reshape(-1) for t in (first, second))
        return first, second

    def _report(self, stage: str) -> None:
        data = {name: self._gathered(name) for name in self._eval_names()}
        self._outputs = {}
        if stage == "val":  # the per-sample losses behind the MIA number, for the figure at fit end
            self.sample_losses = {n: self._sample_loss(*data[n]).cpu() for n in ("forget", "test") if n in data}
        empty = torch.zeros(0)  # no held-out data: TA and MIA are NaN
        if self.objective == "causal_lm":
            metrics = {
                f"{name}_loss": float(-logp.sum() / count.sum()) if len(count) else math.nan
                for name, (logp, count) in data.items()
            }
            seq_loss = {name: -logp / count.clamp_min(1) for name, (logp, count) in data.items()}
            metrics["MIA"] = loss_mia_auc(seq_loss["forget"], seq_loss.get("test", empty))
        else:
            acc = {
                name: 100.0 * correct.mean().item() if len(correct) else math.nan for name, (_, correct) in data.items()
            }
            metrics = {"UA": 100.0 - acc["forget"], "RA": acc["retain"], "TA": acc.get("test", math.nan)}
            if "forget_test" in acc:
                metrics["forget_test_acc"] = acc["forget_test"]
            metrics["MIA"] = mia_efficacy(
                data["retain"][0], data.get("test", (empty, empty))[0], data["forget"][0], self.seed
            )
        for key, value in metrics.items():
            self.log(f"unlearn/{stage}/{key}", value, sync_dist=True)  # identical on every rank already
        if stage == "val" and self._fit_start:
            self.log("unlearn/run_time", time.perf_counter() - self._fit_start - self._eval_seconds, sync_dist=True)

    @override
    def on_validation_epoch_start(self) -> None:
        self._outputs, self._eval_start = {}, time.perf_counter()

    @override
    def on_validation_epoch_end(self) -> None:
        self._eval_seconds += time.perf_counter() - self._eval_start
        if not self.trainer.sanity_checking:
            self._report("val")
        self._outputs = {}

    def _sample_loss(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        """Per-sample loss: ``-log p(y | x)`` (classification), mean token NLL (language models)."""
        if self.objective == "causal_lm":
            return -first / second.clamp_min(1)
        return -first.clamp_min(1e-12).log()

    @override
    def on_fit_end(self) -> None:
        losses = getattr(self, "sample_losses", None)
        if losses:
            log_figure(
                self.trainer,
                "unlearn/sample_loss",
                lambda: histograms(losses, "per-sample loss at the last validation (MIA)", "loss"),
            )

    @override
    def on_test_epoch_start(self) -> None:
        self._outputs = {}

    @override
    def on_test_epoch_end(self) -> None:
        self._report("test")

    @override
    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        return self(tokens_of(batch) if self.objective == "causal_lm" else batch[0]).argmax(dim=-1)
