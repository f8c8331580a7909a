"""Weight averaging: exponential moving average (EMA) and stochastic weight averaging (SWA).

Method card
    * EMA (Polyak & Juditsky 1992; the warmup rule of timm / ema-pytorch): after every optimizer
      step ``avg <- decay_t * avg + (1 - decay_t) * w``, with
      ``decay_t = min(decay, 1 - (1 + t / gamma) ** -power)`` under warmup, ``t`` the number of
      updates done before this one. The first update copies the weights (``decay_0 = 0``).
    * SWA (Izmailov et al. 2018, "Averaging Weights Leads to Wider Optima"): the uniform mean of
      one snapshot per epoch from ``start`` on, ``avg <- avg + (w - avg) / (n + 1)``; BatchNorm
      statistics are recomputed for the averaged weights with one pass over the training data.
    * Cost: one extra copy of the weights (in ``dtype`` on ``device``) and, per update, one
      ``lerp_`` over a flat buffer: at the first update the callback re-lays the module's
      (non-sharded, contiguous) parameters of each dtype/device into one contiguous buffer, in
      place (same ``Parameter`` objects and values; a moved module is re-bound by name), one
      tensor at a time, each old storage freed as soon as it is copied: the peak holds the
      average and at most one tensor twice. Sharded
      (FSDP2) parameters, buffers and mixed-dtype averages use multi-tensor ``torch._foreach_*``
      ops instead; never a Python loop per tensor in an update. Validation and test run on the
      average by default: the live weights are copied aside (one more copy while they run) and
      restored bit-exactly afterwards; ``fit`` ending on the average keeps no copy of them.
    * Checkpoints: a checkpoint's ``state_dict`` holds the weights its metrics were measured on:
      with ``evaluate_with="average"`` the average (the live weights go into the callback's state
      and a resumed ``fit`` puts them back); ``validate``/``test(ckpt_path=...)`` evaluate it.

Functional core: :func:`ema_decay`, :func:`average_update_`, :func:`update_bn_`; the callbacks
:class:`EMA` and :class:`SWA` wire it into the Trainer.

Example:
    >>> from lightning.pytorch import Trainer
    >>> from litplug.callbacks import EMA
    >>> from litplug.datamodules import Digits
    >>> from litplug.modules import MLP, Classifier
    >>> ema = EMA(decay=0.99, warmup=True)
    >>> model = Classifier(MLP(input_shape=[1, 8, 8], num_outputs=10))
    >>> Trainer(max_epochs=2, callbacks=[ema], logger=False).fit(model, Digits())  # doctest: +SKIP
    >>> model.load_state_dict(ema.averaged_state_dict())  # doctest: +SKIP
    >>> model.backbone.load_state_dict(ema.averaged_state_dict("backbone."))  # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_only, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from litplug.validation import check_bool, check_choice, check_fraction, check_int, check_number, check_path, check_positive_int, check_str

Which = Literal["average", "live"]
DType = Literal["float32", "float64", "bfloat16", "float16"]
_WHICH = ("average", "live")
_DTYPES = ("float32", "float64", "bfloat16", "float16")


# ----------------------------------------------------------------------------- functional core
def ema_decay(t: int, decay: float, warmup: bool = False, gamma: float = 1.0, power: float = 2 / 3) -> float:
    """Decay of the EMA update number ``t`` (0-based): 0 for the first update (a copy), then
    ``decay``, or ``min(decay, 1 - (1 + t / gamma) ** -power)`` with ``warmup``.

    Example:
        >>> ema_decay(0, 0.999), ema_decay(1, 0.999), round(ema_decay(1, 0.999, warmup=True), 4)
        (0.0, 0.999, 0.37)
    """
    if t <= 0:
        return 0.0
    if not warmup:
        return decay
    return min(decay, 1.0 - (1.0 + t / gamma) ** -power)


@torch.no_grad()
def average_update_(
    average: list[Tensor], current: list[Tensor], weight: float, staging: list[Tensor] | None = None
) -> None:
    """``average <- average + weight * (current - average)`` in place, for whole lists at once.

    EMA uses ``weight = 1 - decay``, SWA ``weight = 1 / (n + 1)``; ``weight == 1`` copies exactly.
    Tensors are paired by position (callers pair them by name). If the dtypes differ (an fp32
    average of a bf16 model) the update is computed in the average's dtype; if the devices differ
    (an average offloaded to the CPU) ``current`` is first copied into ``staging`` (tensors like
    ``average``; allocated here if not given).

    Example:
        >>> avg, cur = [torch.zeros(2)], [torch.ones(2)]
        >>> average_update_(avg, cur, 0.25); avg
        [tensor([0.2500, 0.2500])]
    """
    if not average:
        return
    if weight == 1.0:
        torch._foreach_copy_(average, current)
        return
    if average[0].device != current[0].device:
        if staging is None:
            staging = [torch.empty_like(a) for a in average]
        torch._foreach_copy_(staging, current)
        current = staging
    if average[0].dtype == current[0].dtype:
        torch._foreach_lerp_(average, current, weight)
    else:
        torch._foreach_mul_(average, 1.0 - weight)
        torch._foreach_add_(average, current, alpha=weight)


@torch.no_grad()
def update_bn_(module: nn.Module, batches: Iterable[Any]) -> bool:
    """Recompute the running statistics of every BatchNorm layer of ``module`` as the plain mean
    over ``batches`` (``module(batch[0])`` for tuples/lists, ``module(batch)`` otherwise).

    Returns whether ``module`` has any BatchNorm layer (nothing runs if not). Like
    ``torch.optim.swa_utils.update_bn`` but over an already device-placed iterable, so the caller
    decides how many batches (``limit_train_batches``) and how to move them.
    """
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return False
    momenta = {m: m.momentum for m in norms}
    was_training = module.training
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average = plain mean over the batches
    module.train()
    for batch in batches:
        module(batch[0] if isinstance(batch, (tuple, list)) else batch)
    for m, momentum in momenta.items():
        m.momentum = momentum
    module.train(was_training)
    return True


# ----------------------------------------------------------------------------- shared wrapper
@dataclass
class _Group:
    """Tensors of one (dtype, device) kind: the model's (local shards) and their averages."""

    names: list[str]
    live: list[Tensor]
    average: list[Tensor]
    floating: bool
    dtype: torch.dtype  # of the average
    device: torch.device  # of the average
    dtensor_specs: list[Any] = field(default_factory=list)  # (mesh, placements, shape, stride) or None
    staging: list[Tensor] | None = None  # for an average on another device than the weights
    sources: list[Tensor] = field(default_factory=list)  # the module's own tensors (Parameters, buffers)
    flat_live: Tensor | None = None  # set when the live tensors are views of one buffer ...
    flat_average: Tensor | None = None  # ... and so are the averages: an update is one lerp_


