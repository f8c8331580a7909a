"""The README's certified-training table on digits: plain IBP with a long warmup
(configs/digits/ibp_long_warmup.yaml) vs the short-warmup recipe of Shi et al. 2021
(configs/digits/ibp.yaml), for eps in {0.05, 0.1, 0.2}; clean, verified and PGD test accuracy.

    PYTHONPATH=<dir holding litplug> python benchmarks/certified_table.py [--jobs 3]

Each run is the config unchanged except ``model.init_args.eps``; runs go to separate processes
(``--jobs`` at a time), then a markdown table is printed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPES = {"plain IBP, long warmup": "configs/digits/ibp_long_warmup.yaml", "Shi et al. recipe": "configs/digits/ibp.yaml"}
EPS = [0.05, 0.1, 0.2]


def run_one(config: str, eps: float) -> None:
    import torch

    from litplug.cli import LitplugCLI

    torch.set_num_threads(1)
    start = time.perf_counter()
    out_dir = tempfile.mkdtemp(prefix="certified_table_")  # the CLI saves config.yaml there
    cli = LitplugCLI(
        args=["--config", str(ROOT / config), "--model.init_args.eps", str(eps), "--trainer.logger", "false",
              "--trainer.enable_checkpointing", "false", "--trainer.enable_progress_bar", "false",
              "--trainer.default_root_dir", out_dir],
        run=False,
    )
    cli.trainer.fit(cli.model, cli.datamodule)
    seconds = time.perf_counter() - start
    (result,) = cli.trainer.test(cli.model, cli.datamodule, verbose=False)
    print(json.dumps({"epochs": cli.trainer.max_epochs, "seconds": seconds, **result}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=3)
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        run_one(args.one[0], float(args.one[1]))
        return
    todo = [(name, config, eps) for name, config in RECIPES.items() for eps in EPS]
    results: dict[tuple[str, float], dict] = {}
    running: list[tuple[tuple[str, float], subprocess.Popen]] = []
    while todo or running:
        while todo and len(running) < args.jobs:
            name, config, eps = todo.pop(0)
            proc = subprocess.Popen([sys.executable, __file__, "--one", config, str(eps)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            running.append(((name, eps), proc))
        key, proc = running.pop(0)
        out, _ = proc.communicate()
        results[key] = json.loads(out.strip().splitlines()[-1])
        print(key, results[key], file=sys.stderr)
    print("| eps | recipe | epochs | clean acc | verified acc | PGD acc | fit time (s) |")
    print("|---|---|---|---|---|---|---|")
    for eps in EPS:
        for name in RECIPES:
            r = results[(name, eps)]
            print(f"| {eps} | {name} | {r['epochs']} | {100 * r['test/acc']:.1f}% | {100 * r['test/verified_acc']:.1f}% "
                  f"| {100 * r['test/pgd_acc']:.1f}% | {r['seconds']:.0f} |")


if __name__ == "__main__":
    main()
