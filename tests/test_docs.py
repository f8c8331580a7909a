"""Every example in README.md and docs/*.md runs as written, from a fresh folder.

Each page is one test. Its fenced blocks run in the order the page shows them, in one empty
working directory, so a block may use a file that a command above it wrote:

Commands run in a child of ``forkserver`` (a clean interpreter with torch, Lightning and litplug
already imported), as the real programs would.

* ``python`` blocks run as a script (``python block.py``). A block whose first line is a comment
  starting with ``# fragment`` is a fragment and is skipped; the page must show the complete
  version beside it.
* A block (python or bash) needs an extra when the line above it says so ("need the ``offline``
  extra"); it runs when the extra's packages import and is passed over otherwise (the page's test
  skips with the reasons when nothing else on it ran).
* ``bash`` blocks: every ``litplug ...``, ``python -m litplug...`` and ``python -c ...`` line runs
  (continuation lines joined, trailing ``# comments`` dropped). ``litplug`` lines get short trainer
  settings appended (tools such as ``litplug.oracle`` their own, ``SHORT_TOOLS``), so a renamed
  config or argument fails here, not for the user. A command marked "needs MNIST on disk"
  or "needs CIFAR-10 on disk" runs on tiny files written in the real format. Setup lines (venv,
  ``pip``, ``tensorboard``, the test command, ``bash``/``python`` scripts under ``benchmarks/``) are
  the two README commands or long jobs and are not run here.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from forkserver import run_command
from harness import write_idx

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHORT = [
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=1",
    "--trainer.limit_test_batches=1",
    "--trainer.enable_progress_bar=false",
]
NOT_RUN = re.compile(
    r"^(python3? -m venv |\. |source |pip |tensorboard |python -m pytest|bash benchmarks/|python benchmarks/)"
)
# `python -m litplug.<tool>` lines run with these settings appended (the last value of an option wins).
SHORT_TOOLS = {"litplug.oracle": ["--epochs", "1"]}
EXTRA = re.compile(r"needs? the `(\w+)` extra")
TIMEOUT = 300


@dataclass
class Block:
    lang: str
    text: str
    line: int
    above: str  # the last non-blank line before the opening fence


def blocks(page: Path) -> list[Block]:
    """The fenced code blocks of ``page`` in order."""
    out: list[Block] = []
    lines = page.read_text().splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^```(\w*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        above = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        out.append(Block(m.group(1), "\n".join(lines[i + 1 : end]), i + 1, above))
        i = end + 1
    return out


def shell_commands(text: str) -> list[str]:
    """The logical lines of a bash block: continuations joined, comments and blank lines dropped."""
    joined = re.sub(r"\s*\\\n\s*", " ", text)
    commands = []
    for line in joined.splitlines():
        line = re.sub(r"\s+#.*$", "", line).strip()
        if line and not line.startswith("#"):
            commands.append(line)
    return commands


def extra_missing(name: str) -> str | None:
    """Why the packages of litplug's extra ``name`` are not importable here, or None."""
    marker = re.compile(rf"extra\s*==\s*['\"]{name}['\"]")
    requirements = [r for r in importlib.metadata.requires("litplug") or [] if marker.search(r)]
    assert requirements, f"litplug has no extra `{name}`"
    for requirement in requirements:
        module = re.split(r"[<>=!~\[ ;]", requirement)[0].replace("-", "_")
        if importlib.util.find_spec(module) is None:
            return f"needs the `{name}` extra ({module} not installed)"
    return None


def write_tiny_datasets(folder: Path) -> None:
    """MNIST (idx) and CIFAR-10 (pickled batches) under ``folder/data``, a few dozen images each."""
    rng = np.random.default_rng(0)
    raw = folder / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for split, n in [("train", 64), ("t10k", 32)]:
        write_idx(raw / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), False)
        write_idx(raw / f"{split}-labels-idx1-ubyte", (np.arange(n) % 10).astype(np.uint8), False)
    cifar = folder / "data" / "cifar-10-batches-py"
    cifar.mkdir(parents=True)
    import pickle

    for name, n in [*[(f"data_batch_{i}", 16) for i in range(1, 6)], ("test_batch", 16)]:
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": [i % 10 for i in range(n)]}
        with open(cifar / name, "wb") as f:
            pickle.dump(batch, f)


def run(cmd: list[str], cwd: Path, what: str) -> None:
    result = run_command(cmd, cwd, env={**os.environ, "LITPLUG_DEBUG": "1"}, timeout=TIMEOUT)
    assert result.returncode == 0, f"{what} failed (exit {result.returncode}):\n{result.output[-8000:]}"


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_page_examples_run_as_written(page: Path, tmp_path: Path) -> None:
    ran, skipped = 0, []
    for block in blocks(page):
        where = f"{page.relative_to(ROOT)}:{block.line}"
        extra = EXTRA.search(block.above)
        if extra and (why := extra_missing(extra.group(1))):
            skipped.append(f"{where}: {why}")
            continue
        if block.lang == "python":
            if block.text.lstrip().startswith("# fragment"):
                continue
            script = tmp_path / f"block_{block.line}.py"
            script.write_text(block.text + "\n")
            run(["python", str(script)], tmp_path, f"python block at {where}")
            ran += 1
        elif block.lang in ("bash", "sh", "shell"):
            if block.text.lstrip().startswith("# fragment"):
                continue
            for command in shell_commands(block.text):
                if NOT_RUN.match(command):
                    continue
                assert "..." not in command, f"{where}: `{command}` is a placeholder; write the complete command"
                words = shlex.split(command)
                if words[:3] in (["python", "-m", "litplug"], ["python3", "-m", "litplug"]):
                    words = ["litplug", *words[3:]]
                if words[0] == "litplug":
                    if re.search(r"needs (MNIST|CIFAR-10) on disk", block.text) and not (tmp_path / "data").exists():
                        write_tiny_datasets(tmp_path)
                    cmd = list(words)
                    if len(words) > 1 and words[1] in ("fit", "validate", "test", "predict"):
                        cmd += SHORT
                        if "--ckpt_path" in words:  # a resumed run trains one epoch beyond the one it resumes
                            cmd.append("--trainer.max_epochs=2")
                    run(cmd, tmp_path, f"`{command}` at {where}")
                    ran += 1
                elif words[0] in ("python", "python3") and words[1] == "-c":
                    run(["python", *words[1:]], tmp_path, f"`{command}` at {where}")
                    ran += 1
                elif words[0] in ("python", "python3") and words[1] == "-m" and words[2].startswith("litplug"):
                    extra = SHORT_TOOLS.get(words[2], [])
                    run(["python", *words[1:], *extra], tmp_path, f"`{command}` at {where}")
                    ran += 1
                else:
                    pytest.fail(f"{where}: `{command}` is neither a litplug command nor a setup line this test knows")
    assert ran > 0 or page.name != "README.md", f"{page.name}: no example ran"
    if skipped and not ran:
        pytest.skip("; ".join(skipped))


def test_shell_commands_are_parsed_as_a_user_types_them() -> None:
    text = "litplug fit --config a.yaml \\\n    --config b.yaml   # two\n# comment only\npip install x"
    assert shell_commands(text) == ["litplug fit --config a.yaml --config b.yaml", "pip install x"]
    assert NOT_RUN.match("pip install x") and not NOT_RUN.match("litplug fit")
