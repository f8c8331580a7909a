"""The ``litplug`` command: LightningCLI with litplug's classes resolvable by short name.

    litplug fit --config configs/digits/main.yaml
    litplug fit --config configs/digits/classifier.yaml --config configs/callbacks/ema.yaml
    litplug test --config runs/litplug/version_0/config.yaml --ckpt_path best
    litplug compare runs/          # one table of the runs: differing hparams, final metrics

``model`` and ``data`` are in subclass mode (any LightningModule / LightningDataModule by
``class_path``); the default logger is TensorBoard under ``runs/``; the saved ``config.yaml`` is
overwritten when a run reuses a log folder. Every run (``fit``, ``validate``, ``test``,
``predict``) writes the TensorBoard hparams of the run (the config values that differ from the
defaults, and the hyper-parameters the model and datamodule save with ``save_hyperparameters()``)
when it starts, the run's only hparams session; ``litplug compare`` reads them back
(:mod:`litplug.compare`). The
working directory is on the import path, as with ``python -m``, so ``--model mymodels.Net``
imports ``mymodels.py`` from it.

A ``--config`` path under ``configs/`` that does not exist in the working directory is read from
the configs shipped inside the installed package, so ``litplug fit --config
configs/digits/main.yaml`` runs from any directory.

Errors in the user's input are printed by the ``litplug`` command in a few lines on stderr, with
exit status 2; ``--debug`` (or ``LITPLUG_DEBUG=1``) shows the full traceback instead. Each message
is built from structured data, never from another library's wording:

* a YAML error: the file and yaml's ``problem_mark`` (line, column);
* a ``--config`` file or ``--ckpt_path`` that is missing or truncated, a checkpoint written by
  another class: checked here before Lightning reads them;
* an unknown class (on the command line or in a ``class_path`` of a config): resolved here, with
  "did you mean" among the loaded classes and, for an import path, where Python looked;
* a bad value or type caught by a constructor: the constructor's own ``ValueError``/``TypeError``
  and the class whose ``__init__`` raised it, read from the traceback;
* anything else jsonargparse rejects: the innermost of its ``ArgumentError`` messages, as it is.

Errors raised while training keep their traceback.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import sys
import typing
import zipfile
from argparse import ArgumentError
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
import yaml
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import Logger
from lightning.pytorch.plugins.precision import DoublePrecision
from lightning.pytorch.utilities.model_helpers import is_overridden

# Imported for their side effect: jsonargparse resolves `class_path: EMA` among loaded subclasses.
from . import callbacks, datamodules, modules  # noqa: F401
from .loading import load_file
from .plumbing import end_distributed_run, ended_ranks, rank_processes

PACKAGE_DIR = Path(__file__).resolve().parent
SHIPPED_CONFIGS = PACKAGE_DIR / "configs"
SUBCOMMANDS = ("fit", "validate", "test", "predict")
# Lightning's own values of --ckpt_path, resolved by the Trainer.
_CKPT_KEYWORDS = ("best", "last", "hpc", "registry")
# Command-line keys whose value is a class (a short name or an import path).
_CLASS_KEYS = {
    "model": LightningModule,
    "data": LightningDataModule,
    "trainer.callbacks": Callback,
    "trainer.logger": Logger,
}

DESCRIPTION = (
    "litplug: research training methods (EMA/SWA, SAM, IGNITE, certified training, unlearning, model "
    "merging) as PyTorch Lightning plugins, composed in YAML. `litplug fit --config a.yaml --config "
    "b.yaml` trains; short class names (EMA, SAM, Classifier, Digits) resolve; the working directory is on "
    "the import path (`--model mymodels.Net` imports mymodels.py from it). Input errors print in a few "
    "lines (exit status 2); --debug shows the traceback."
)

DEFAULT_LOGGER = {
    "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
    "init_args": {"save_dir": "runs", "name": "litplug"},
}


class UsageError(ValueError):
    """An error in the user's input to the ``litplug`` command: a short message, no traceback."""


