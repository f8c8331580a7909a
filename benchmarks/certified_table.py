"""The certified-training table on digits in benchmarks/RESULTS.md: plain IBP with a long warmup
(configs/digits/ibp_long_warmup.yaml) vs the short-warmup recipe of Shi et al. 2021
(configs/digits/ibp.yaml), for eps in {0.05, 0.1, 0.2}; clean, verified and PGD test accuracy,
mean +- sample std over ``--seeds`` seeds (0 .. n-1, passed as ``--seed_everything``).

    PYTHONPATH=<dir holding litplug> python benchmarks/certified_table.py [--seeds 3] [--eps 0.2] [--jobs 1]

Each run is its config unchanged except ``model.init_args.eps`` and ``seed_everything`` (the data
split and the batch order are fixed by the datamodule's own seed, so the seeds vary the weight
initialisation only). A recipe may name its own config for one eps (``EPS_CONFIGS``). Runs go to
separate processes with 1 torch thread each, ``--jobs`` at a time (default 1: one at a time);
``--out`` saves every run's result as a JSON line, and a markdown table is printed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RECIPES = {
    "plain IBP, long warmup": "configs/digits/ibp_long_warmup.yaml",
    "Shi et al. recipe": "configs/digits/ibp.yaml",
}
# (recipe, eps) -> config used instead of the recipe's default one.
EPS_CONFIGS: dict[tuple[str, float], str] = {}
EPS = [0.05, 0.1, 0.2]


def config_for(name: str, eps: float) -> str:
    return EPS_CONFIGS.get((name, eps), RECIPES[name])


def run_one(config: str, eps: float, seed: int, extra: list[str]) -> None:
    import torch

    from litplug.cli import LitplugCLI

    torch.set_num_threads(1)
    start = time.perf_counter()
    out_dir = tempfile.mkdtemp(prefix="certified_table_")  # the CLI saves config.yaml there
    cli = LitplugCLI(
        args=[
            "--config",
            str(ROOT / config),
            "--model.init_args.eps",
            str(eps),
            "--seed_everything",
            str(seed),
            "--trainer.logger",
            "false",
            "--trainer.enable_checkpointing",
            "false",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.default_root_dir",
            out_dir,
            *extra,
        ],
        run=False,
    )
    cli.trainer.fit(cli.model, cli.datamodule)
    seconds = time.perf_counter() - start
    (result,) = cli.trainer.test(cli.model, cli.datamodule, verbose=False)
    print(json.dumps({"epochs": cli.trainer.max_epochs, "seconds": seconds, **result}))


def cell(values: list[float], scale: float = 100.0, unit: str = "%", digits: int = 1) -> str:
    mean = scale * statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.{digits}f}{unit}"
    return f"{mean:.{digits}f} ± {scale * statistics.stdev(values):.{digits}f}{unit}"


def run_all(todo: list[tuple[Any, str, float, int]], jobs: int, out: Path | None = None) -> dict[Any, list[dict]]:
    """Run each ``(key, config, eps, seed)`` in its own process, ``jobs`` at a time; the results
    grouped by key. Each run is also printed to stderr (and appended to ``out``) as a JSON line."""
    todo = list(todo)
    results: dict[Any, list[dict]] = {}
    running: list[tuple[tuple[Any, str, float, int], subprocess.Popen]] = []
    while todo or running:
        while todo and len(running) < jobs:
            run = todo.pop(0)
            cmd = [sys.executable, __file__, "--one", run[1], str(run[2]), str(run[3])]
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            running.append((run, proc))
        (key, config, eps, seed), proc = running.pop(0)
        stdout, _ = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"run {key!r} ({config}) eps={eps} seed={seed} failed with exit code {proc.returncode}")
        result = json.loads(stdout.strip().splitlines()[-1])
        results.setdefault(key, []).append(result)
        record = {"run": str(key), "config": config, "eps": eps, "seed": seed, **result}
        print(json.dumps(record), file=sys.stderr)
        if out:
            with out.open("a") as f:
                f.write(json.dumps(record) + "\n")
    return results


def accuracy_cells(rs: list[dict]) -> str:
    """``clean | verified | PGD | fit time`` cells of a markdown row."""
    return (
        f"{cell([r['test/acc'] for r in rs])} | {cell([r['test/verified_acc'] for r in rs])} "
        f"| {cell([r['test/pgd_acc'] for r in rs])} | {statistics.fmean(r['seconds'] for r in rs):.0f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False)
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0 .. n-1 per cell (mean +- sample std)")
    parser.add_argument("--eps", type=float, nargs="+", default=EPS)
    parser.add_argument("--recipes", nargs="+", choices=list(RECIPES), default=list(RECIPES))
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (each uses 1 thread)")
    parser.add_argument("--out", type=Path, help="append each run's result here as a JSON line")
    parser.add_argument("--one", nargs=3, help=argparse.SUPPRESS)
    args, extra = parser.parse_known_args()
    if args.one:
        run_one(args.one[0], float(args.one[1]), int(args.one[2]), extra)
        return
    if extra:
        parser.error(f"unrecognized arguments: {extra}")
    todo = [
        ((name, eps), config_for(name, eps), eps, seed)
        for eps in args.eps
        for name in args.recipes
        for seed in range(args.seeds)
    ]
    results = run_all(todo, args.jobs, args.out)
    print(f"{args.seeds} seed(s) per cell: mean ± sample std\n")
    print("| eps | recipe | epochs | clean acc | verified acc | PGD acc | fit time (s) |")
    print("|---|---|---|---|---|---|---|")
    for eps in args.eps:
        for name in args.recipes:
            rs = results[(name, eps)]
            print(f"| {eps} | {name} | {rs[0]['epochs']} | {accuracy_cells(rs)} |")


if __name__ == "__main__":
    main()
