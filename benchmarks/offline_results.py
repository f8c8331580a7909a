"""Offline optimisation results: the offline tables of benchmarks/RESULTS.md.

For every task, trains the surrogate of ``configs/offline/<task>.yaml`` over ``--seeds`` seeds
(seed of the data sample, the split, the initialisation and the shuffling): plain, with IGNITE
(``configs/offline/ignite.yaml``: ``SurrogateSharpness`` with its defaults, ``lambda_lr`` 0.1;
``ignite_slow_dual.yaml``: the same with ``lambda_lr`` 1e-3) and with SAM
(``configs/offline/sam.yaml``). ``GradientAscentSearch`` runs at the end of each fit. Prints the
normalised 100th-percentile score as a Markdown table (mean +- std over seeds; for the variants
also the change of the mean against the baseline and how many seeds beat the baseline run with
the same seed, which shares its data and initialisation), then the 50th-percentile score and the
best offline design for reference. A column whose callback is not available (the sharpness family
not installed) says so.

    python benchmarks/offline_results.py                    # 4 tasks x 4 variants x 5 seeds
    python benchmarks/offline_results.py --tasks hartmann --seeds 2 --epochs 5   # a quick look
    python benchmarks/offline_results.py --variants "+IGNITE"                    # one column

Needs BoTorch for the tasks (``pip install 'litplug[offline]'``); runs on the CPU.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import litplug.callbacks
from litplug.callbacks import GradientAscentSearch
from litplug.cli import LitplugCLI

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "offline"
VARIANTS = {
    "baseline": None,
    "+IGNITE": ("ignite.yaml", "SurrogateSharpness"),
    "+IGNITE, lambda_lr 1e-3": ("ignite_slow_dual.yaml", "SurrogateSharpness"),
    "+SAM": ("sam.yaml", "SAM"),
}


def run(task: str, variant: str, seed: int, epochs: int | None, root: str) -> dict[str, float]:
    args = ["fit", "--config", str(CONFIGS / f"{task}.yaml")]
    if VARIANTS[variant]:
        args += ["--config", str(CONFIGS / VARIANTS[variant][0])]
    args += [
        "--seed_everything", str(seed),
        "--data.init_args.seed", str(seed),
        "--trainer.logger", "false",
        "--trainer.enable_checkpointing", "false",
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        "--trainer.default_root_dir", root,  # where the CLI saves config.yaml
    ]  # fmt: skip
    if epochs is not None:
        args += ["--trainer.max_epochs", str(epochs)]
    cli = LitplugCLI(args=args)
    (search,) = [c for c in cli.trainer.callbacks if isinstance(c, GradientAscentSearch)]
    return search.results


def mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {std:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["ackley", "rosenbrock", "levy", "hartmann"])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=None, help="override the configs' max_epochs")
    parser.add_argument(
        "--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), help="baseline is always run"
    )
    opts = parser.parse_args()
    for name in [v for v in VARIANTS if v != "baseline" and v not in opts.variants]:
        del VARIANTS[name]
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)

    available = {v: spec is None or hasattr(litplug.callbacks, spec[1]) for v, spec in VARIANTS.items()}
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    seconds: dict[str, float] = {v: 0.0 for v in VARIANTS}
    for task in opts.tasks:
        for variant in VARIANTS:
            if not available[variant]:
                continue
            for seed in range(opts.seeds):
                start = time.perf_counter()
                with tempfile.TemporaryDirectory() as root:
                    res = run(task, variant, seed, opts.epochs, root)
                seconds[variant] += time.perf_counter() - start
                results.setdefault((task, variant), []).append(res)
                print(
                    f"{task:>10} {variant:>9} seed {seed}: "
                    + ", ".join(f"{k.split('/')[1]} {v:.4f}" for k, v in res.items()),
                    flush=True,
                )

    def cell(task: str, variant: str, key: str) -> str:
        if not available[variant]:
            return f"n/a ({VARIANTS[variant][1]} not installed)"
        values = [r[key] for r in results[(task, variant)]]
        text = mean_std(values)
        if variant != "baseline":  # change of the mean, and seeds (same data and init) that improve
            base = [r[key] for r in results[(task, "baseline")]]
            wins = sum(v > b for v, b in zip(values, base))
            text += f" ({100 * (statistics.mean(values) / statistics.mean(base) - 1):+.1f}%, {wins}/{len(base)})"
        return text

    print(
        f"\nNormalised 100th-percentile score, mean ± std over {opts.seeds} seeds "
        "(1 = best design of the full dataset)\n"
    )
    print("| task | " + " | ".join(VARIANTS) + " | best offline design |")
    print("|---" * (len(VARIANTS) + 2) + "|")
    for task in opts.tasks:
        cells = [cell(task, v, "offline/score_max") for v in VARIANTS]
        print(f"| {task} | " + " | ".join(cells) + f" | {cell(task, 'baseline', 'offline/start_max')} |")
    print("\nNormalised 50th-percentile score\n")
    print("| task | " + " | ".join(VARIANTS) + " |")
    print("|---" * (len(VARIANTS) + 1) + "|")
    for task in opts.tasks:
        print(f"| {task} | " + " | ".join(cell(task, v, "offline/score_median") for v in VARIANTS) + " |")
    runs = len(opts.tasks) * opts.seeds
    print(
        "\nWall time per run (fit + search): "
        + ", ".join(f"{v} {seconds[v] / runs:.1f} s" for v in VARIANTS if available[v])
    )


if __name__ == "__main__":
    main()