class LitplugCLI(LightningCLI):
    """LightningCLI with litplug's defaults (see module docstring).

    Args:
        usage_errors: raise every error in the user's input (parsing, YAML, constructing the
            classes, ``--ckpt_path``) as a :class:`UsageError` with a short message (what
            :func:`main` prints), instead of jsonargparse's usage text and exit.
    """

    def __init__(self, args: Any = None, run: bool = True, usage_errors: bool = False, **kwargs: Any) -> None:
        trainer_defaults = {"logger": DEFAULT_LOGGER, **kwargs.pop("trainer_defaults", {})}
        save_config_kwargs = {"overwrite": True, **kwargs.pop("save_config_kwargs", {})}
        self.usage_errors = usage_errors
        parser_kwargs: dict[str, Any] = {"description": DESCRIPTION}
        if usage_errors:
            quiet = {"exit_on_error": False}
            parser_kwargs.update(quiet, **{s: dict(quiet) for s in SUBCOMMANDS})
        kwargs["parser_kwargs"] = {**parser_kwargs, **kwargs.get("parser_kwargs", {})}
        super().__init__(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            trainer_defaults=trainer_defaults,
            save_config_kwargs=save_config_kwargs,
            auto_configure_optimizers=False,  # modules own their optimizer via OptimizerCallable
            args=args,
            run=run,
            **kwargs,
        )

    def parse_arguments(self, parser: Any, args: Any) -> None:
        if isinstance(args, dict) or hasattr(args, "as_dict"):  # a dict or Namespace
            return super().parse_arguments(parser, args)
        args = resolve_shipped_configs(list(sys.argv[1:] if args is None else args))
        configs = read_configs(args) if self.usage_errors else []
        if self.usage_errors:
            for value, config in configs:
                check_class_paths(config, f"--config {value}: ")
            check_command_line_classes(args)
        try:
            self.config = parser.parse_args(args)
        except ArgumentError as err:
            if not self.usage_errors:
                raise
            raise UsageError(reproduce_parse_error(args, [c for _, c in configs]) or explain_parse_error(err)) from err
        if self.usage_errors:
            check_checkpoint(self.config)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except Exception as err:
            if not self.usage_errors:
                raise
            config = self.config.get(self.config.get("subcommand") or "", self.config)
            raise UsageError(
                explain_construction_error(err) or reproduce_construction_error(config) or str(err)
            ) from err
        self.trainer.callbacks.append(ReportLostRanks())

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=True,
            help="After `fit`, run `test` on the final weights when the datamodule has a test set.",
        )

    def after_fit(self) -> None:
        config = self.config.get(self.subcommand, self.config)
        if config.get("test_after_fit", True) and self.datamodule is not None:
            # an instance attribute counts: wrappers (Indexed, NoisyLabels) set the wrapped datamodule's loader
            if is_overridden("test_dataloader", self.datamodule, LightningDataModule):
                self.trainer.test(self.model, datamodule=self.datamodule)
        self._write_best()

    def before_fit(self) -> None:
        """Write the run's hparams: the config values that differ from the defaults (see
        :mod:`litplug.board` and :func:`litplug.board.flatten_config`), the hyper-parameters
        the model and datamodule save for the loggers, and ``subcommand`` for a run other than
        ``fit``; under ``64-true``, convert the model before ``--ckpt_path`` is
        restored into it."""
        from .board import flatten_config, write_hparams
        from .plumbing.third_party_private import subcommand_defaults

        self._convert_before_restore()

        config = self.config.get(self.subcommand, self.config)
        hparams = flatten_config(config.as_dict(), subcommand_defaults(self, self.subcommand))
        if self.subcommand not in (None, "fit"):
            hparams = {"subcommand": self.subcommand, **hparams}
        write_hparams(self.trainer, hparams, self.model, self.datamodule)

    before_validate = before_test = before_predict = before_fit

    def _convert_before_restore(self) -> None:
        """Give the model float64 parameters before Lightning restores ``--ckpt_path`` into it when
        the precision is ``64-true``: Lightning restores the weights before its precision plugin
        converts the module, so a model built in float32 would round the checkpoint's float64
        weights to float32 on the way in."""
        if isinstance(self.trainer.precision_plugin, DoublePrecision):
            self.trainer.precision_plugin.convert_module(self.model)

    def _write_best(self) -> None:
        from .board import write_best

        write_best(self.trainer)  # best/<metric> of every monitored metric: a column of the HPARAMS table


