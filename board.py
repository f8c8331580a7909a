"""TensorBoard output beyond scalars: the run's custom-scalars layout, figures and hparams.

* :func:`summary_writer`: the ``SummaryWriter`` of the Trainer's ``TensorBoardLogger`` on global
  rank zero, else ``None`` (with one info line per run saying why, when a figure is skipped).
* :func:`write_charts`: the custom-scalars layout, written once per log folder: one section per
  litplug family in use, collected from the ``litplug_charts`` attribute of the module and of
  every callback (``{"section": {"chart title": ["tag regex", ...]}}``).
* :func:`log_figure`: render a figure (:mod:`litplug.figures`) on rank zero and log it as an image.
* :func:`write_hparams`: the hparams plugin's session summary (hyper-parameters and status), the
  run's only one (Lightning's ``TensorBoardLogger`` then writes its ``hparams.yaml`` but no session).
* :func:`flatten_config` / :func:`saved_hparams`: a config's values that differ from the
  defaults, and the hyper-parameters a module saves (``save_hyperparameters()``), as the session's
  ``{"dotted.key": scalar}``; ``litplug compare`` reads them back.

A run resumed into the folder it was logging to (the same ``TensorBoardLogger`` version) keeps
the layout and hparams it wrote there: they are not written a second time.

Example:
    >>> from lightning.pytorch import Trainer
    >>> from litplug.board import summary_writer
    >>> summary_writer(Trainer(logger=False, enable_progress_bar=False)) is None
    True
"""

from __future__ import annotations

import glob
import importlib
import inspect
import math
import os
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = [
    "CHARTS_ATTRIBUTE",
    "flatten_config",
    "has_tag",
    "has_tensorboard",
    "log_figure",
    "saved_hparams",
    "signature_defaults",
    "summary_writer",
    "write_best",
    "write_charts",
    "write_hparams",
]

CHARTS_ATTRIBUTE = "litplug_charts"
LAYOUT_TAG = "custom_scalars__config__"
SESSION_START_TAG = "_hparams_/session_start_info"
Scalar = bool | int | float | str
_MISSING = object()

_told: weakref.WeakSet[Any] = weakref.WeakSet()  # trainers told that figures are skipped
_charted: set[str] = set()  # log folders whose layout this process wrote


def _tensorboard_logger(trainer: Any) -> Any:
    from lightning.pytorch.loggers import TensorBoardLogger

    return next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)


def has_tensorboard(trainer: Any) -> bool:
    """Whether the Trainer logs to TensorBoard (the same answer on every rank: decide with it
    whether to compute a figure's numbers collectively)."""
    return _tensorboard_logger(trainer) is not None


def why_no_writer(trainer: Any) -> str | None:
    """Why :func:`summary_writer` returns ``None`` (``None`` when it returns a writer)."""
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    # rank_zero_only.rank: the process's rank, known before the strategy sets up (CLI hooks)
    if not trainer.is_global_zero or getattr(rank_zero_only, "rank", 0) != 0:
        return "not rank zero"
    if _tensorboard_logger(trainer) is None:
        names = [type(lg).__name__ for lg in trainer.loggers]
        return f"no TensorBoardLogger among the Trainer's loggers ({', '.join(names) or 'logger=False'})"
    return None


def summary_writer(trainer: Any) -> Any:
    """The ``torch.utils.tensorboard.SummaryWriter`` of the Trainer's ``TensorBoardLogger`` on
    global rank zero; ``None`` on other ranks or without such a logger."""
    if why_no_writer(trainer) is not None:
        return None
    return _tensorboard_logger(trainer).experiment


def log_figure(trainer: Any, tag: str, draw: Callable[[], Any]) -> bool:
    """Log ``draw()`` (a matplotlib ``Figure``) under ``tag`` at the current global step, on rank
    zero only; ``draw`` is not called without a TensorBoard writer (one info line per run says
    so). Returns whether the image was logged."""
    writer = summary_writer(trainer)
    if writer is None:
        if trainer.is_global_zero and trainer not in _told:
            from lightning.pytorch.utilities.rank_zero import rank_zero_info

            _told.add(trainer)
            rank_zero_info(f"litplug: TensorBoard figures skipped: {why_no_writer(trainer)}")
        return False
    from .figures import to_image

    writer.add_image(tag, to_image(draw()), trainer.global_step, dataformats="HWC")
    return True


def has_tag(log_dir: str, tag: str) -> bool:
    """Whether an event file directly in ``log_dir`` holds a summary under ``tag`` (read with
    TensorBoard's own event-file loader)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    for path in sorted(glob.glob(os.path.join(log_dir, "*tfevents*"))):
        for event in EventFileLoader(path).Load():
            if event.HasField("summary") and any(v.tag == tag for v in event.summary.value):
                return True
    return False


def _written_before(writer: Any, tag: str) -> bool:
    """Whether ``tag`` is already in the writer's folder (a run resumed into the folder it logged to)."""
    writer.flush()
    return has_tag(writer.log_dir, tag)


