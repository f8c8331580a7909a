"""Data pruning from scores taken early in training (Paul et al. 2021, "Deep Learning on a Data
Diet"; forgetting events: Toneva et al. 2019).

Example:
    >>> from lightning.pytorch import Trainer
    >>> from litplug.callbacks import DataPruning
    >>> from litplug.datamodules import Digits, Indexed
    >>> from litplug.modules import MLP, Classifier
    >>> model = Classifier(MLP(input_shape=[1, 8, 8], num_outputs=10), num_classes=10)
    >>> pruning = DataPruning(score="el2n", keep=0.5, score_epoch=1)
    >>> trainer = Trainer(max_epochs=4, callbacks=[pruning], logger=False, enable_progress_bar=False)
    >>> trainer.fit(model, Indexed(Digits()))  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor, nn
from torch.optim import Optimizer
from typing_extensions import override

from ..functional import el2n_scores, forgetting_events, forgetting_scores, grand_scores
from ..plumbing import is_sharded, mix_seed, refuse_flat_strategies, training_mode, warn
from ..plumbing.loss import module_loss, require_loss
from ..plumbing.third_party_private import module_copy
from ..validation import check_choice, check_int, check_number
from .per_example import LogitsCapture, check_classifier, indexed_data, to_module

Score = Literal["el2n", "grand", "forgetting"]


class DataPruning(Callback):
    """Prune the training set to its most useful samples by a per-sample score.

    Score every training sample at the end of epoch ``score_epoch``, then train on a ``keep``
    fraction of them from the next epoch on.

    Scores (higher is harder; :mod:`litplug.functional.pruning`):

    - ``"el2n"``: ``||softmax(f(x)) - onehot(y)||_2``, one forward over the training set;
    - ``"grand"``: the norm of the per-sample loss gradient (cross-entropy of the logits) over
      every trainable parameter, one forward and one backward over the training set (closed form
      for linear, convolution and BatchNorm layers, ``torch.func`` per-sample gradients
      otherwise; ``grand_scores``);
    - ``"forgetting"``: the number of forgetting events (correct at a presentation, wrong at the
      next) counted from the logits of the module's own training forward in epochs
      ``0..score_epoch``; samples never classified correctly score ``inf``.

    EL2N and GraNd run the module in eval mode on every training sample in index order (under DDP
    each rank scores its share and one ``all_gather`` joins them). The samples are ranked hardest
    first (ties by index) and ranks ``[offset N, (offset + keep) N)`` are kept: ``offset=0`` keeps
    the hardest (the paper's choice), ``offset=1-keep`` the easiest, values between a middle band
    (the paper's ablation that drops the very hardest, often mislabelled, samples).

    Pruning replaces the training sampler: the datamodule (wrapped in
    ``litplug.datamodules.Indexed``) serves a ``KeptShuffle`` (litplug's datamodules: resumable
    mid-epoch, sharded by rank) or a ``KeptSampler`` (other samplers; sharded by Lightning's
    ``DistributedSamplerWrapper`` under DDP) over the kept indices, which Lightning reloads at the
    first pruned epoch; the ranks together see exactly the kept set (padded like a
    ``DistributedSampler``). An epoch takes ``keep`` of the batches.

    The module must be classifier-like: training batches ``(inputs, targets)`` and
    ``forward(inputs)`` returning logits (checked on one sample before the first step). Logged
    once, at scoring: ``pruning/kept_fraction``, ``pruning/kept_fraction/class_<c>`` and the score
    histogram ``pruning/scores`` (TensorBoard). The kept set, the scores and the forgetting counts
    are in ``state_dict`` (a resumed run prunes the same samples). Memory: one float64 score per
    sample; forgetting adds 6 bytes per sample. ``seeds > 1`` costs ``seeds - 1`` copies of the
    module and ``(seeds - 1)(score_epoch + 1)`` training epochs at scoring (split over the ranks).
    Under FSDP2 the scoring passes and the copies run on a replica holding the full parameters
    (one all-gather per parameter at scoring; the full model on every rank while scoring).

    Args:
        score: ``"el2n"``, ``"grand"`` or ``"forgetting"``.
        keep: fraction of the training set kept, in (0, 1].
        score_epoch: the epoch (0-based) at whose end the samples are scored; pruned training
            starts at the next epoch (a warning at fit start when ``max_epochs`` leaves no epoch
            after it).
        offset: fraction of the hardest samples skipped before the kept band, in [0, 1 - keep].
        batch_size: batch size of the scoring passes (None: the training loader's).
        seeds: number of initialisations whose scores are averaged (the paper averages over a
            few): the run itself and ``seeds - 1`` copies of the module, each re-initialised
            (``reset_parameters`` of every submodule, under seed ``mix_seed(Indexed.seed, k)``)
            and trained ``score_epoch + 1`` epochs with the module's own loss and the first
            optimizer of its ``configure_optimizers`` (no scheduler) on the whole training set
            (a seeded shuffle per epoch, the global batch), then scored. Under DDP rank ``r``
            trains the copies ``k`` with ``k % world == r`` and one ``all_reduce`` sums them.
    """

    litplug_charts: ClassVar[dict[str, dict[str, list[str]]]] = {
        "data": {"kept fraction (all, per class)": ["^pruning/kept_fraction"]},
    }

    def __init__(
        self,
        score: Score = "el2n",
        keep: float = 0.5,
        score_epoch: int = 1,
        offset: float = 0.0,
        batch_size: int | None = None,
        seeds: int = 1,
    ) -> None:
        super().__init__()
        self.score = check_choice("score", score, ("el2n", "grand", "forgetting"))
        self.keep_fraction = check_number("keep", keep, 0, 1, low_open=True)
        self.score_epoch = check_int("score_epoch", score_epoch, low=0)
        self.offset = check_number("offset", offset, 0, 1 - self.keep_fraction)
        self.batch_size = check_int("batch_size", batch_size, low=1, allow_none=True)
        self.seeds = check_int("seeds", seeds, low=1)
        self._num_classes = 0
        self.kept: Tensor | None = None
        self.scores: Tensor | None = None
        self.last_correct: Tensor | None = None  # int8: 1 correct, 0 wrong, -1 not presented yet
        self.forgotten: Tensor | None = None  # int32 forgetting events
        self._epoch_correct: Tensor | None = None  # int8 correctness of this epoch's presentations so far
        self._capture: LogitsCapture | None = None
        self._dm: Any = None
        self._closed_epoch = -1
        self._reload: int | None = None

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        refuse_flat_strategies(trainer, "DataPruning")
        self._dm = indexed_data(trainer, "DataPruning")
        if self.seeds > 1:
            require_loss(pl_module, f"DataPruning(seeds={self.seeds})")

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._dm.keep(self.kept)  # a resumed run's first training loader is already pruned
        last = trainer.max_epochs - 1 if trainer.max_epochs is not None and trainer.max_epochs >= 0 else None
        if self.kept is None and last is not None and self.score_epoch >= last:
            when = "never scores" if self.score_epoch > last else "scores after the last epoch"
            warn(
                f"DataPruning(score_epoch={self.score_epoch}) with max_epochs={trainer.max_epochs} {when}: no epoch "
                "trains on the kept set (scoring ends epoch score_epoch, 0-based; pruned training starts at the next). "
                f"Set score_epoch below max_epochs - 1 = {last}"
            )

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        num_classes = check_classifier(trainer, pl_module, self._dm, f"DataPruning(score={self.score!r})")
        self._num_classes = num_classes
        n = self._dm.num_examples
        if self.score == "forgetting" and self.kept is None:
            if self.last_correct is None or len(self.last_correct) != n:
                self.last_correct = torch.full((n,), -1, dtype=torch.int8)
                self.forgotten = torch.zeros(n, dtype=torch.int32)
            self._capture = LogitsCapture(pl_module, num_classes)

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._reload is not None:  # the pruned loader is built: the user's reload setting back
            trainer.reload_dataloaders_every_n_epochs, self._reload = self._reload, None
        if self._capture is not None:  # not called when a run resumes mid-epoch: the state has the epoch so far
            self._epoch_correct = torch.full_like(self.last_correct, -1)

    def _counting(self, trainer: Trainer) -> bool:
        return self._capture is not None and self.kept is None and trainer.current_epoch <= self.score_epoch

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self._counting(trainer):
            self._capture.open(len(self._dm.batch_index))

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._counting(trainer):
            logits = self._capture.logits
            if logits is None:
                raise ValueError(
                    "DataPruning(score='forgetting') reads the logits of the module's training forward, but "
                    f"{type(pl_module).__name__}.training_step did not call the module (self(inputs)) on the batch"
                )
            correct = (logits.detach().argmax(-1) == batch[1]).to(torch.int8).cpu()
            self._epoch_correct[self._dm.batch_index] = correct
            self._capture.close()
        if batch_idx + 1 >= trainer.num_training_batches:
            self._end_of_epoch(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._end_of_epoch(trainer, pl_module)  # an epoch that ended before its last batch

    def _end_of_epoch(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Runs after the last training batch (before validation, so an epoch-end checkpoint holds
        the kept set), once per epoch."""
        if self._closed_epoch == trainer.current_epoch:
            return
        self._closed_epoch = trainer.current_epoch
        if self._counting(trainer):
            seen = self._epoch_correct.int()
            if trainer.world_size > 1:  # each sample is presented on one rank (max: padding duplicates)
                seen = trainer.strategy.reduce(seen, reduce_op="max")
            events = forgetting_events(self.last_correct, seen == 1) & (seen >= 0)
            self.forgotten += events.int()
            self.last_correct = torch.where(seen >= 0, seen, self.last_correct.int()).to(torch.int8)
        if self.kept is None and trainer.current_epoch >= self.score_epoch:
            self._prune(trainer, pl_module)

    def _prune(self, trainer: Trainer, pl_module: LightningModule) -> None:
        n = self._dm.num_examples
        if self.score == "forgetting":
            scores = forgetting_scores(self.forgotten, (self.last_correct == 1) | (self.forgotten > 0))
            self._capture.remove()
            self._capture = None
        # FSDP2: score (and copy) a replica holding the full parameters, no collective inside
        model = pl_module
        if (self.score != "forgetting" or self.seeds > 1) and any(is_sharded(p) for p in pl_module.parameters()):
            model = _full_replica(pl_module)
        if self.score != "forgetting":
            scores = self._model_scores(trainer, model, n)
        if self.seeds > 1:
            scores = (scores + self._copies_scores(trainer, model, n)) / self.seeds
        order = torch.sort(-scores, stable=True).indices
        start, count = round(self.offset * n), max(1, round(self.keep_fraction * n))
        self.scores, self.kept = scores, order[start : start + count].sort().values
        self._dm.keep(self.kept)
        self._reload = trainer.reload_dataloaders_every_n_epochs
        trainer.reload_dataloaders_every_n_epochs = 1  # public: rebuild the training loader next epoch
        self._log(trainer, pl_module)

    def _model_scores(self, trainer: Trainer, pl_module: LightningModule, n: int) -> Tensor:
        world, rank = trainer.world_size, trainer.global_rank
        per_rank = -(-n // world)
        shard = [(rank + world * j) % n for j in range(per_rank)]  # padded to equal shares, like DistributedSampler
        batch_size = self.batch_size or getattr(trainer.train_dataloader, "batch_size", None) or 64
        loader = (to_module(trainer, pl_module, b) for b in self._dm.subset_loader(shard, batch_size))
        with training_mode(pl_module, False), trainer.precision_plugin.forward_context():
            if self.score == "el2n":
                local = el2n_scores(pl_module, loader)
            else:
                with torch.enable_grad():
                    local = grand_scores(pl_module, loader)
        if world == 1:
            return local.cpu()
        gathered = trainer.strategy.all_gather(local).cpu()  # [world, per_rank]
        scores = torch.empty(n, dtype=torch.float64)
        for r in range(world):
            scores[[(r + world * j) % n for j in range(per_rank)]] = gathered[r].double()
        return scores

    def _copies_scores(self, trainer: Trainer, pl_module: LightningModule, n: int) -> Tensor:
        """The sum of the scores of copies ``1 .. seeds - 1``: rank ``r`` trains and scores the copies
        ``k`` with ``k % world == r`` and one ``all_reduce`` adds them up (the same sum on every rank)."""
        world, rank = trainer.world_size, trainer.global_rank
        total = torch.zeros(n, dtype=torch.float64)
        for k in range(1, self.seeds):
            if k % world == rank:
                total += self._copy_scores(trainer, pl_module, k, n).cpu()
        if world > 1:
            total = trainer.strategy.reduce(total.to(pl_module.device), reduce_op="sum").cpu()
        return total

    def _copy_scores(self, trainer: Trainer, pl_module: LightningModule, k: int, n: int) -> Tensor:
        """Copy ``k``: the module re-initialised from seed ``mix_seed(Indexed.seed, k)``
        (``reset_parameters`` of every submodule), trained ``score_epoch + 1`` epochs with its own
        loss and first optimizer on the whole training set (a shuffle per epoch, the global batch),
        then scored (all samples)."""
        seed = mix_seed(getattr(self._dm, "seed", 0), k)
        batch_size = (getattr(trainer.train_dataloader, "batch_size", None) or 64) * trainer.world_size
        with torch.random.fork_rng(devices=[]), torch.enable_grad():
            torch.manual_seed(seed)
            copy = _fresh_copy(pl_module)
            try:
                optimizer = _first_optimizer(copy.configure_optimizers())
            except Exception as err:  # noqa: BLE001  the module's own error, said in our terms
                raise ValueError(
                    f"DataPruning(seeds={self.seeds}) trains re-initialised copies of {type(pl_module).__name__} with "
                    f"the first optimizer of its configure_optimizers(), which raised {type(err).__name__}: {err}"
                ) from err
            capture = LogitsCapture(copy, self._num_classes) if self.score == "forgetting" else None
            last = torch.full((n,), -1, dtype=torch.int8)
            forgotten = torch.zeros(n, dtype=torch.int32)
            copy.train()
            for epoch in range(self.score_epoch + 1):
                order = torch.randperm(n, generator=torch.Generator().manual_seed(mix_seed(seed, epoch)))
                for i, batch in enumerate(self._dm.subset_loader(order.tolist(), batch_size)):
                    index = order[i * batch_size : (i + 1) * batch_size]
                    batch = to_module(trainer, copy, batch)
                    if capture is not None:
                        capture.open(len(index))
                    with trainer.precision_plugin.forward_context():
                        loss = module_loss(copy, batch, i)
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    if capture is not None:
                        if capture.logits is None:
                            raise ValueError(
                                f"DataPruning(score='forgetting', seeds={self.seeds}) reads the logits of the copies' "
                                f"training forward, but {type(copy).__name__}'s loss did not call the module"
                            )
                        correct = (capture.logits.detach().argmax(-1) == batch[1]).cpu()
                        capture.close()
                        forgotten[index] += forgetting_events(last[index], correct).int()
                        last[index] = correct.to(torch.int8)
            if capture is not None:
                capture.remove()
                return forgetting_scores(forgotten, (last == 1) | (forgotten > 0))
            loader = (to_module(trainer, copy, b) for b in self._dm.subset_loader(range(n), batch_size))
            copy.eval()
            with trainer.precision_plugin.forward_context():
                if self.score == "el2n":
                    with torch.no_grad():
                        return el2n_scores(copy, loader)
                return grand_scores(copy, loader)

    def _log(self, trainer: Trainer, pl_module: LightningModule) -> None:
        from lightning.pytorch.loggers import TensorBoardLogger

        n = self._dm.num_examples
        metrics = {"pruning/kept_fraction": len(self.kept) / n}
        try:
            labels = self._dm.labels()
        except ValueError:
            labels = None
        if labels is not None:
            total = torch.bincount(labels, minlength=int(labels.max()) + 1)
            kept = torch.bincount(labels[self.kept], minlength=len(total))
            for c in range(len(total)):
                if total[c] > 0:
                    metrics[f"pruning/kept_fraction/class_{c}"] = float(kept[c]) / float(total[c])
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
            if isinstance(logger, TensorBoardLogger) and trainer.is_global_zero:
                finite = self.scores[torch.isfinite(self.scores)]
                if len(finite):
                    logger.experiment.add_histogram("pruning/scores", finite, trainer.global_step)

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._reload is not None:
            trainer.reload_dataloaders_every_n_epochs, self._reload = self._reload, None
        if self._capture is not None:
            self._capture.remove()
            self._capture = None

    @override
    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        # Runs on every rank; rank zero writes. Mid-epoch under DDP each rank has the presentations
        # of its own samples: the checkpoint holds all of them (max, as the epoch end joins them).
        state = checkpoint.get("callbacks", {}).get(self.state_key)
        if state is not None and trainer.world_size > 1 and self._counting(trainer):
            state["epoch_correct"] = trainer.strategy.reduce(self._epoch_correct.int(), reduce_op="max").to(torch.int8)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "kept": self.kept,
            "scores": self.scores,
            "last_correct": self.last_correct,
            "forgotten": self.forgotten,
            "epoch_correct": self._epoch_correct,
            "closed_epoch": self._closed_epoch,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.kept = state_dict["kept"]
        self.scores = state_dict["scores"]
        self.last_correct = state_dict["last_correct"]
        self.forgotten = state_dict["forgotten"]
        self._epoch_correct = state_dict["epoch_correct"]
        self._closed_epoch = state_dict["closed_epoch"]


def _fresh_copy(module: LightningModule) -> LightningModule:
    """A copy of ``module`` (its own tensors, no hooks) whose submodules' ``reset_parameters`` ran
    under the current RNG state."""
    copy = module_copy(module)
    for m in copy.modules():
        reset = getattr(m, "reset_parameters", None)
        if isinstance(m, nn.Module) and callable(reset):
            reset()
    return copy


def _first_optimizer(config: Any) -> Optimizer:
    """The first optimizer of what ``configure_optimizers`` returned (an optimizer, a list or tuple,
    a dict with ``"optimizer"``, or ``(optimizers, schedulers)``)."""
    if isinstance(config, Optimizer):
        return config
    if isinstance(config, dict) and "optimizer" in config:
        return _first_optimizer(config["optimizer"])
    if isinstance(config, (list, tuple)) and config:
        return _first_optimizer(config[0])
    raise TypeError(f"configure_optimizers() returned no optimizer: {config!r}")


def _full_replica(module: LightningModule) -> LightningModule:
    """A copy of an FSDP2 module whose parameters are the full tensors (one all-gather each, every
    rank in the same order) and which runs without collectives."""
    full = {id(p): nn.Parameter(p.full_tensor().detach(), requires_grad=p.requires_grad) for p in module.parameters()}
    return module_copy(module, full)
