"""The ``litplug`` command: LightningCLI with litplug's classes resolvable by short name.

    litplug fit --config configs/digits/classifier.yaml
    litplug fit --config configs/digits/classifier.yaml --config configs/callbacks/ema.yaml
    litplug test --config runs/litplug/version_0/config.yaml --ckpt_path best
    litplug compare runs/          # one table of the runs: differing hparams, final metrics

``model`` and ``data`` are in subclass mode (any LightningModule / LightningDataModule by
``class_path``); the default logger is TensorBoard under ``runs/``; the saved ``config.yaml`` is
overwritten when a run reuses a log folder. Every ``fit`` writes the TensorBoard hparams of the run
(the config values that differ from the defaults) when it ends; ``litplug compare`` reads them
back (:mod:`litplug.compare`).

A ``--config`` path under ``configs/`` that does not exist in the working directory is read from
the configs shipped inside the installed package, so ``litplug fit --config
configs/digits/classifier.yaml`` runs from any directory.

Errors in the user's input (a bad value or type, an unknown class name, a YAML error or a missing
``--config`` file, a missing or unreadable ``--ckpt_path``) are printed by the ``litplug``
command in a few lines on stderr, with exit status 2; ``--debug`` (or ``LITPLUG_DEBUG=1``) shows
the full traceback instead. Errors raised while training keep their traceback.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
import zipfile
from argparse import ArgumentError
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningCLI

# Imported for their side effect: jsonargparse resolves `class_path: EMA` among loaded subclasses.
import litplug.callbacks  # noqa: F401
import litplug.datamodules  # noqa: F401
import litplug.modules  # noqa: F401
from litplug.callbacks.hooks import ended_ranks
from litplug.plumbing import end_distributed_run

PACKAGE_DIR = Path(__file__).resolve().parent
SHIPPED_CONFIGS = PACKAGE_DIR / "configs"
SUBCOMMANDS = ("fit", "validate", "test", "predict")
# Lightning's own values of --ckpt_path, resolved by the Trainer.
_CKPT_KEYWORDS = ("best", "last", "hpc", "registry")

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
        if usage_errors:
            quiet = {"exit_on_error": False}
            kwargs["parser_kwargs"] = {
                **quiet,
                **{s: dict(quiet) for s in SUBCOMMANDS},
                **kwargs.get("parser_kwargs", {}),
            }
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
        if self.usage_errors:
            check_config_files(args)
        try:
            self.config = parser.parse_args(args)
        except ArgumentError as err:
            if not self.usage_errors:
                raise
            raise UsageError(explain_parse_error(str(err))) from err

    def _parse_ckpt_path(self) -> None:
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path:
            check_checkpoint(str(ckpt_path))
        try:
            super()._parse_ckpt_path()
        except Exception as err:
            raise UsageError(f"--ckpt_path {ckpt_path}: cannot be loaded ({type(err).__name__}: {err})") from err

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except Exception as err:
            if not self.usage_errors:
                raise
            raise UsageError(explain_construction_error(err)) from err
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
            if type(self.datamodule).test_dataloader is not LightningDataModule.test_dataloader:
                self.trainer.test(self.model, datamodule=self.datamodule)
        self._write_best()

    def before_fit(self) -> None:
        """Write the run's hparams: the config values that differ from the defaults (see
        :mod:`litplug.board` and :func:`litplug.compare.flatten_config`)."""
        from litplug.board import write_hparams
        from litplug.compare import flatten_config

        config = self.config.get(self.subcommand, self.config)
        # LightningCLI keeps the subcommand parsers (their defaults: the Trainer's arguments with
        # `trainer_defaults`, `ckpt_path`, ...) in a private attribute; there is no public accessor.
        # Without a subcommand (`run=False`) the one parser holds them.
        parsers = getattr(self, "_subcommand_parsers", None) if self.subcommand else None
        defaults = (parsers[self.subcommand] if parsers else self.parser).get_defaults().as_dict()
        write_hparams(self.trainer, flatten_config(config.as_dict(), defaults))

    def _write_best(self) -> None:
        from litplug.board import write_best

        write_best(self.trainer)  # best/<metric> of every monitored metric: a column of the HPARAMS table


class ReportLostRanks(Callback):
    """Name the ranks that ended when a multi-process run fails (a rank killed in the middle of a
    step leaves the others with gloo's "Connection reset by peer", which names no rank)."""

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        for line in ended_ranks(trainer):
            sys.stderr.write(f"litplug: {line}; the run stopped. Resume it from its last checkpoint.\n")


# ----------------------------------------------------------------------------- input checks
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


def check_config_files(args: list[str]) -> None:
    """Every ``--config`` file exists and is valid YAML; else a :class:`UsageError` naming the
    file, line and column. (jsonargparse reports YAML errors without the file name.)"""
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
            yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            at = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = " ".join(
                str(x) for x in (getattr(err, "problem", None), getattr(err, "context", None)) if x
            ) or str(err)
            raise UsageError(f"--config {value}{at}: YAML syntax error: {problem}") from err


def check_checkpoint(ckpt_path: str) -> None:
    """A ``--ckpt_path`` file exists and its archive is complete (an interrupted save leaves a
    truncated file); Lightning's keywords (``best``, ``last``, ...) and URLs are left to the Trainer."""
    if ckpt_path in _CKPT_KEYWORDS or "://" in ckpt_path:
        return
    path = Path(ckpt_path)
    if not path.is_file():
        raise UsageError(f"--ckpt_path {ckpt_path}: no such file (working directory {Path.cwd()})")
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:1] == b"\x80":  # torch's legacy (pickle) format, before PyTorch 1.6: left to torch.load
        return
    try:
        with zipfile.ZipFile(path) as archive:
            if not any(name.endswith("data.pkl") for name in archive.namelist()):
                raise zipfile.BadZipFile("no data.pkl record")
    except zipfile.BadZipFile as err:
        size = path.stat().st_size
        raise UsageError(
            f"--ckpt_path {ckpt_path}: not a complete checkpoint ({size} bytes; {err}); the file is truncated or "
            "not written by torch.save. Resume from an earlier checkpoint."
        ) from err