@torch.no_grad()
def _flatten(g: _Group) -> None:
    """Re-lay the group's parameters (same Parameter objects, same values) into one contiguous
    buffer, and the averages into another, so that an update is a single ``lerp_``."""
    sizes = [t.numel() for t in g.live]
    flat_live = torch.empty(sum(sizes), dtype=g.live[0].dtype, device=g.live[0].device)
    views = [v.view_as(t) for v, t in zip(flat_live.split(sizes), g.live)]
    g.live = []  # no reference to the old storage may outlive its copy
    # One tensor at a time: each old storage is freed as soon as it is copied, so the re-layout
    # holds at most one tensor twice (not the whole model).
    for param, view in zip(g.sources, views):
        view.copy_(param.detach())
        param.data = view
    g.live = [p.detach() for p in g.sources]
    g.flat_live = flat_live
    g.flat_average = torch.empty_like(flat_live, dtype=g.dtype, device=g.device)
    g.average = [v.view_as(t) for v, t in zip(g.flat_average.split(sizes), g.live)]


def _local(t: Tensor) -> Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


class _WeightAveraging(Callback):
    """Shared machinery of :class:`EMA` and :class:`SWA`: the average keyed by tensor name, the
    validation/test swap, the final weights, the export and the checkpointed state."""

    def __init__(
        self,
        dtype: DType | None,
        device: str | None,
        evaluate_with: Which,
        final_weights: Which,
        export_path: str | None,
    ) -> None:
        super().__init__()
        check_choice("dtype", dtype, _DTYPES, allow_none=True)
        if check_str("device", device, allow_none=True) is not None:
            try:
                torch.device(device)
            except (RuntimeError, TypeError) as err:
                raise ValueError(f"`device` must name a torch device such as 'cpu' or 'cuda:0', got {device!r}") from err
        check_choice("evaluate_with", evaluate_with, _WHICH)
        check_choice("final_weights", final_weights, _WHICH)
        check_path("export_path", export_path, allow_none=True)
        self.dtype = dtype
        self.device = device
        self.evaluate_with = evaluate_with
        self.final_weights = final_weights
        self.export_path = export_path
        self.updates = 0
        self.skipped = 0  # updates skipped because the weights were not finite
        self._last_step = -1
        self._groups: list[_Group] | None = None
        self._pending: dict[str, Tensor] | None = None
        self._backup: list[list[Tensor]] | None = None
        self._holds_average = False  # the model's weights currently are the average
        self._module: pl.LightningModule | None = None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

        if isinstance(trainer.strategy, (FSDPStrategy, DeepSpeedStrategy)):
            raise ValueError(
                f"{type(self).__name__} supports single-device, DDP and ModelParallelStrategy (FSDP2) training, "
                f"not {type(trainer.strategy).__name__} (flat or partitioned parameters: unverified)"
            )
        from lightning.pytorch.callbacks import ModelCheckpoint
        from lightning.pytorch.utilities.rank_zero import rank_zero_warn

        if self.evaluate_with == "average" and any(isinstance(c, ModelCheckpoint) and c.save_weights_only for c in trainer.callbacks):
            rank_zero_warn(
                f"{type(self).__name__}: Lightning calls no callback when it saves a weights-only checkpoint, so "
                "ModelCheckpoint(save_weights_only=True) files hold the live weights, not the average validation "
                "measured; save full checkpoints to get the average in `state_dict`"
            )
        # Two callbacks putting their average into the model would restore each other's weights.
        swapping = [c for c in trainer.callbacks if isinstance(c, _WeightAveraging) and "average" in (c.evaluate_with, c.final_weights)]
        if len(swapping) > 1:
            raise ValueError(
                f"{len(swapping)} weight-averaging callbacks ({', '.join(type(c).__name__ for c in swapping)}) put their "
                "average into the model; set `evaluate_with='live'` and `final_weights='live'` on all but one"
            )

    # -- binding the average to the model's tensors (by name) --------------------------------
    def _bind(self, pl_module: pl.LightningModule) -> list[_Group]:
        if self._groups is not None:
            # A moved module (``.to(device)``, Lightning's teardown) has new storage: rebind by name.
            if all(_local(g.sources[0]).data_ptr() == g.live[0].data_ptr() for g in self._groups):
                return self._groups
            saved = {n: a for g in self._groups for n, a in zip(g.names, g.average)}
            self._groups = None
            for g in self._build(pl_module):
                for name, avg in zip(g.names, g.average):
                    avg.copy_(saved[name])
            return self._groups
        return self._build(pl_module)

    def _build(self, pl_module: pl.LightningModule) -> list[_Group]:
        self._module = pl_module
        named = list(pl_module.named_parameters()) + list(pl_module.named_buffers())
        groups: dict[tuple, _Group] = {}
        avg_dtype = getattr(torch, self.dtype) if self.dtype else None
        for name, tensor in named:
            local = _local(tensor.detach())
            floating = local.is_floating_point()
            dtype = (avg_dtype or local.dtype) if floating else local.dtype
            device = torch.device(self.device) if self.device else local.device
            if device.type == local.device.type and device.index is None:
                device = local.device  # "cuda" is the weights' own cuda:N
            is_param = isinstance(tensor, nn.Parameter) and not hasattr(tensor, "to_local")
            key = (floating, dtype, device, local.dtype, local.device, is_param)
            group = groups.setdefault(key, _Group([], [], [], floating, dtype, device))
            group.sources.append(tensor)
            spec = (tensor.device_mesh, tensor.placements, tensor.shape, tensor.stride()) if hasattr(tensor, "to_local") else None
            group.names.append(name)
            group.live.append(local)
            group.dtensor_specs.append(spec)
        local = None  # the flat re-layout frees the old storage tensor by tensor: hold none of it
        self._groups = list(groups.values())
        for g in self._groups:
            if g.floating and g.dtype == g.live[0].dtype and g.device == g.live[0].device and all(
                isinstance(t, nn.Parameter) and not hasattr(t, "to_local") and t.is_contiguous() for t in g.sources
            ):
                _flatten(g)  # allocates the flat average: no per-tensor averages before it
                continue
            g.average = [torch.empty_like(t, dtype=g.dtype, device=g.device) for t in g.live]
            if g.floating and g.device != g.live[0].device:
                g.staging = [torch.empty_like(a) for a in g.average]
        if self._pending is not None:
            self._load_average(self._pending)
            self._pending = None
        return self._groups

    def _load_average(self, state: dict[str, Tensor]) -> None:
        from torch.distributed.tensor import distribute_tensor

        assert self._groups is not None
        names = {n for g in self._groups for n in g.names}
        if set(state) != names:
            missing, extra = sorted(names - set(state)), sorted(set(state) - names)
            raise ValueError(f"the saved average does not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
        for g in self._groups:
            for name, avg, spec in zip(g.names, g.average, g.dtensor_specs):
                value = state[name]
                if spec is not None:  # the full average was saved: keep this rank's shard
                    mesh, placements, _, _ = spec
                    value = distribute_tensor(value.to(avg.device), mesh, placements, src_data_rank=None).to_local()
                if value.shape != avg.shape:
                    raise ValueError(f"the saved average of {name!r} has shape {tuple(value.shape)}, the model {tuple(avg.shape)}")
                avg.copy_(value)

    # -- the update ----------------------------------------------------------------------------
    def _update(self, pl_module: pl.LightningModule, weight: float) -> bool:
        """Fold the live weights into the average; skip (and warn) if they are not finite."""
        groups = self._bind(pl_module)
        if not self._live_is_finite(pl_module, groups):
            self.skipped += 1
            rank_zero_warn(
                f"{type(self).__name__}: the weights are not finite (NaN or inf) at step {pl_module.trainer.global_step}, "
                f"e.g. after a non-finite loss; this update is skipped and the average keeps its last finite value "
                f"({self.skipped} skipped so far)"
            )
            return False
        for g in groups:
            if g.flat_live is not None:
                average_update_([g.flat_average], [g.flat_live], weight)
            else:
                average_update_(g.average, g.live, weight if g.floating else 1.0, g.staging)
        self.updates += 1
        return True

    @staticmethod
    def _live_is_finite(pl_module: pl.LightningModule, groups: list[_Group]) -> bool:
        """Whether every floating weight is finite: a NaN or inf makes the sum of a flat buffer
        (or the norm of each tensor) non-finite, so one reduction pass and one host read suffice
        (and, for FSDP2 shards, one all-reduce of the verdict). Accumulated in at least float32;
        weights so large that their sum overflows (> 1e38) count as non-finite too."""
        sums: list[Tensor] = []
        for g in groups:
            if not g.floating:
                continue
            acc = torch.promote_types(g.live[0].dtype, torch.float32)
            if g.flat_live is not None:
                sums.append(g.flat_live.sum(dtype=acc))
            elif any(t.numel() for t in g.live):
                sums.extend(torch._foreach_norm([t for t in g.live if t.numel()], 2, dtype=acc))
        if not sums:
            return True
        total = sums[0] if len(sums) == 1 else torch.stack([t.to(sums[0].device, torch.float64) for t in sums]).sum()
        finite = bool(torch.isfinite(total))
        if any(spec is not None for g in groups for spec in g.dtensor_specs):
            finite = pl_module.trainer.strategy.reduce_boolean_decision(finite, all=True)
        return finite

    def state_bytes(self) -> int:
        """Bytes of the tensors the callback holds between steps: the average (one copy of the
        floating parameters and buffers, in ``dtype``; integer buffers copied), the staging copy
        of an average on another device, and the live weights set aside while the model holds the
        average for validation/test. 0 before the first update binds it to the model."""
        tensors = [t for g in self._groups or [] for t in (*g.average, *(g.staging or []))]
        tensors += [t for backup in self._backup or [] for t in backup]
        return sum(t.numel() * t.element_size() for t in tensors)

    # -- swapping ------------------------------------------------------------------------------
    def _use_average(self, pl_module: pl.LightningModule, keep_live: bool = True) -> None:
        if self.updates == 0 or self._holds_average or self._backup is not None:
            return  # no update yet: the model keeps its trained weights
        groups = self._bind(pl_module)
        # Without ``keep_live`` (the end of fit keeping the average) the live weights are dropped:
        # no copy of them is made.
        self._backup = [[t.clone() for t in g.live] for g in groups] if keep_live else None
        for g in groups:
            torch._foreach_copy_(g.live, g.average)

    def _restore_live(self) -> None:
        if self._backup is None:
            return
        assert self._groups is not None
        for g, backup in zip(self._groups, self._backup):
            torch._foreach_copy_(g.live, backup)
        self._backup = None

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._groups, self._holds_average, self._module = None, False, pl_module

    def _evaluates_average(self, trainer: pl.Trainer) -> bool:
        # `validate`/`test(ckpt_path=...)` evaluate the checkpoint's `state_dict`: the weights its
        # metrics were measured on (see `on_save_checkpoint`), not this callback's latest average.
        from_checkpoint = trainer.ckpt_path is not None and trainer.state.fn != "fit"
        return self.evaluate_with == "average" and not from_checkpoint

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._evaluates_average(trainer):
            self._use_average(pl_module)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_live()

    @override
    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._evaluates_average(trainer):
            self._use_average(pl_module)

    @override
    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_live()

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.updates > 0 and not self._holds_average:
            self._sync_buffers(trainer, pl_module)
            self._use_average(pl_module, keep_live=self.final_weights == "live")
            self._finalize(trainer, pl_module)
            if self.final_weights == "average":
                self._backup, self._holds_average = None, True
            else:
                self._restore_live()
        if self.export_path:
            self._export(pl_module)

    def _sync_buffers(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Buffers (BatchNorm statistics) are updated from each rank's own batches, so their
        averages differ by rank; DDP broadcasts rank 0's buffers before every forward, so rank 0's
        average is the one the model uses: broadcast it once, at the end of ``fit``."""
        if trainer.world_size <= 1:
            return
        buffers = {name for name, _ in pl_module.named_buffers()}
        for g in self._bind(pl_module):
            if g.floating:
                for name, avg in zip(g.names, g.average):
                    if name in buffers:
                        avg.copy_(trainer.strategy.broadcast(avg, src=0))

    def _finalize(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Hook for SWA's BatchNorm pass, run at the end of ``fit`` while the model holds the
        average (the live weights are set aside)."""

    # -- export --------------------------------------------------------------------------------
    def averaged_state_dict(self, prefix: str = "") -> dict[str, Tensor]:
        """The averaged weights as a plain state dict (full tensors on the CPU).

        Args:
            prefix: ``""`` (default): the LightningModule's own parameter and buffer names (loads
                with ``model.load_state_dict``); a prefix such as ``"backbone."``: the tensors
                under it, named as in that submodule; ``"auto"``: the prefix ``export_path`` uses
                (``"backbone."`` when the module has an ``nn.Module`` ``backbone``, else ``""``).

        Before the first update it holds the live weights, which is what the model keeps then.
        Under FSDP2 this all-gathers, so every rank must call it.
        """
        if prefix == "auto":
            prefix = _export_prefix(self._module)
        full = self._full_average() if self.updates > 0 else self._full_live()
        keys = [k for k in full if k.startswith(prefix)]
        if not keys:
            raise ValueError(f"no averaged tensor is named with the prefix {prefix!r}; names start with {sorted(full)[:3]}")
        return {k[len(prefix) :]: full[k] for k in keys}

    def _full(self, which: str) -> dict[str, Tensor]:
        if self._groups is None:
            if self._module is None:
                return dict(self._pending or {})
            self._bind(self._module)
        return self._gather([getattr(g, which) for g in self._groups])

    def _gather(self, lists: list[list[Tensor]]) -> dict[str, Tensor]:
        """Full CPU copies of per-group tensor lists (local shards gathered under FSDP2), by name."""
        from torch.distributed.tensor import DTensor

        assert self._groups is not None
        out = {}
        for g, tensors in zip(self._groups, lists):
            for name, tensor, spec in zip(g.names, tensors, g.dtensor_specs):
                if spec is not None:
                    mesh, placements, shape, stride = spec
                    tensor = DTensor.from_local(tensor, mesh, placements, shape=shape, stride=stride).full_tensor()
                out[name] = tensor.detach().to("cpu", copy=True)
        return out

    def _full_average(self) -> dict[str, Tensor]:
        return self._full("average")

    def _full_live(self) -> dict[str, Tensor]:
        return self._full("live")

    def _export(self, pl_module: pl.LightningModule) -> None:
        self._bind(pl_module)
        _save_rank_zero(self.averaged_state_dict(_export_prefix(pl_module)), self.export_path)

    # -- checkpointed state --------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        # Full tensors (gathered under FSDP2: dump_checkpoint runs on every rank), so a resumed run
        # on any world size re-shards them locally.
        average = self._full_average() if self.updates > 0 else {}
        return {"updates": self.updates, "last_step": self._last_step, "average": average}

    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        """With ``evaluate_with="average"``, the checkpoint's ``state_dict`` holds the average (the
        weights validation measured, so the ones ``ModelCheckpoint`` ranks) and the callback's
        state the live weights (``"live"``, full tensors), which a resumed ``fit`` puts back."""
        state = checkpoint.get("callbacks", {}).get(self.state_key)
        model_state = checkpoint.get("state_dict")
        if self.evaluate_with != "average" or self.updates == 0 or self._holds_average or state is None or model_state is None:
            return
        groups = self._bind(pl_module)
        # Mid-validation the model holds the average and the live weights are set aside.
        live_lists = self._backup if self._backup is not None else [g.live for g in groups]
        state["live"] = self._gather(live_lists)  # collective under FSDP2: every rank saves
        full_average = state["average"]
        for g in groups:
            for name, avg, spec in zip(g.names, g.average, g.dtensor_specs):
                old = model_state.get(name)
                if old is None:
                    continue
                if hasattr(old, "device_mesh"):  # a sharded (distributed) checkpoint: this rank's shard
                    from torch.distributed.tensor import DTensor

                    local = old.to_local()
                    mesh, placements, shape, stride = spec
                    model_state[name] = DTensor.from_local(
                        avg.detach().to(device=local.device, dtype=local.dtype, copy=True), mesh, placements, shape=shape, stride=stride
                    )
                else:
                    model_state[name] = full_average[name].to(device=old.device, dtype=old.dtype, copy=True)

    @override
    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Resuming ``fit``: the model was loaded from the checkpoint's ``state_dict`` (the average,
        see :meth:`on_save_checkpoint`); put the live weights of the callback's state back."""
        state = checkpoint.get("callbacks", {}).get(self.state_key)
        if not state or "live" not in state or trainer.state.fn != "fit":
            return  # validate/test(ckpt_path=...) evaluate the state_dict
        from torch.distributed.tensor import distribute_tensor

        live = state["live"]
        with torch.no_grad():
            for name, tensor in list(pl_module.named_parameters()) + list(pl_module.named_buffers()):
                if name not in live:
                    continue
                local = _local(tensor.detach())
                value = live[name]
                if hasattr(tensor, "device_mesh"):
                    value = distribute_tensor(value.to(local.device), tensor.device_mesh, tensor.placements, src_data_rank=None).to_local()
                local.copy_(value)

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.updates = int(state_dict["updates"])
        self._last_step = int(state_dict["last_step"])
        self._pending = dict(state_dict["average"]) if self.updates > 0 else None
        self._groups, self._backup, self._holds_average = None, None, False


def _export_prefix(pl_module: nn.Module | None) -> str:
    """``"backbone."`` for a module with an ``nn.Module`` ``backbone`` (litplug's modules), else ``""``."""
    return "backbone." if isinstance(getattr(pl_module, "backbone", None), nn.Module) else ""


def _logs_now(trainer: pl.Trainer) -> bool:
    # A step value logged when the Trainer does not write logs (every `log_every_n_steps`) is
    # overwritten unseen, and `self.log` costs more than an EMA update of a small model.
    return bool(getattr(trainer._logger_connector, "should_update_logs", True))


@rank_zero_only
def _save_rank_zero(state: dict[str, Tensor], path: str) -> None:
    from pathlib import Path

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)


