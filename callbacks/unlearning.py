"""Weight masks for machine unlearning: only a scored top fraction of the weights may change.

Method card. At the start of training, every entry of the parameters in ``scope`` gets a score:

- ``saliency``: |g_f|, the gradient of the forget loss at the original weights (SalUn, Fan et al.
  2024, "SalUn: Empowering machine unlearning via gradient-based weight saliency");
- ``attribution``: |(theta - g_r / mu) * g_f| with g_r the retain-loss gradient (WAGLE, Jia et al.
  2024, "WAGLE: Strategic weight attribution for effective and modular unlearning");
- ``magnitude``: |theta| (the prune-first-then-unlearn view of Jia et al. 2023);
- ``random``: seeded uniform scores (a control).

The forget (retain) loss is the module's own: :func:`litplug.plumbing.loss.module_loss` on each batch
of the datamodule's ``forget_dataloader()`` (``retain_dataloader()``), in eval mode, weighted by
the batch's share of the samples, so ``g_f`` is the gradient of the mean loss over the whole set.

Exactly ``k = int(N * ratio)`` entries (N = entries in scope) with the highest scores stay
updatable; ties are broken by the lower global index (parameters in ``named_parameters`` order,
then row-major position in the full parameter). A NaN or inf score (from a non-finite forget or
retain loss, or weight) raises a ``ValueError`` naming the parameters at fit start, rather than
ranking on it (the functional ``topk_masks`` counts NaN as 0). The rest is frozen:

1. ``on_before_optimizer_step`` zeroes the gradient at frozen entries, before Lightning clips
   gradients: clipping measures the masked gradient (with a GradScaler, also after every
   backward, before the scaler looks for inf/NaN). Masking multiplies the gradient's *bits*,
   seen as integers, by 0/1 bytes unpacked from the bit mask (a lookup per byte of the mask, in
   blocks of ``CPU_BLOCK`` entries of :mod:`litplug.functional.masks` on CPU, whose temporaries
   stay in cache), so inf/NaN cannot leak (a float multiply would keep them) and it runs near
   memory speed (``masked_fill_`` and ``where`` are ~10x slower on CPU).
2. An optimizer step pre-hook masks again *after* the closure: Lightning passes the
   forward/backward/``on_before_optimizer_step``/clipping closure *into* ``optimizer.step``, so a
   plain pre-hook would run before the gradients exist; the hook wraps the closure instead, or
   masks right away when there is none (manual optimisation, AMP's scaler run it first). This
   catches what writes gradients after step 1: callbacks later in ``on_before_optimizer_step``
   (e.g. SAM, IGNITE), the LightningModule's own hook (Lightning runs it after the callbacks'),
   clipping, accumulation. Only gradients written since step 1 are masked again: one that is still
   the tensor step 1 masked, at the same version counter, is skipped, so an untouched gradient
   is masked once per step. Assumption: nothing writes into a gradient between the two without
   bumping its version counter. In-place ops do (also under ``no_grad``/``inference_mode``, the
   ``torch._foreach_*`` ops and ``clip_grad_norm_``/``clip_grad_value_``), and so does backward
   accumulating into it; a new tensor in ``.grad`` is seen by identity. Writes through
   ``p.grad.data`` (a new tensor with its own counter), ``.numpy()`` or raw kernels are not seen:
   after the restore (3.) frozen weights are bit-exact anyway, but where the restore is skipped
   such a write would move them. (GradScaler's unscaling does not bump the counter either, but
   maps +0.0 to +0.0.)
3. An optimizer step post-hook puts the original values back into frozen entries, which stay
   bit-identical whatever weight decay, momentum or Adam state do: a copy of the saved frozen
   values, branch-free in blocks (the running count of frozen entries, a ``cumsum`` of the
   unpacked bits, indexes the saved values; a gather makes them dense; they are merged on the
   integer bits). It is skipped where the step provably cannot move them (plain SGD/Adam/AdamW
   without weight decay, not maximising, optimizer state at +0.0 on frozen entries when training
   starts; see ``_skips_restore``).

Free entries get exactly the update they would get without the machinery. Parameters outside
``scope`` (biases and norm parameters for ``"weights"``) are not masked; buffers never are.

Default scope, as in each criterion's reference code: ``saliency`` and ``attribution`` rank *all*
parameters, biases and norm parameters included, against one global threshold (SalUn's
``Classification/generate_mask.py`` in OPTML-Group/Unlearn-Saliency and WAGLE's
``src/unlearn/generate_mask.py`` score every entry of ``model.named_parameters()``), and so does
``random`` (WAGLE's random-mask control);
``magnitude`` ranks weights only (``scope="weights"``), as the pruning of Jia et al. 2023
(OPTML-Group/Unlearn-Sparse, ``pruner.py``: global L1 pruning of conv weights; litplug's
``"weights"`` are all parameters with >= 2 dims). The forget-loss gradient is that of the mean loss
over the whole forget set, as SalUn's paper defines it; SalUn's code sums per-batch means, so a
partial last batch weighs more per sample (4x for a last batch a quarter full).

Cost: one pass over the forget (and, for ``attribution``, retain) set at fit start; per step,
one masking pass per gradient (~1.5x a ``copy_`` of it: 34 ms per 100M fp32 entries on one CPU
core, against 22 ms for ``copy_``), again only for gradients written after it (e.g. by clipping
or SAM), and one restore per parameter unless skipped as in 3. (~1.4 ns per entry on one CPU
core: 140 ms per 100M fp32 entries, ~6x a copy), against about ten memory-speed passes for an
Adam step. Memory: one bit per masked
entry and the frozen entries' original values, ``(1 - ratio) * width + 1/8`` bytes per entry
(0.53x the fp32 weights in scope at ``ratio=0.5``; :meth:`UnlearningMask.state_bytes`). Scoring
holds one gradient per scored parameter (for ``attribution`` two) and no other full copy: the
ranking keys are recomputed per tensor in each radix pass and each mask is packed as it is
made; the gradients are freed before the first training step.

DDP: the score gradients are summed over ranks (``all_reduce``, each rank scoring its share of
the batches) before ranking, so every rank holds the same mask. FSDP2 (``ModelParallelStrategy``,
``Shard(0)`` DTensor parameters): masks, originals and scores are shard-local; the global k-th
score is found by a 4-pass radix select over the float bits (four ``all_reduce`` of 256 counts)
and ties are split with one ``all_gather`` of per-parameter tie counts; no parameter is gathered.
``state_dict`` holds the full masks (gathered per parameter as bytes under FSDP2) so a resumed run
slices them back and never recomputes them. FSDP1 and DeepSpeed (flattened parameters) are refused.

Example:
    >>> from lightning.pytorch import Trainer
    >>> from litplug.callbacks import UnlearningMask
    >>> trainer = Trainer(callbacks=[UnlearningMask("saliency", ratio=0.5)])  # doctest: +SKIP
    >>> trainer.fit(unlearner, ForgetRetain(Digits(), "class", [3]))  # doctest: +SKIP
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from itertools import islice
from typing import Any, Literal

import torch
import torch.distributed as dist
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.data import extract_batch_size
from torch import nn
from typing_extensions import override

from ..board import log_figure
from ..figures import bar_chart
from ..functional.masks import (
    Reduce,
    attribution_scores,
    count_selected,
    enforce_masked_grads_,
    frozen_entries_are_zero,
    frozen_values,
    iter_topk_masks,
    pack_mask,
    restore_frozen_,
    unpack_mask,
)
from ..plumbing import grad_scaler, is_sharded, local, local_rows, mix_seed, refuse_flat_strategies, training_mode
from ..plumbing.loss import module_loss, require_loss
from ..plumbing.storage import writable
from ..plumbing.third_party_private import version
from ..protocols import FORGET_RETAIN_HINT, ForgetRetainData, require
from ..validation import check_choice, check_int, check_number, check_positive_int

__all__ = ["UnlearningMask"]

Criterion = Literal["saliency", "attribution", "magnitude", "random"]
Scope = Literal["weights", "all"]
# Default scope per criterion, as in the reference code (see the module docstring).
DEFAULT_SCOPE: dict[str, Scope] = {"saliency": "all", "attribution": "all", "magnitude": "weights", "random": "all"}


class UnlearningMask(Callback):
    """Train only a chosen fraction of the parameter entries; freeze the rest bit-exactly.

    Keep exactly ``int(N * ratio)`` parameter entries updatable, chosen by ``criterion`` on
    the original weights; freeze the rest bit-exactly (see the module docstring). Non-finite
    scores (NaN/inf from a non-finite loss or weight) raise a ``ValueError`` naming the
    parameters at fit start; frozen entries stay bit-exact whatever the later gradients hold.

    Logs ``unlearn/mask_ratio`` (k / N, every epoch) and a TensorBoard histogram
    ``unlearn/layer_updatable_fraction`` of the per-parameter updatable fractions (at fit start).

    Args:
        criterion: ``saliency``, ``attribution``, ``magnitude`` or ``random``.
        ratio: fraction of the entries in scope kept updatable, in (0, 1].
        scope: ``weights`` (parameters with >= 2 dims) or ``all`` trainable parameters; None:
            the criterion's reference scope (``all``; ``weights`` for ``magnitude``).
        mu: WAGLE's step-size constant for ``attribution`` (> 0).
        num_batches: forget/retain batches used for the gradients (None: the whole sets).
        seed: seed of the ``random`` criterion.
    """

    def __init__(
        self,
        criterion: Criterion = "saliency",
        ratio: float = 0.5,
        scope: Scope | None = None,
        mu: float = 1e-6,
        num_batches: int | None = None,
        seed: int = 0,
    ) -> None:
        check_choice("criterion", criterion, ("saliency", "attribution", "magnitude", "random"))
        check_number("ratio", ratio, 0, 1, low_open=True)
        check_choice("scope", scope, ("weights", "all"), allow_none=True)
        check_number("mu", mu, low=0, low_open=True)
        check_positive_int("num_batches", num_batches, allow_none=True)
        check_int("seed", seed)
        self.criterion, self.ratio, self.mu = criterion, ratio, mu
        self.scope: Scope = DEFAULT_SCOPE[criterion] if scope is None else scope
        self.num_batches, self.seed = num_batches, seed
        self._packed: dict[str, torch.Tensor] | None = None  # local (shard) masks as bits (pack_mask), 1 = updatable
        self._shapes: dict[str, torch.Size] = {}  # local (shard) shapes of the masked parameters
        self._loaded: dict[str, torch.Tensor] | None = None  # full masks from a checkpoint
        self.num_selected = 0
        self.num_entries = 0
        self.layer_fractions: dict[str, float] = {}
        self._params: list[nn.Parameter] = []
        self._frozen: list[list[torch.Tensor]] = []  # original values at frozen entries (frozen_values)
        self._bitmasks: list[torch.Tensor] = []  # the packed masks in the order of _params
        self._handles: list[Any] = []
        # (weak reference to the gradient, its version) after the last masking in this step
        self._masked: list[tuple[weakref.ref, int] | None] = []
        self._restoring: set[int] = set()  # ids of optimizers whose steps are followed by a restore

    @property
    def params(self) -> list[nn.Parameter]:
        """The masked parameters (in scope), in ``named_parameters`` order; set at fit start."""
        return list(self._params)

    # --- setup ------------------------------------------------------------------------------
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        refuse_flat_strategies(trainer, "UnlearningMask")
        if stage == "fit" and self.criterion in ("saliency", "attribution") and self._packed is None:
            by = f"UnlearningMask(criterion={self.criterion!r})"
            try:
                require(trainer.datamodule, ForgetRetainData, by, "datamodule")
            except TypeError as err:
                raise TypeError(f"{err}.\n{FORGET_RETAIN_HINT}") from err
            require_loss(pl_module, by)

    def _scoped(self, pl_module: LightningModule) -> list[tuple[str, nn.Parameter]]:
        named = [(n, p) for n, p in pl_module.named_parameters() if p.requires_grad]
        if self.scope == "weights":
            named = [(n, p) for n, p in named if p.dim() >= 2]
        if not named:
            raise ValueError(f"UnlearningMask(scope={self.scope!r}) found no trainable parameters in scope")
        for n, p in named:
            if is_sharded(p):
                from torch.distributed.tensor import Shard

                if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
                    raise ValueError(
                        f"UnlearningMask supports FSDP2 parameters sharded as (Shard(0),) on a 1-D mesh; {n} has "
                        f"{tuple(p.placements)} (tensor/hybrid parallelism is not supported)"
                    )
        return named

    # --- scoring ----------------------------------------------------------------------------
    def _gradients(
        self, trainer: Trainer, pl_module: LightningModule, split: str
    ) -> tuple[list[torch.Tensor], list[str]]:
        """Local gradients of the module's mean loss (:func:`~litplug.plumbing.loss.module_loss`)
        over the whole ``split`` set: each batch's mean loss weighted by its share of the samples;
        reduced over ranks."""
        named = [(n, p) for n, p in pl_module.named_parameters() if p.requires_grad]
        loader = getattr(trainer.datamodule, f"{split}_dataloader")()
        batches = list(islice(loader, self.num_batches))
        world, rank = trainer.world_size, trainer.global_rank
        sharded = any(is_sharded(p) for _, p in named)
        sizes = [extract_batch_size(b) for b in batches]
        total = sum(sizes)
        mine = list(range(len(batches)))[rank::world]
        saved = [p.grad for _, p in named]
        for _, p in named:
            p.grad = None
        for i in range(math.ceil(len(batches) / world)):  # the same count on every rank (FSDP2)
            j = mine[i] if i < len(mine) else 0
            weight = (sizes[j] if i < len(mine) else 0.0) * (world if sharded else 1) / total  # FSDP2 averages
            batch = trainer.precision_plugin.convert_input(move_data_to_device(batches[j], pl_module.device))
            (module_loss(pl_module, batch, j).float() * weight).backward()
        grads = []
        for _, p in named:
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            if world > 1 and not sharded:
                dist.all_reduce(g)
            # A copy only where DDP may hand out bucket views; else the gradient itself, freed with the scores.
            grads.append(local(g).detach().clone() if world > 1 else local(g).detach())
        for (_, p), g in zip(named, saved):
            p.grad = g
        names = [n for n, _ in named]
        return grads, names

    @torch.no_grad()
    def _random_scores(self, params: Sequence[nn.Parameter]) -> list[torch.Tensor]:
        scores = []
        for i, p in enumerate(params):
            gen = torch.Generator().manual_seed(mix_seed(self.seed, i))
            full = torch.rand(p.shape, generator=gen)  # one parameter at a time, then our rows
            scores.append(local_rows(full, p).to(local(p).device))
        return scores

    def _scores(
        self, trainer: Trainer, pl_module: LightningModule, named: list[tuple[str, nn.Parameter]]
    ) -> list[torch.Tensor]:
        params = [p for _, p in named]
        if self.criterion == "magnitude":
            return [local(p).detach() for p in params]  # ranked by |score|: no copy
        if self.criterion == "random":
            return self._random_scores(params)
        # eval mode: no dropout, no BatchNorm statistics update while scoring
        with training_mode(pl_module, False), torch.enable_grad():
            gf, names = self._gradients(trainer, pl_module, "forget")
            gr = self._gradients(trainer, pl_module, "retain")[0] if self.criterion == "attribution" else None
        index = {n: i for i, n in enumerate(names)}
        gf = [gf[index[n]] for n, _ in named]
        if self.criterion == "saliency":
            return gf  # ranked by |g_f| (saliency_scores), without a copy
        gr = [gr[index[n]] for n, _ in named]
        return attribution_scores([local(p).detach() for p in params], gf, gr, self.mu)

    def _check_finite(
        self, named: list[tuple[str, nn.Parameter]], scores: Sequence[torch.Tensor], all_reduce: Reduce | None
    ) -> None:
        """Raise if a score is NaN or inf (a non-finite forget/retain loss or weight): a mask
        ranked on such scores would be arbitrary. FSDP2 shards agree through one all-reduce."""
        bad = torch.tensor([int((~torch.isfinite(s)).sum()) for s in scores], dtype=torch.long)
        if all_reduce is not None:
            bad = all_reduce(bad.to(scores[0].device)).cpu()
        if int(bad.sum()):
            where = ", ".join(f"{n} ({int(c)} of {p.numel()})" for (n, p), c in zip(named, bad) if c)
            raise ValueError(
                f"UnlearningMask: {self.criterion!r} scores are not finite (NaN or inf) for {where}; check the "
                "forget/retain losses and the original weights"
            )

    def _collectives(self, named: list[tuple[str, nn.Parameter]]) -> tuple[Reduce | None, Any, int]:
        sharded = [p for _, p in named if is_sharded(p)]
        if not sharded:
            return None, None, 0
        group = sharded[0].device_mesh.get_group()
        world = dist.get_world_size(group)

        def all_reduce(t: torch.Tensor) -> torch.Tensor:
            dist.all_reduce(t, group=group)
            return t

        def all_gather(t: torch.Tensor) -> torch.Tensor:
            out = [torch.zeros_like(t) for _ in range(world)]
            dist.all_gather(out, t, group=group)
            return torch.stack(out)

        return all_reduce, all_gather, dist.get_rank(group)

    # --- hooks ------------------------------------------------------------------------------
    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        named = self._scoped(pl_module)
        all_reduce, all_gather, rank = self._collectives(named)
        self.num_entries = sum(p.numel() for _, p in named)
        self.num_selected = int(self.num_entries * self.ratio)
        if self._loaded is not None:
            missing = sorted(set(n for n, _ in named) - set(self._loaded))
            if missing:
                raise ValueError(f"the checkpoint's UnlearningMask state has no mask for {missing}")
            self._packed = {n: pack_mask(local_rows(self._loaded[n], p).to(local(p).device)) for n, p in named}
            self._loaded = None
        elif self._packed is None:
            # The scores (for saliency/attribution: the scoring gradients themselves) are freed
            # when this returns, before the first training step; each mask is packed as it comes.
            scores = self._scores(trainer, pl_module, named)
            self._check_finite(named, scores, all_reduce)
            masks = iter_topk_masks(scores, self.num_selected, all_reduce, all_gather, rank)
            self._packed = {n: pack_mask(m) for (n, _), m in zip(named, masks)}
            del scores, masks
        self._shapes = {n: local(p).shape for n, p in named}
        counts = torch.tensor(
            [count_selected(self._packed[n], local(p).numel()) for n, p in named],
            dtype=torch.long,
        )
        if all_reduce is not None:
            counts = all_reduce(counts)
        self.layer_fractions = {n: int(c) / p.numel() for (n, p), c in zip(named, counts)}
        self._params = [p for _, p in named]
        self._bitmasks = [self._packed[n] for n, _ in named]
        self._frozen = [frozen_values(local(p), b) for p, b in zip(self._params, self._bitmasks)]
        self._restoring = {id(opt) for opt in trainer.optimizers if not self._frozen_state_is_zero(opt)}
        for optimizer in trainer.optimizers:
            self._handles.append(optimizer.register_step_pre_hook(self._pre_step))
            self._handles.append(optimizer.register_step_post_hook(self._post_step))
        self._log_histogram(trainer)
        fractions = dict(self.layer_fractions)  # all-reduced counts: the same on every rank
        log_figure(
            trainer,
            "unlearn/mask_layers",
            lambda: bar_chart(fractions, f"updatable fraction per tensor ({self.criterion})", "fraction"),
        )

    def _log_histogram(self, trainer: Trainer) -> None:
        from lightning.pytorch.loggers import TensorBoardLogger

        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger) and trainer.is_global_zero:
                values = torch.tensor(list(self.layer_fractions.values()))
                logger.experiment.add_histogram("unlearn/layer_updatable_fraction", values, trainer.global_step)

    def _mask_grads(self) -> None:
        """Zero the frozen entries of every gradient not already masked in this step: one that is
        still the tensor masked last (a weak reference) at the same version counter is skipped."""
        grads = [p.grad for p in self._params]
        seen_before = self._masked or [None] * len(grads)
        todo = [
            None if g is None or (seen is not None and seen[0]() is g and seen[1] == version(g)) else local(g)
            for g, seen in zip(grads, seen_before)
        ]
        with torch.no_grad():
            enforce_masked_grads_(todo, self._bitmasks)
        self._masked = [None if g is None else (weakref.ref(g), version(g)) for g in grads]

    def _pre_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        # torch passes the optimizer itself as args[0]; a positional closure is args[1]
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if closure is None:  # the closure already ran (manual optimisation, AMP's scaler)
            self._mask_grads()
            return None

        def masked_closure() -> Any:
            result = closure()
            self._mask_grads()
            return result

        if "closure" in kwargs:
            return args, {**kwargs, "closure": masked_closure}
        return (args[0], masked_closure, *args[2:]), kwargs

    def _skips_restore(self, optimizer: torch.optim.Optimizer) -> bool:
        """Whether ``optimizer``'s step provably leaves frozen entries bit-identical, so that the
        restore can be skipped: plain SGD, Adam or AdamW (not subclasses), no weight decay, not
        maximising, and state that was all +0.0 at frozen entries when training started (then it
        stays +0.0: the gradients there are +0.0 at every step, and the update is ``p + (-0.0)``).
        Sticky: once an optimizer needed a restore it always gets one."""
        if id(optimizer) in self._restoring:
            return False
        ok = type(optimizer) in (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW) and all(
            not group.get("weight_decay", 0) and not group.get("maximize", False) for group in optimizer.param_groups
        )
        if not ok:
            self._restoring.add(id(optimizer))
        return ok

    def _frozen_state_is_zero(self, optimizer: torch.optim.Optimizer) -> bool:
        for p, bits in zip(self._params, self._bitmasks):
            shape = local(p).shape
            for value in optimizer.state.get(p, {}).values():
                shard = local(value) if torch.is_tensor(value) else None
                if shard is None or shard.shape != shape:
                    continue
                if not frozen_entries_are_zero(shard, bits):
                    return False
        return True

    def _post_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        self._masked = []  # the next step's gradients are new
        if self._skips_restore(optimizer):
            return
        with torch.no_grad():
            restore_frozen_([writable(p) for p in self._params], self._frozen, self._bitmasks)

    @override
    def on_after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # With a GradScaler (16-mixed), Lightning unscales and checks for inf/NaN *before*
        # on_before_optimizer_step: mask first, so that frozen entries cannot make it skip the step.
        if grad_scaler(trainer) is not None:
            self._mask_grads()

    @override
    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self._mask_grads()

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        pl_module.log("unlearn/mask_ratio", self.num_selected / max(1, self.num_entries), sync_dist=True)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.on_train_end(trainer, pl_module)

    # --- state ------------------------------------------------------------------------------
    @property
    def masks(self) -> dict[str, torch.Tensor] | None:
        """The (local, under FSDP2: shard) boolean masks by parameter name, True = updatable;
        unpacked from the bits the callback holds, on each read. None before fit start."""
        if self._packed is None:
            return None
        return {n: unpack_mask(b, self._shapes[n]) for n, b in self._packed.items()}

    def state_bytes(self) -> int:
        """Bytes of the tensors the callback holds during training: one bit per masked entry
        (rounded up to whole bytes per parameter) and the original values of the frozen entries."""
        tensors = list((self._packed or {}).values()) + [v for values in self._frozen for v in values]
        return sum(t.numel() * t.element_size() for t in tensors)

    @override
    def state_dict(self) -> dict[str, Any]:
        if self._packed is None:
            return {}
        full = {}
        for (n, bits), p in zip(self._packed.items(), self._params):
            mask = unpack_mask(bits, self._shapes[n])
            if is_sharded(p):  # collective: every rank runs state_dict when saving
                from torch.distributed.tensor import DTensor

                dt = DTensor.from_local(
                    mask.to(torch.uint8), p.device_mesh, p.placements, shape=p.shape, stride=p.stride()
                )
                mask = dt.full_tensor().bool()
            full[n] = mask.detach().cpu().clone()
        return {"masks": full, "num_selected": self.num_selected, "num_entries": self.num_entries}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict:
            self._loaded = dict(state_dict["masks"])
            self._packed = None