# ----------------------------------------------------------------------------- error messages
def registered_names(key: str) -> list[str]:
    """Short class names the CLI resolves for the config ``key`` (for "did you mean")."""
    import lightning.pytorch.callbacks as pl_callbacks
    import lightning.pytorch.loggers as pl_loggers
    import torch

    leaf = key.split(".")[-1]
    if leaf == "callbacks":
        groups = [litplug.callbacks.__all__, pl_callbacks.__all__]
    elif leaf == "model":
        groups = [[n for n in litplug.modules.__all__ if isinstance(getattr(litplug.modules, n), type)]]
    elif leaf == "data" or leaf == "datamodule":
        groups = [litplug.datamodules.__all__]
    elif leaf == "logger":
        groups = [pl_loggers.__all__]
    elif leaf in ("optimizer", "lr_scheduler"):
        groups = [
            [n for n in dir(torch.optim) if n[:1].isupper()],
            [n for n in dir(torch.optim.lr_scheduler) if n[:1].isupper()],
        ]
    else:
        groups = [litplug.callbacks.__all__, litplug.modules.__all__, litplug.datamodules.__all__]
    return sorted({n for g in groups for n in g})


def suggest(value: str, names: list[str]) -> str:
    """``"; did you mean EMA?"`` or ``""``."""
    leaf = value.rsplit(".", 1)[-1]
    lowered = {n.lower(): n for n in names}
    close = [lowered[m] for m in difflib.get_close_matches(leaf.lower(), list(lowered), n=3, cutoff=0.6)]
    return f"; did you mean {' or '.join(close)}?" if close else ""