# ----------------------------------------------------------------------------- EMA
class EMA(_WeightAveraging):
    """Exponential moving average of the weights, updated after optimizer steps.

    ``avg <- decay_t * avg + (1 - decay_t) * w`` over all floating parameters and buffers of the
    LightningModule (integer buffers such as ``num_batches_tracked`` are copied), paired by name.
    The first update copies the weights; before it, validation uses the live weights.

    Schedule: the update follows the optimizer step with 0-based index ``i`` (``global_step - 1``)
    when ``i >= update_after_step`` and ``i % every_n_steps == 0``, i.e. after steps 1, n + 1,
    2n + 1, ... (1-based) from step ``update_after_step + 1`` on, the rule of Lightning's
    ``EMAWeightAveraging(update_every_n_steps=n, update_starting_at_step=update_after_step)``. The
    phase is that of the step count, not of ``update_after_step`` (as in Lightning): with
    ``update_after_step=2, every_n_steps=3`` the updates follow steps 4, 7, 10, ...

    Non-finite weights (after a NaN/inf loss, or a step that overflowed) never enter the
    average: such an update is skipped with a warning and counted in ``skipped``; the average
    keeps its last finite value (the check costs one summing pass over the weights and one host
    read per update).

    Distributed: DDP adds no communication (every rank updates its identical replica). FSDP2
    (``ModelParallelStrategy``): the average is kept per local shard (``p.to_local()``), no
    all-gather in the update or the swap; ``state_dict`` (checkpoints) and the export gather full
    tensors, once per checkpoint.

    Args:
        decay: EMA decay in (0, 1).
        warmup: use ``decay_t = min(decay, 1 - (1 + t / warmup_gamma) ** -warmup_power)``.
        warmup_gamma: > 0, the ``gamma`` of the warmup rule.
        warmup_power: > 0, the ``power`` of the warmup rule (2/3 for short runs, 3/4 for long).
        update_after_step: no update after the first this-many optimizer steps (>= 0).
        every_n_steps: update after optimizer steps 1, n + 1, 2n + 1, ... (>= 1; see Schedule).
        dtype: dtype of the average of floating tensors (``"float32"`` for a bf16 model, so small
            updates are not rounded away); ``None`` keeps the model's dtype.
        device: where the average lives (``"cpu"`` offloads it); ``None`` = beside the weights.
        evaluate_with: weights used for validation and test: ``"average"`` or ``"live"``.
        final_weights: weights the model holds after ``fit``: ``"average"`` or ``"live"``.
        export_path: if set, ``fit`` ends by writing the averaged backbone's state dict there
            (``torch.save``; loadable with ``backbone.load_state_dict(torch.load(path))``).

    Example:
        >>> ema = EMA(decay=0.999, warmup=True, dtype="float32", export_path="runs/ema.pt")
    """

    def __init__(
        self,
        decay: float = 0.999,
        warmup: bool = False,
        warmup_gamma: float = 1.0,
        warmup_power: float = 2 / 3,
        update_after_step: int = 0,
        every_n_steps: int = 1,
        dtype: DType | None = None,
        device: str | None = None,
        evaluate_with: Which = "average",
        final_weights: Which = "average",
        export_path: str | None = None,
    ) -> None:
        check_number("decay", decay, 0, 1, low_open=True, high_open=True)
        check_bool("warmup", warmup)
        check_number("warmup_gamma", warmup_gamma, low=0, low_open=True)
        check_number("warmup_power", warmup_power, low=0, low_open=True)
        check_int("update_after_step", update_after_step, low=0)
        check_positive_int("every_n_steps", every_n_steps)
        super().__init__(dtype, device, evaluate_with, final_weights, export_path)
        self.decay = decay
        self.warmup = warmup
        self.warmup_gamma = warmup_gamma
        self.warmup_power = warmup_power
        self.update_after_step = update_after_step
        self.every_n_steps = every_n_steps

    def current_decay(self) -> float:
        """Decay of the next update."""
        return ema_decay(self.updates, self.decay, self.warmup, self.warmup_gamma, self.warmup_power)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step  # optimizer steps so far; unchanged on accumulation batches
        index = step - 1  # 0-based index of the step just taken, as in Lightning's WeightAveraging
        if step == self._last_step or index < self.update_after_step or index % self.every_n_steps:
            return
        decay = self.current_decay()
        self._update(pl_module, 1.0 - decay)
        self._last_step = step
        if _logs_now(trainer):
            pl_module.log_dict({"ema/decay": decay, "ema/updates": float(self.updates)}, on_step=True, on_epoch=False)