class ReportLostRanks(Callback):
    """Name the ranks whose process ended when a multi-process run fails (a rank killed in the
    middle of a step leaves the others with gloo's "Connection reset by peer", which names no
    rank), whichever launcher started them: every rank learns the others' process ids at setup."""

    def __init__(self) -> None:
        self.processes: list[tuple[str, int]] = []

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if trainer.world_size > 1:
            self.processes = rank_processes()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        for line in ended_ranks(self.processes) if self.processes else []:
            sys.stderr.write(f"litplug: {line}; the run stopped. Resume it from its last checkpoint.\n")


# ----------------------------------------------------------------------------- config files
def resolve_shipped_configs(args: list[str]) -> list[str]:
    """Point ``--config configs/...`` at the package's shipped configs when the path does not
    exist relative to the working directory."""
    out = list(args)
    for i, (flag, value) in _config_arguments(out):
        path = Path(value)
        if not path.exists() and path.parts[:1] == ("configs",) and (PACKAGE_DIR / path).is_file():
            resolved = str(PACKAGE_DIR / path)
            out[i] = resolved if flag is None else f"{flag}={resolved}"
    return out


def _config_arguments(args: list[str]) -> list[tuple[int, tuple[str | None, str]]]:
    """``(index, (flag or None, value))`` of every ``--config`` / ``-c`` value in ``args``."""
    found = []
    for i, arg in enumerate(args):
        for flag in ("--config", "-c"):
            if arg == flag and i + 1 < len(args):
                found.append((i + 1, (None, args[i + 1])))
            elif arg.startswith(flag + "="):
                found.append((i, (flag, arg[len(flag) + 1 :])))
    return found


def read_configs(args: list[str]) -> list[tuple[str, Any]]:
    """``(value, parsed YAML)`` of every ``--config`` file; a :class:`UsageError` naming the file
    (and yaml's line and column) for a missing file or a YAML error."""
    out = []
    for _, (_, value) in _config_arguments(args):
        if any(c in value for c in "\n{:") and not Path(value).exists():
            continue  # inline YAML, e.g. --config '{trainer: {max_epochs: 1}}'
        path = Path(value)
        if not path.is_file():
            shipped = path.parts[:1] == ("configs",)
            where = (
                f"in {Path.cwd()} nor among the configs shipped in {SHIPPED_CONFIGS}"
                if shipped
                else f"(working directory {Path.cwd()})"
            )
            folder = path.parent if path.parent.is_dir() or not shipped else PACKAGE_DIR / path.parent
            names = [f.name for f in folder.glob("*.yaml")] if folder.is_dir() else []
            close = difflib.get_close_matches(path.name, names, n=1, cutoff=0.6)
            hint = f"; did you mean {(path.parent / close[0]).as_posix()}?" if close else ""
            raise UsageError(f"--config {value}: no such file {where}{hint}")
        try:
            out.append((value, yaml.safe_load(path.read_text())))
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            at = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = " ".join(str(x) for x in (getattr(err, "problem", None), getattr(err, "context", None)) if x)
            raise UsageError(f"--config {value}{at}: YAML syntax error: {problem or type(err).__name__}") from err
    return out


# ----------------------------------------------------------------------------- class names
def check_class_paths(config: Any, where: str) -> None:
    """Resolve every ``class_path`` in a parsed config; a :class:`UsageError` naming the key for
    the first that does not resolve."""
    for key, value in _class_paths(config, ""):
        if isinstance(value, str):
            resolve_class(value, f"{where}{key}")


def _class_paths(node: Any, key: str) -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        if "class_path" in node:
            yield f"{key}.class_path".lstrip("."), node["class_path"]
        for k, v in node.items():
            yield from _class_paths(v, f"{key}.{k}".lstrip(".").removesuffix("+"))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _class_paths(v, f"{key}[{i}]")


def check_command_line_classes(args: list[str]) -> None:
    """Resolve the classes named on the command line (``--model X``, ``--trainer.callbacks+=X``,
    ``--x.class_path X``)."""
    for key, value in _flag_values(args):
        if key in _CLASS_KEYS or key.endswith(".class_path"):
            if _looks_like_a_class(value):
                resolve_class(value, f"--{key}")