def explain_parse_error(message: str) -> str:
    """A few lines from jsonargparse's message: the argument, what was wrong, what is allowed."""
    key_match = re.match(r'Parser key "([^"]+)":', message)
    key = key_match.group(1) if key_match else None
    unknown = re.search(r"Expected a dot import path string: (\S+)", message) or re.search(
        r"Import path (\S+) does not correspond", message
    )
    if key and unknown:
        value = unknown.group(1)
        names = registered_names(key)
        ours = [n for n in names if n in _litplug_names()] or names
        return (
            f"--{key}: unknown class {value!r}{suggest(value, names)}\n"
            f"  accepted: a short class name ({', '.join(ours[:10])}{', ...' if len(ours) > 10 else ''}) "
            "or a full import path"
        )
    nested = re.search(r"Problem with given class_path '([^']+)':\s*Parser key \"([^\"]+)\":\s*(.+)", message)
    if key and nested:
        cls, arg, problem = nested.group(1), nested.group(2), nested.group(3).strip()
        return f"--{key}: {cls.rsplit('.', 1)[-1]}: `{arg}`: {_types_in_words(problem)}"
    option = re.search(r"Problem with given class_path '([^']+)':\s*(.+)", message)
    if key and option:
        return f"--{key}: {option.group(1).rsplit('.', 1)[-1]}: {option.group(2).strip()}"
    if key:
        expected = re.findall(r"Expected a <class '([\w.]+)'>", message)
        given = re.search(r"Given value: (.*)", message)
        if expected and given:
            return f"--{key}: expected {' or '.join(dict.fromkeys(expected))}, got {given.group(1).strip()!r}"
        body = [line.strip() for line in message.splitlines()[1:] if line.strip()]
        return f"--{key}: " + " ".join(body[:2])
    if message.startswith("unrecognized arguments"):
        return f"{message}\n  accepted: see `litplug fit --help`"
    return "\n".join(message.splitlines()[:4])


def _litplug_names() -> set[str]:
    return {*litplug.callbacks.__all__, *litplug.modules.__all__, *litplug.datamodules.__all__}


def _types_in_words(problem: str) -> str:
    """``Expected a <class 'int'>. Got value: ten`` -> ``expected int, got 'ten'``."""
    match = re.match(r"Expected a <class '([\w.]+)'>\. Got value: (.*)", problem)
    if match:
        return f"expected {match.group(1)}, got {match.group(2).strip()!r}"
    return re.sub(r"<class '([\w.]+)'>", r"\1", problem)


def explain_construction_error(err: BaseException) -> str:
    """The constructor's own message (the outermost error of the chain not raised by
    jsonargparse's type adaptation), with the class whose ``__init__`` raised it."""
    chain: list[BaseException] = []
    e: BaseException | None = err
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or e.__context__
    own = [e for e in chain if not _raised_in(e, ("jsonargparse", os.path.join("lightning", "pytorch", "cli.py")))]
    chosen = own[0] if own else chain[-1]
    owner = _raising_class(chosen.__traceback__)
    return f"{owner + ': ' if owner else ''}{chosen}"


def _raised_in(err: BaseException, places: tuple[str, ...]) -> bool:
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and any(p in tb.tb_frame.f_code.co_filename for p in places)


def _raising_class(tb: TracebackType | None) -> str | None:
    """Name of the public class whose ``__init__`` is the innermost constructor frame of ``tb``."""
    name = None
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_name == "__init__" and "self" in frame.f_locals:
            cls = type(frame.f_locals["self"]).__name__
            if not cls.startswith("_"):
                name = cls
        tb = tb.tb_next
    return name


def debug_requested(args: list[str]) -> bool:
    return "--debug" in args or os.environ.get("LITPLUG_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def main(args: Any = None) -> None:
    """Entry point of the ``litplug`` console script; ``args`` as in ``LightningCLI`` (default
    ``sys.argv[1:]``). ``--debug`` anywhere in ``args`` (or ``LITPLUG_DEBUG=1``) shows tracebacks
    of input errors; without it they are printed in a few lines and the exit status is 2."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv[:1] == ["compare"]:
        from litplug.compare import main as compare_main

        raise SystemExit(compare_main(argv[1:]))
    debug = debug_requested(argv)
    argv = [a for a in argv if a != "--debug"]
    if debug:
        LitplugCLI(args=argv)
    else:
        try:
            LitplugCLI(args=argv, usage_errors=True)
        except UsageError as err:
            sys.stderr.write(f"litplug: error: {err}\n(add --debug or set LITPLUG_DEBUG=1 for the full traceback)\n")
            raise SystemExit(2) from None
    end_distributed_run()


if __name__ == "__main__":
    main()