# ----------------------------------------------------------------------------- SWA
class SWA(_WeightAveraging):
    """Stochastic weight averaging: the uniform mean of one snapshot per ``every_n_epochs``
    epochs from epoch ``start`` on, taken after the epoch's last optimizer step (before its
    validation), then BatchNorm statistics recomputed for the averaged weights at the end of
    ``fit`` with one pass over the training data (``limit_train_batches`` respected).

    Floating parameters and buffers are averaged, integer buffers copied, paired by name. Before
    the first snapshot, validation uses the live weights. Use a constant or cyclic learning rate
    over the averaging phase (e.g. ``SWALR``) as in the paper. A snapshot whose weights are not
    finite is skipped with a warning (as in :class:`EMA`).

    Distributed: DDP and FSDP2 add no communication to the snapshots (FSDP2 keeps the average
    per local shard). The BatchNorm pass runs on each rank's share of the data, then averages the
    BatchNorm buffers over ranks with one all-reduce so the replicas agree.

    Data without a length (an ``IterableDataset``): the snapshot is taken when the epoch ends,
    after its validation (which still sees the previous average).

    Args:
        start: first averaged epoch: an epoch index (int >= 0; works with a ``max_steps``-only
            Trainer) or a fraction of ``max_epochs`` (float in [0, 1)); must lie before
            ``max_epochs`` when that is set (checked at setup).
        every_n_epochs: snapshot every n-th epoch from ``start`` (>= 1).
        update_bn: recompute BatchNorm statistics for the final averaged weights.
        dtype, device, evaluate_with, final_weights, export_path: as in :class:`EMA`.

    Example:
        >>> swa = SWA(start=0.75, update_bn=True)
    """

    def __init__(
        self,
        start: int | float = 0.75,
        every_n_epochs: int = 1,
        update_bn: bool = True,
        dtype: DType | None = None,
        device: str | None = None,
        evaluate_with: Which = "average",
        final_weights: Which = "average",
        export_path: str | None = None,
    ) -> None:
        if isinstance(start, float):
            check_fraction("start", start)  # a fraction of max_epochs
        elif not isinstance(start, bool) and isinstance(start, int):
            check_int("start", start, low=0)  # an epoch index
        else:
            raise TypeError(f"`start` must be an epoch index (an int >= 0) or a fraction of max_epochs (a float in [0, 1)), got {start!r} ({type(start).__name__})")
        check_positive_int("every_n_epochs", every_n_epochs)
        check_bool("update_bn", update_bn)
        super().__init__(dtype, device, evaluate_with, final_weights, export_path)
        self.start = start
        self.every_n_epochs = every_n_epochs
        self.update_bn = update_bn
        self._start_epoch = start if isinstance(start, int) else 0

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        max_epochs = trainer.max_epochs if trainer.max_epochs is not None and trainer.max_epochs >= 1 else None
        if isinstance(self.start, float):
            if max_epochs is None:
                raise ValueError(
                    f"SWA(start={self.start}) is a fraction of `max_epochs`, which the Trainer does not set "
                    f"(max_epochs={trainer.max_epochs}); give `start` as an epoch index (int) or set `max_epochs`"
                )
            self._start_epoch = int(self.start * max_epochs)
        else:
            self._start_epoch = self.start
        if max_epochs is not None and self._start_epoch >= max_epochs:
            raise ValueError(f"`start` = {self.start} is epoch {self._start_epoch}, beyond the last epoch {max_epochs - 1} (max_epochs={max_epochs})")

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx + 1 == trainer.num_training_batches:  # the epoch's last batch (data with a length)
            self._snapshot(trainer, pl_module, on_step=True)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not math.isfinite(trainer.num_training_batches):  # data without a length: the epoch has ended
            self._snapshot(trainer, pl_module, on_step=False)

    def _snapshot(self, trainer: pl.Trainer, pl_module: pl.LightningModule, on_step: bool) -> None:
        epoch = trainer.current_epoch
        if epoch < self._start_epoch or (epoch - self._start_epoch) % self.every_n_epochs or epoch == self._last_step:
            return
        weight = 1.0 / (self.updates + 1)
        self._update(pl_module, weight)
        self._last_step = epoch  # for SWA the counter is the epoch of the last snapshot
        if _logs_now(trainer) or not on_step:
            pl_module.log_dict({"swa/weight": weight, "swa/updates": float(self.updates)}, on_step=on_step, on_epoch=not on_step)

    def _finalize(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.update_bn:
            return
        limit = trainer.num_training_batches
        loader = trainer.train_dataloader

        def batches() -> Iterable[Any]:
            for i, batch in enumerate(loader):
                if i >= limit:
                    break
                yield trainer.strategy.batch_to_device(batch)

        if not update_bn_(pl_module, batches()):
            return
        stats = {}
        for prefix, m in pl_module.named_modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                for name, buf in m.named_buffers(recurse=False):
                    if trainer.world_size > 1 and buf.is_floating_point():
                        buf.copy_(trainer.strategy.reduce(buf.clone(), reduce_op="mean"))
                    stats[f"{prefix}.{name}" if prefix else name] = buf
        assert self._groups is not None
        for g in self._groups:  # the recomputed statistics become part of the average
            for name, avg in zip(g.names, g.average):
                if name in stats:
                    avg.copy_(stats[name])
