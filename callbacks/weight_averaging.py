"""The machinery shared by :class:`~litplug.callbacks.EMA` and :class:`~litplug.callbacks.SWA`: the
average kept per (dtype, device) group of the module's tensors (local shards under FSDP2), the
flat-buffer layout, the finiteness check, the validation/test swap, the final weights, the export
and the checkpointed state.

Cost: one extra copy of the weights (in ``dtype`` on ``device``) and, per update, one ``lerp_``
over a flat buffer: at the first update the callback re-lays the module's (non-sharded,
contiguous) parameters of each dtype/device into one contiguous buffer, in place (same
``Parameter`` objects and values; a moved module is re-bound by name), one tensor at a time,
each old storage freed as soon as it is copied: the peak holds the average and at most one tensor
twice. Sharded (FSDP2) parameters, buffers and mixed-dtype averages use multi-tensor
``torch._foreach_*`` ops instead; never a Python loop per tensor in an update. Validation and
test run on the average by default: the live weights are copied aside (one more copy while they
run) and restored bit-exactly afterwards; ``fit`` ending on the average keeps no copy of them.

Checkpoints: a checkpoint's ``state_dict`` holds the weights its metrics were measured on: with
``evaluate_with="average"`` the average (the live weights go into the callback's state and a
resumed ``fit`` puts them back); ``validate``/``test(ckpt_path=...)`` evaluate it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from typing_extensions import override

from ..board import write_charts
from ..functional.averaging import average_update_
from ..plumbing import is_sharded, local, refuse_flat_strategies, save_rank_zero, warn
from ..plumbing.storage import flatten_
from ..plumbing.third_party_private import foreach_copy_, foreach_norm
from ..validation import check_choice, check_path, check_str

Which = Literal["average", "live"]
DType = Literal["float32", "float64", "bfloat16", "float16"]
_WHICH = ("average", "live")
_DTYPES = ("float32", "float64", "bfloat16", "float16")


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
    g.live = []  # no reference to the old storage may outlive its copy (flatten_ frees one at a time)
    g.flat_live = flatten_(g.sources)
    g.live = [p.detach() for p in g.sources]
    g.flat_average = torch.empty_like(g.flat_live, dtype=g.dtype, device=g.device)
    g.average = [v.view_as(t) for v, t in zip(g.flat_average.split(sizes), g.live)]


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
                raise ValueError(
                    f"`device` must name a torch device such as 'cpu' or 'cuda:0', got {device!r}"
                ) from err
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
        refuse_flat_strategies(trainer, type(self).__name__)
        from lightning.pytorch.callbacks import ModelCheckpoint

        if self.evaluate_with == "average" and any(
            isinstance(c, ModelCheckpoint) and c.save_weights_only for c in trainer.callbacks
        ):
            warn(
                f"{type(self).__name__}: Lightning calls no callback when it saves a weights-only checkpoint, so "
                "ModelCheckpoint(save_weights_only=True) files hold the live weights, not the average validation "
                "measured; save full checkpoints to get the average in `state_dict`"
            )
        # Two callbacks putting their average into the model would restore each other's weights.
        swapping = [
            c
            for c in trainer.callbacks
            if isinstance(c, _WeightAveraging) and "average" in (c.evaluate_with, c.final_weights)
        ]
        if len(swapping) > 1:
            raise ValueError(
                f"{len(swapping)} weight-averaging callbacks ({', '.join(type(c).__name__ for c in swapping)}) "
                "put their "
                "average into the model; set `evaluate_with='live'` and `final_weights='live'` on all but one"
            )

    # -- binding the average to the model's tensors (by name) --------------------------------
    def _bind(self, pl_module: pl.LightningModule) -> list[_Group]:
        if self._groups is not None:
            # A moved module (``.to(device)``, Lightning's teardown) has new storage: rebind by name.
            if all(local(g.sources[0]).data_ptr() == g.live[0].data_ptr() for g in self._groups):
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
            shard = local(tensor.detach())
            floating = shard.is_floating_point()
            dtype = (avg_dtype or shard.dtype) if floating else shard.dtype
            device = torch.device(self.device) if self.device else shard.device
            if device.type == shard.device.type and device.index is None:
                device = shard.device  # "cuda" is the weights' own cuda:N
            is_param = isinstance(tensor, nn.Parameter) and not is_sharded(tensor)
            key = (floating, dtype, device, shard.dtype, shard.device, is_param)
            group = groups.setdefault(key, _Group([], [], [], floating, dtype, device))
            group.sources.append(tensor)
            spec = (
                (tensor.device_mesh, tensor.placements, tensor.shape, tensor.stride()) if is_sharded(tensor) else None
            )
            group.names.append(name)
            group.live.append(shard)
            group.dtensor_specs.append(spec)
        shard = None  # the flat re-layout frees the old storage tensor by tensor: hold none of it
        self._groups = list(groups.values())
        for g in self._groups:
            if (
                g.floating
                and g.dtype == g.live[0].dtype
                and g.device == g.live[0].device
                and all(isinstance(t, nn.Parameter) and not is_sharded(t) and t.is_contiguous() for t in g.sources)
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
            raise ValueError(
                f"the saved average does not match the model: missing {missing[:5]}, unexpected {extra[:5]}"
            )
        for g in self._groups:
            for name, avg, spec in zip(g.names, g.average, g.dtensor_specs):
                value = state[name]
                if spec is not None:  # the full average was saved: keep this rank's shard
                    mesh, placements, _, _ = spec
                    value = distribute_tensor(value.to(avg.device), mesh, placements, src_data_rank=None).to_local()
                if value.shape != avg.shape:
                    raise ValueError(
                        f"the saved average of {name!r} has shape {tuple(value.shape)}, the model {tuple(avg.shape)}"
                    )
                avg.copy_(value)

    # -- the update ----------------------------------------------------------------------------
    def _update(self, pl_module: pl.LightningModule, weight: float) -> bool:
        """Fold the live weights into the average; skip (and warn) if they are not finite."""
        groups = self._bind(pl_module)
        if not self._live_is_finite(pl_module, groups):
            self.skipped += 1
            warn(
                f"{type(self).__name__}: the weights are not finite (NaN or inf) "
                f"at step {pl_module.trainer.global_step}, "
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
                sums.extend(foreach_norm([t for t in g.live if t.numel()], 2, dtype=acc))
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
            foreach_copy_(g.live, g.average)

    def _restore_live(self) -> None:
        if self._backup is None:
            return
        assert self._groups is not None
        for g, backup in zip(self._groups, self._backup):
            foreach_copy_(g.live, backup)
        self._backup = None

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._groups, self._holds_average, self._module = None, False, pl_module
        write_charts(trainer)

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
    def average_tensors(self) -> dict[str, Tensor]:
        """The average as this callback holds it, by name: local shards under FSDP2, in the
        average's ``dtype`` and on its ``device`` (views, not copies; empty before the first
        update of a run)."""
        return {n: a for g in self._groups or [] for n, a in zip(g.names, g.average)}

    @property
    def last_update(self) -> int:
        """The training step (EMA, 1-based) or epoch (SWA) of the latest update; -1 before the first."""
        return self._last_step

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
            raise ValueError(
                f"no averaged tensor is named with the prefix {prefix!r}; names start with {sorted(full)[:3]}"
            )
        return {k[len(prefix) :]: full[k] for k in keys}

    def live_state_dict(self) -> dict[str, Tensor]:
        """The live (trained) weights as a plain state dict, full tensors on the CPU, named like the
        LightningModule's own. Under FSDP2 this all-gathers, so every rank must call it."""
        return self._full_live()

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
        save_rank_zero(self.averaged_state_dict(_export_prefix(pl_module)), self.export_path)

    # -- checkpointed state --------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        # Full tensors (gathered under FSDP2: dump_checkpoint runs on every rank), so a resumed run
        # on any world size re-shards them locally.
        average = self._full_average() if self.updates > 0 else {}
        return {"updates": self.updates, "last_step": self._last_step, "average": average}

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """With ``evaluate_with="average"``, the checkpoint's ``state_dict`` holds the average (the
        weights validation measured, so the ones ``ModelCheckpoint`` ranks) and the callback's
        state the live weights (``"live"``, full tensors), which a resumed ``fit`` puts back."""
        state = checkpoint.get("callbacks", {}).get(self.state_key)
        model_state = checkpoint.get("state_dict")
        if (
            self.evaluate_with != "average"
            or self.updates == 0
            or self._holds_average
            or state is None
            or model_state is None
        ):
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
                if is_sharded(old):  # a sharded (distributed) checkpoint: this rank's shard
                    from torch.distributed.tensor import DTensor

                    shard = old.to_local()
                    mesh, placements, shape, stride = spec
                    model_state[name] = DTensor.from_local(
                        avg.detach().to(device=shard.device, dtype=shard.dtype, copy=True),
                        mesh,
                        placements,
                        shape=shape,
                        stride=stride,
                    )
                else:
                    model_state[name] = full_average[name].to(device=old.device, dtype=old.dtype, copy=True)

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
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
                shard = local(tensor.detach())
                value = live[name]
                if is_sharded(tensor):
                    value = distribute_tensor(
                        value.to(shard.device), tensor.device_mesh, tensor.placements, src_data_rank=None
                    ).to_local()
                shard.copy_(value)

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.updates = int(state_dict["updates"])
        self._last_step = int(state_dict["last_step"])
        self._pending = dict(state_dict["average"]) if self.updates > 0 else None
        self._groups, self._backup, self._holds_average = None, None, False


def _export_prefix(pl_module: nn.Module | None) -> str:
    """``"backbone."`` for a module with an ``nn.Module`` ``backbone`` (litplug's modules), else ``""``."""
    return "backbone." if isinstance(getattr(pl_module, "backbone", None), nn.Module) else ""
