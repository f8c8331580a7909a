"""The README's certified-training table on digits: plain IBP with a long warmup
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

ROOT = Path(__file__).resolve().parent.parent
RECIPES = {"plain IBP, long warmup": "configs/digits/ibp_long_warmup.yaml", "Shi et al. recipe": "configs/digits/ibp.yaml"}
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
        args=["--config", str(ROOT / config), "--model.init_args.eps", str(eps), "--seed_everything", str(seed),
              "--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
              "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", out_dir, *extra],
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
    todo = [(name, eps, seed) for eps in args.eps for name in args.recipes for seed in range(args.seeds)]
    results: dict[tuple[str, float], list[dict]] = {}
    running: list[tuple[tuple[str, float, int], subprocess.Popen]] = []
    while todo or running:
        while todo and len(running) < args.jobs:
            name, eps, seed = todo.pop(0)
            cmd = [sys.executable, __file__, "--one", config_for(name, eps), str(eps), str(seed)]
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            running.append(((name, eps, seed), proc))
        (name, eps, seed), proc = running.pop(0)
        out, _ = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"run {name!r} eps={eps} seed={seed} failed with exit code {proc.returncode}")
        result = json.loads(out.strip().splitlines()[-1])
        results.setdefault((name, eps), []).append(result)
        record = {"recipe": name, "config": config_for(name, eps), "eps": eps, "seed": seed, **result}
        print(json.dumps(record), file=sys.stderr)
        if args.out:
            with args.out.open("a") as f:
                f.write(json.dumps(record) + "\n")
    print(f"{args.seeds} seed(s) per cell: mean ± sample std\n")
    print("| eps | recipe | epochs | clean acc | verified acc | PGD acc | fit time (s) |")
    print("|---|---|---|---|---|---|---|")
    for eps in args.eps:
        for name in args.recipes:
            rs = results[(name, eps)]
            print(f"| {eps} | {name} | {rs[0]['epochs']} | {cell([r['test/acc'] for r in rs])} "
                  f"| {cell([r['test/verified_acc'] for r in rs])} | {cell([r['test/pgd_acc'] for r in rs])} "
                  f"| {statistics.fmean(r['seconds'] for r in rs):.0f} |")


if __name__ == "__main__":
    main()