def collect_charts(objects: list[Any]) -> dict[str, dict[str, list[str]]]:
    """Merge the ``litplug_charts`` of ``objects`` (sections in first-seen order; a chart's tag
    patterns in first-seen order without repeats)."""
    layout: dict[str, dict[str, list[str]]] = {}
    for obj in objects:
        charts: Mapping[str, Mapping[str, list[str]]] = getattr(obj, CHARTS_ATTRIBUTE, None) or {}
        for section, section_charts in charts.items():
            for title, tags in section_charts.items():
                merged = layout.setdefault(section, {}).setdefault(title, [])
                merged.extend(t for t in tags if t not in merged)
    return layout


def write_charts(trainer: Any) -> bool:
    """Write the run's custom-scalars layout (every family in use) once per log folder, on rank
    zero with a TensorBoard logger. Returns whether it wrote the layout."""
    writer = summary_writer(trainer)
    if writer is None or os.path.abspath(writer.log_dir) in _charted:
        return False
    folder = os.path.abspath(writer.log_dir)
    _charted.add(folder)
    layout = collect_charts([trainer.lightning_module, *trainer.callbacks])
    if not layout or _written_before(writer, LAYOUT_TAG):
        return False
    writer.add_custom_scalars({s: {t: ["Multiline", tags] for t, tags in c.items()} for s, c in layout.items()})
    writer.flush()
    return True


def write_best(trainer: Any) -> dict[str, float]:
    """Log the best value of every metric a ``ModelCheckpoint`` or ``EarlyStopping`` monitors as
    the scalar ``best/<metric>`` (a metric column of the HPARAMS table), on rank zero."""
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    best: dict[str, float] = {}
    for cb in trainer.callbacks:
        score = None
        if isinstance(cb, ModelCheckpoint) and cb.monitor:
            score = cb.best_model_score
        elif isinstance(cb, EarlyStopping) and cb.monitor:
            score = cb.best_score
        if score is not None and math.isfinite(float(score)) and cb.monitor not in best:
            best[cb.monitor] = float(score)
    writer = summary_writer(trainer)
    if writer is not None and best:
        closed = writer.file_writer is None  # the logger was finalized: add_scalar reopens it
        for name, value in best.items():
            writer.add_scalar(f"best/{name}", value, trainer.global_step)
        writer.close() if closed else writer.flush()
    return best


def flatten_config(config: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Scalar]:
    """The config values that differ from their defaults, as ``{"dotted.key": scalar}``.

    ``defaults`` holds the defaults of plain keys (``trainer``, ``seed_everything``, ...); the
    arguments of a ``class_path``/``init_args`` node are compared with the class signature's
    defaults (overlaid with the default node's ``init_args`` when it names the same class). A node
    gives its short class name under its own key (``model: Classifier``) and its arguments under
    it (``model.optimizer.lr``); a list of nodes (``trainer.callbacks``) gives the names joined by
    ``+`` and each node's arguments under ``<key>.<ClassName>``. Lists and ``None`` become strings.
    The ``config`` key (the files read) is left out.

    Example:
        >>> from litplug.board import flatten_config
        >>> flatten_config({"model": {"class_path": "torch.nn.Linear", "init_args": {"in_features": 4,
        ...     "out_features": 2, "bias": True}}, "seed_everything": 0}, {"seed_everything": True})
        {'model': 'Linear', 'model.in_features': 4, 'model.out_features': 2, 'seed_everything': 0}
    """
    out: dict[str, Scalar] = {}
    _flatten(out, "", {k: v for k, v in config.items() if k != "config"}, defaults)
    return out


def saved_hparams(obj: Any, prefix: str) -> dict[str, Scalar]:
    """The hyper-parameters that ``obj`` (a LightningModule or LightningDataModule) saves for its
    loggers (``save_hyperparameters()``; none with ``logger=False``) and that differ from its
    constructor's defaults, as ``{"prefix.key": scalar}``, flattened as :func:`flatten_config`
    flattens a config node. LightningCLI's own entries (``_class_path``, ``_instantiator``) are
    left out.

    Example:
        >>> from lightning.pytorch import LightningModule
        >>> class Net(LightningModule):
        ...     def __init__(self, width: int = 4, opt: dict | None = None, note: str = "x"):
        ...         super().__init__()
        ...         self.save_hyperparameters()
        >>> saved_hparams(Net(width=8, opt={"lr": 0.1}), "model")
        {'model.width': 8, 'model.opt.lr': 0.1}
    """
    from .plumbing.third_party_private import logs_hparams

    if not logs_hparams(obj):
        return {}
    defaults = signature_defaults(type(obj))
    out: dict[str, Scalar] = {}
    for key, value in obj.hparams_initial.items():
        if key not in ("_class_path", "_instantiator"):
            _flatten(out, f"{prefix}.{key}", value, defaults.get(key, _MISSING))
    return out