def _flag_values(args: list[str]) -> Iterator[tuple[str, str]]:
    """``(key, value)`` of each ``--key=value`` or ``--key value`` of the command line (the key
    without a trailing ``+``); a flag followed by another ``--`` flag has no value."""
    for i, arg in enumerate(args):
        if not arg.startswith("--"):
            continue
        flag, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                continue
            value = args[i + 1]
        yield flag.removesuffix("+"), value


def _looks_like_a_class(value: str) -> bool:
    parts = value.split(".")
    if value.lower() in ("null", "none", "true", "false") or parts[-1] in ("yaml", "yml", "json"):
        return False
    return all(p.isidentifier() for p in parts)


def resolve_class(value: str, where: str) -> type:
    """The class ``value`` names: an import path, or the short name of a loaded subclass of one
    of the types the CLI instantiates (what jsonargparse resolves). A :class:`UsageError` says
    what is wrong, with "did you mean" and, for a missing module, where Python looked."""
    if "." in value:
        module_name, _, name = value.rpartition(".")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            missing = err.name or module_name
            raise UsageError(
                f"{where}: cannot import {value!r}: no module named {missing!r} (looked in the working directory "
                f"{Path.cwd()} and in sys.path: {', '.join(p for p in sys.path if p) or 'empty'}); run litplug "
                f"from the folder that holds {missing.split('.')[0]}.py or add that folder to PYTHONPATH"
            ) from err
        found = getattr(module, name, None)
        if not inspect.isclass(found):
            names = [n for n, o in vars(module).items() if inspect.isclass(o) and not n.startswith("_")]
            raise UsageError(f"{where}: module {module_name!r} has no class {name!r}{suggest(name, names)}")
        return found
    known = loaded_classes(_base_of(where))
    if value in known:
        return known[value]
    ours = sorted(n for n in known if known[n].__module__.startswith("litplug."))
    raise UsageError(
        f"{where}: unknown class {value!r}{suggest(value, list(known))}\n"
        f"  accepted: a short class name ({', '.join(ours[:12])}{', ...' if len(ours) > 12 else ''}) "
        "or a full import path"
    )


def _base_of(where: str) -> type | None:
    """The type a key's class must have, for the suggestions: ``trainer.callbacks[0].class_path``
    names a Callback; None when the key does not say."""
    key = where.rsplit(": ", 1)[-1].lstrip("-")
    for prefix, base in _CLASS_KEYS.items():
        if key == prefix or key.startswith((f"{prefix}.class_path", f"{prefix}[")):
            return base
    return None


def loaded_classes(base: type | None = None) -> dict[str, type]:
    """Public classes by short name: every loaded subclass of ``base``, or of every type the CLI
    instantiates (modules, datamodules, callbacks, loggers, networks, optimizers, schedulers)."""
    roots = (
        (base,)
        if base is not None
        else (
            LightningModule,
            LightningDataModule,
            Callback,
            Logger,
            torch.nn.Module,
            torch.optim.Optimizer,
            torch.optim.lr_scheduler.LRScheduler,
        )
    )
    found: dict[str, type] = {}
    stack = list(roots)
    while stack:
        cls = stack.pop()
        if not cls.__name__.startswith("_"):
            found.setdefault(cls.__name__, cls)
        stack.extend(cls.__subclasses__())
    return found


def suggest(value: str, names: list[str]) -> str:
    """``"; did you mean EMA?"`` or ``""``."""
    leaf = value.rsplit(".", 1)[-1]
    lowered = {n.lower(): n for n in names}
    matches = difflib.get_close_matches(leaf.lower(), list(lowered), n=3, cutoff=0.6)
    ratios = [difflib.SequenceMatcher(None, leaf.lower(), m).ratio() for m in matches]
    close = [lowered[m] for m, r in zip(matches, ratios) if r >= max(ratios) - 0.1]
    return f"; did you mean {' or '.join(close)}?" if close else ""


