"""``litplug compare RUNS``: one table of the runs under a folder, read from their event files.

    litplug compare runs/
    litplug compare runs/ --markdown runs.md --csv runs.csv --metrics 'test/*' 'best/*'
    python -m litplug.compare runs/

A run is a folder holding TensorBoard event files (``runs/litplug/version_0``, ...), read with
TensorBoard's own ``EventAccumulator``. One row per run: its name (the folder under RUNS), the
hyper-parameters that differ between the runs (every ``litplug fit`` writes the config values
that differ from the defaults and the hyper-parameters the model and datamodule save as the
hparams plugin's session, see :func:`litplug.board.flatten_config` and
:func:`litplug.board.saved_hparams`), and the last value of every metric matching ``--metrics``.
A key a run does not set is shown empty.

Example:
    >>> from litplug.compare import format_table
    >>> print(format_table(["run", "model.lr"], [["version_0", 0.01], ["version_1", ""]]))
    run        model.lr
    ---------  --------
    version_0  0.01
    version_1
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import io
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .board import Scalar

__all__ = ["Run", "compare", "format_table", "main", "read_run", "to_markdown"]

DEFAULT_METRICS = ("test/*", "val/*", "best/*", "*/test/*", "*/val/*")


# ----------------------------------------------------------------------------- event files
class Run:
    """One run folder: ``name``, ``hparams`` (from the hparams plugin's session) and ``metrics``
    (the last value of every scalar tag)."""

    def __init__(self, name: str, hparams: dict[str, Scalar], metrics: dict[str, float]) -> None:
        self.name = name
        self.hparams = hparams
        self.metrics = metrics

    def __repr__(self) -> str:
        return f"Run({self.name!r}, {len(self.hparams)} hparams, {len(self.metrics)} metrics)"


def read_run(path: str | os.PathLike[str], name: str | None = None) -> Run:
    """Read one run folder's event files with TensorBoard's ``EventAccumulator``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata

    acc = EventAccumulator(str(path), size_guidance={"scalars": 1, "images": 1, "histograms": 1, "tensors": 1})
    acc.Reload()
    hparams: dict[str, Scalar] = {}
    try:
        content = acc.PluginTagToContent(metadata.PLUGIN_NAME)
    except KeyError:  # no hparams in this run
        content = {}
    if metadata.SESSION_START_INFO_TAG in content:
        start = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
        for key, value in start.hparams.items():
            kind = value.WhichOneof("kind")
            got = getattr(value, kind) if kind in ("number_value", "string_value", "bool_value") else ""
            hparams[key] = int(got) if kind == "number_value" and float(got).is_integer() else got
    metrics = {tag: acc.Scalars(tag)[-1].value for tag in acc.Tags()["scalars"]}
    return Run(name if name is not None else str(path), hparams, metrics)


def find_runs(root: str | os.PathLike[str]) -> list[Path]:
    """Every folder at or under ``root`` that holds an event file, sorted."""
    root = Path(root)
    return sorted({p.parent for p in root.rglob("*tfevents*") if p.is_file()})


def compare(
    root: str | os.PathLike[str], metrics: Sequence[str] = DEFAULT_METRICS
) -> tuple[list[str], list[list[Scalar]]]:
    """``(columns, rows)``: ``run``, the hyper-parameters differing between the runs under
    ``root`` (all of them for a single run), then the metrics matching the ``metrics`` patterns."""
    root = Path(root)
    runs = [read_run(p, p.relative_to(root).as_posix() if p != root else p.name) for p in find_runs(root)]
    keys = sorted({k for r in runs for k in r.hparams})
    if len(runs) > 1:
        keys = [k for k in keys if len({repr(r.hparams.get(k, "")) for r in runs}) > 1]
    tags = sorted({t for r in runs for t in r.metrics if any(fnmatch.fnmatchcase(t, m) for m in metrics)})
    rows = [[r.name, *(r.hparams.get(k, "") for k in keys), *(r.metrics.get(t, "") for t in tags)] for r in runs]
    return ["run", *keys, *tags], rows


# ----------------------------------------------------------------------------- output
def _cell(value: Scalar) -> str:
    if isinstance(value, float) and not isinstance(value, bool):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def format_table(columns: Sequence[str], rows: Sequence[Sequence[Scalar]]) -> str:
    """A plain-text table, columns aligned."""
    cells = [list(columns), *[[_cell(v) for v in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def to_markdown(columns: Sequence[str], rows: Sequence[Sequence[Scalar]]) -> str:
    """A GitHub-flavoured Markdown table (``|`` in values escaped)."""

    def line(values: Sequence[str]) -> str:
        return "| " + " | ".join(v.replace("|", "\\|") for v in values) + " |"

    body = [line([_cell(v) for v in row]) for row in rows]
    return "\n".join([line(list(columns)), line(["---"] * len(columns)), *body]) + "\n"


def to_csv(columns: Sequence[str], rows: Sequence[Sequence[Scalar]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(rows)
    return buffer.getvalue()


def main(argv: Sequence[str] | None = None) -> int:
    """``litplug compare RUNS [--markdown PATH] [--csv PATH] [--metrics PATTERN ...]``; exit status
    2 when RUNS holds no run."""
    parser = argparse.ArgumentParser(prog="litplug compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", help="folder holding the runs' TensorBoard event files (searched recursively)")
    parser.add_argument("--markdown", metavar="PATH", help="also write the table as Markdown to PATH")
    parser.add_argument("--csv", metavar="PATH", help="also write the table as CSV to PATH")
    parser.add_argument(
        "--metrics",
        nargs="+",
        default=list(DEFAULT_METRICS),
        metavar="PATTERN",
        help=f"scalar tags shown (shell patterns; default: {' '.join(DEFAULT_METRICS)})",
    )
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if not Path(args.runs).is_dir():
        parser.exit(2, f"litplug compare: error: {args.runs}: no such folder\n")
    columns, rows = compare(args.runs, args.metrics)
    if not rows:
        parser.exit(2, f"litplug compare: error: no TensorBoard event files under {args.runs}\n")
    print(format_table(columns, rows))
    if args.markdown:
        Path(args.markdown).write_text(to_markdown(columns, rows))
    if args.csv:
        Path(args.csv).write_text(to_csv(columns, rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