def _flatten(out: dict[str, Scalar], prefix: str, value: Any, default: Any) -> None:
    if _is_node(value):
        _flatten_node(out, prefix, value, default)
    elif isinstance(value, Sequence) and not isinstance(value, str) and value and all(_is_node(v) for v in value):
        names = [_short(v["class_path"]) for v in value]
        default_names = [_short(v["class_path"]) for v in default] if isinstance(default, Sequence) else []
        if names != default_names:
            out[prefix] = "+".join(names)
        seen: dict[str, int] = {}
        for node, name in zip(value, names):
            seen[name] = seen.get(name, 0) + 1
            key = f"{prefix}.{name}" + (f"#{seen[name]}" if seen[name] > 1 else "")
            _flatten_node(out, key, node, None, emit_class=False)
    elif isinstance(value, Mapping):
        default = default if isinstance(default, Mapping) else {}
        for k, v in value.items():
            _flatten(out, f"{prefix}.{k}" if prefix else str(k), v, default.get(k, _MISSING))
    elif _differs(value, default):
        out[prefix] = _scalar(value)


def _flatten_node(out: dict[str, Scalar], prefix: str, node: Mapping[str, Any], default: Any, emit_class=True) -> None:
    same_class = _is_node(default) and default["class_path"] == node["class_path"]
    if emit_class and not same_class:
        out[prefix] = _short(node["class_path"])
    defaults = _class_defaults(node["class_path"])
    if same_class:
        defaults.update(default.get("init_args") or {})
    for k, v in (node.get("init_args") or {}).items():
        _flatten(out, f"{prefix}.{k}", v, defaults.get(k, _MISSING))


def _is_node(value: Any) -> bool:
    return isinstance(value, Mapping) and isinstance(value.get("class_path"), str)


def _short(class_path: str) -> str:
    return class_path.rsplit(".", 1)[-1]


def _class_defaults(class_path: str) -> dict[str, Any]:
    module, _, name = class_path.rpartition(".")
    try:
        return signature_defaults(getattr(importlib.import_module(module), name))
    except (ImportError, AttributeError):
        return {}


def signature_defaults(cls: Any) -> dict[str, Any]:
    """``{argument: default}`` of ``cls``'s constructor (arguments without a default left out)."""
    try:
        params = inspect.signature(cls).parameters.values()
    except (TypeError, ValueError):
        return {}
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}


def _normal(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_normal(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _normal(v) for k, v in value.items()}
    return value


def _differs(value: Any, default: Any) -> bool:
    try:
        return bool(_normal(value) != _normal(default))
    except (RuntimeError, TypeError, ValueError):  # a tensor or array of several elements
        return True


def _scalar(value: Any) -> Scalar:
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):  # a 0-d tensor or numpy scalar
        value = value.item()
    if isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return str(_normal(value))
    return str(value)


def write_hparams(
    trainer: Any,
    hparams: Mapping[str, Scalar],
    model: Any = None,
    datamodule: Any = None,
) -> bool:
    """Write the hparams plugin's session start (``hparams``) into the run's own folder, once per
    folder, on rank zero; call it before ``fit`` so that a running or failed run is listed too.

    The hyper-parameters that ``model`` and ``datamodule`` save for the loggers
    (``save_hyperparameters()``) join the session under ``model.`` and ``data.``
    (:func:`saved_hparams`; their values win over a key of ``hparams`` with the
    same name). The session is the run's only one: the Trainer's ``TensorBoardLogger`` writes its
    ``hparams.yaml`` as always, but no session of its own (a second session in the folder, with an
    experiment summary that TensorBoard would take as the HPARAMS table's columns for every run
    under the log directory).

    No experiment summary is written: TensorBoard builds the HPARAMS table's columns from every
    run's session in the folder (hyper-parameters) and from their scalars (the metric values: the
    last value of every scalar, and ``best/<metric>`` of :func:`write_best`); an experiment summary
    of one run would hide the keys of the others. Returns whether it wrote.
    """
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.plugins.hparams import metadata, plugin_data_pb2

    from .plumbing.third_party_private import no_hparams_session

    logger = _tensorboard_logger(trainer)
    if logger is not None:
        no_hparams_session(logger)
    writer = summary_writer(trainer)
    if writer is None or _written_before(writer, SESSION_START_TAG):
        return False
    hparams = {
        **hparams,
        **(saved_hparams(model, "model") if model is not None else {}),
        **(saved_hparams(datamodule, "data") if datamodule is not None else {}),
    }
    start = plugin_data_pb2.SessionStartInfo(start_time_secs=time.time())
    for key, value in hparams.items():
        if isinstance(value, bool):
            start.hparams[key].bool_value = value
        elif isinstance(value, (int, float)):
            start.hparams[key].number_value = value
        else:
            start.hparams[key].string_value = str(value)
    content = metadata.create_summary_metadata(plugin_data_pb2.HParamsPluginData(session_start_info=start))
    writer.file_writer.add_summary(Summary(value=[Summary.Value(tag=SESSION_START_TAG, metadata=content)]))
    writer.flush()
    return True