# ----------------------------------------------------------------------------- checkpoints
def check_checkpoint(config: Any) -> None:
    """``--ckpt_path``: the file exists, its archive is complete (an interrupted save leaves a
    truncated file) and it was written by the class the config builds. Lightning's keywords
    (``best``, ``last``, ...) and URLs are left to the Trainer."""
    subcommand = config.get("subcommand")
    ckpt_path = config[subcommand].get("ckpt_path") if subcommand else None
    if not ckpt_path or str(ckpt_path) in _CKPT_KEYWORDS or "://" in str(ckpt_path):
        return
    path = Path(ckpt_path)
    if not path.is_file():
        raise UsageError(f"--ckpt_path {ckpt_path}: no such file (working directory {Path.cwd()})")
    with open(path, "rb") as f:
        pickle_only = f.read(1) == b"\x80"  # torch's format without a zip archive, read as it is
    if not pickle_only:
        try:
            with zipfile.ZipFile(path) as archive:
                if not any(name.endswith("data.pkl") for name in archive.namelist()):
                    raise zipfile.BadZipFile("no data.pkl record")
        except zipfile.BadZipFile as err:
            raise UsageError(
                f"--ckpt_path {ckpt_path}: not a complete checkpoint ({path.stat().st_size} bytes; {err}); the file "
                "is truncated or not written by torch.save. Resume from an earlier checkpoint."
            ) from err
    try:
        ckpt = load_file(path)  # weights_only unpickling with the globals Lightning checkpoints hold
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same user error
        raise UsageError(f"--ckpt_path {ckpt_path}: cannot be loaded ({type(err).__name__}: {err})") from err
    model = config[subcommand].get("model")
    wanted = model.get("class_path") if hasattr(model, "get") else None
    hparams = ckpt.get("hyper_parameters", {}) if isinstance(ckpt, dict) else {}
    written_by = hparams.get("_class_path")
    if wanted and written_by and written_by != wanted:
        raise UsageError(
            f"--ckpt_path {ckpt_path}: this checkpoint belongs to class {written_by}, the config builds {wanted}"
        )
    if wanted and not written_by:
        accepted = inspect.signature(resolve_class(wanted, "--model")).parameters
        takes_any = any(p.kind is p.VAR_KEYWORD for p in accepted.values())
        foreign = sorted(k for k in hparams if not k.startswith("_") and k not in accepted)
        if foreign and not takes_any:
            raise UsageError(
                f"--ckpt_path {ckpt_path}: this checkpoint belongs to another class (its hyperparameters "
                f"{', '.join(foreign)} are not arguments of {wanted})"
            )


# ----------------------------------------------------------------------------- error messages
def explain_parse_error(err: ArgumentError) -> str:
    """jsonargparse's most specific message: the innermost ``ArgumentError`` of the chain (a bad
    value inside a class's arguments rather than the union of types around it), as it is, in at
    most three lines."""
    chain = [e for e in _chain(err) if isinstance(e, ArgumentError)]
    lines = [line.strip() for line in str(chain[-1]).splitlines() if line.strip()]
    return "\n  ".join(lines[:3]) + ("\n  (see `litplug fit --help`)" if len(lines) > 3 or len(lines) == 1 else "")


def reproduce_parse_error(args: list[str], configs: list[Any] = ()) -> str | None:
    """Check each ``--<class key>.<argument>=<value>`` of the command line against the signature of
    the class it configures (the last ``--trainer.callbacks+=X`` for a callback, ``--model`` /
    ``--data`` or the configs' ``model``/``data`` for the others): an argument the class does not
    take, or a value jsonargparse cannot read as the argument's annotation (whether it reads, not
    its wording), named with the class. None when every one reads."""
    from jsonargparse import ArgumentParser

    current: dict[str, str] = {}
    for config in configs:
        for key in ("model", "data"):
            node = config.get(key) if isinstance(config, dict) else None
            if isinstance(node, dict) and isinstance(node.get("class_path"), str):
                current[key] = node["class_path"]
            elif isinstance(node, str):
                current[key] = node
    for key, value in _flag_values(args):
        if key in _CLASS_KEYS and _looks_like_a_class(value):
            current[key] = value
            continue
        for prefix in ("trainer.callbacks", "model", "data"):
            name = key.removeprefix(f"{prefix}.").removeprefix("init_args.")
            if not key.startswith(f"{prefix}.") or "." in name or prefix not in current:
                continue
            try:
                cls = resolve_class(current[prefix], f"--{prefix}")
                hints = typing.get_type_hints(cls.__init__)
            except Exception:  # noqa: BLE001 - a class that cannot be read is jsonargparse's to report
                continue
            params = inspect.signature(cls.__init__).parameters
            if name not in params and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
                accepted = [n for n in params if n != "self"]
                return f"--{key}: {cls.__name__} has no argument `{name}`{suggest(name, accepted)}"
            if name in hints:
                parser = ArgumentParser(exit_on_error=False)
                parser.add_argument("--value", type=hints[name])
                try:
                    parser.parse_args([f"--value={value}"])
                except ArgumentError:
                    return f"--{key}: {cls.__name__}: `{name}` cannot be {value!r} (expected {_type_name(hints[name])})"
    return None


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _chain(err: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    e: BaseException | None = err
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or e.__context__
    return chain


def explain_construction_error(err: BaseException) -> str | None:
    """The constructor's own message: the outermost error of the chain whose traceback runs
    through the ``__init__`` of a public class (the class that raised it, named in front); None
    when the chain holds none (jsonargparse versions that keep only the message of an error
    inside a union of types)."""
    for e in _chain(err):
        owner = _raising_class(e.__traceback__)
        if owner is not None:
            return f"{owner}: {e}"
    return None


def reproduce_construction_error(config: Any) -> str | None:
    """Construct the configured callbacks and datamodule again, one at a time, from their
    plain arguments; the first ``ValueError``/``TypeError`` a constructor raises, with its class."""
    trainer = config.get("trainer") if hasattr(config, "get") else None
    listed = (trainer.get("callbacks") if hasattr(trainer, "get") else None) or []
    for node in [*(listed if isinstance(listed, list) else [listed]), config.get("data")]:
        if not hasattr(node, "get") or not isinstance(node.get("class_path"), str):
            continue
        kwargs = node.get("init_args")
        kwargs = dict(kwargs.as_dict() if hasattr(kwargs, "as_dict") else kwargs or {})
        if any(isinstance(v, dict) and "class_path" in v for v in kwargs.values()):
            continue  # nested classes are built by jsonargparse only
        try:
            resolve_class(node["class_path"], "")(**kwargs)
        except (ValueError, TypeError) as err:
            return f"{node['class_path'].rsplit('.', 1)[-1]}: {err}"
        except Exception:  # noqa: BLE001 - any other failure is not the one being explained
            continue
    return None


def _raising_class(tb: TracebackType | None) -> str | None:
    """Name of the public class whose ``__init__`` is the innermost constructor frame of ``tb``
    (jsonargparse's and Lightning's own classes left out)."""
    name = None
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_name == "__init__" and "self" in frame.f_locals:
            cls = type(frame.f_locals["self"])
            if not cls.__name__.startswith("_") and not cls.__module__.startswith(
                ("jsonargparse", "lightning.pytorch.cli")
            ):
                name = cls.__name__
        tb = tb.tb_next
    return name


def debug_requested(args: list[str]) -> bool:
    return "--debug" in args or os.environ.get("LITPLUG_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def main(args: Any = None) -> None:
    """Entry point of the ``litplug`` console script; ``args`` as in ``LightningCLI`` (default
    ``sys.argv[1:]``). The working directory goes first on the import path, as ``python -m``
    puts it. ``--debug`` anywhere in ``args`` (or ``LITPLUG_DEBUG=1``) shows tracebacks of input
    errors; without it they are printed in a few lines and the exit status is 2."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    argv = list(sys.argv[1:] if args is None else args)
    if argv[:1] == ["compare"]:
        from .compare import main as compare_main

        raise SystemExit(compare_main(argv[1:]))
    debug = debug_requested(argv)
    argv = [a for a in argv if a != "--debug"]
    if debug:
        LitplugCLI(args=argv)
    else:
        try:
            LitplugCLI(args=argv, usage_errors=True)
        except (UsageError, ArgumentError) as err:
            message = explain_parse_error(err) if isinstance(err, ArgumentError) else str(err)
            sys.stderr.write(
                f"litplug: error: {message}\n(add --debug or set LITPLUG_DEBUG=1 for the full traceback)\n"
            )
            raise SystemExit(2) from None
    end_distributed_run()


if __name__ == "__main__":
    main()
