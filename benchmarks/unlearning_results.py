"""Regenerate the unlearning results tables of benchmarks/RESULTS.md from the configs in configs/digits/unlearning/.

For every seed: train the original model (original.yaml), then run every row
(methods/<row>.yaml) on class-wise (class.yaml) and 10% random (random.yaml) forgetting, timing
``trainer.fit`` (validation off) and reading UA/RA/TA/MIA from ``trainer.test``. Prints markdown
tables of mean +- std over the seeds; "gap" is the mean |metric - retrain| over UA, RA, TA, MIA,
and "time" is the fit wall time relative to retrain (so it includes mask computation).

    python benchmarks/unlearning_results.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from litplug.cli import LitplugCLI

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "digits" / "unlearning"
ROWS = [
    "retrain",
    "finetune",
    "gradient_ascent",
    "gradient_difference",
    "random_label",
    "npo_rt",
    "l1_sparse",
    "random_label_saliency",
    "random_label_attribution",
    "gradient_difference_saliency",
    "gradient_difference_attribution",
]
QUIET = [
    "--trainer.logger",
    "false",
    "--trainer.enable_progress_bar",
    "false",
    "--trainer.enable_model_summary",
    "false",
]


def cli(configs: list[Path], overrides: list[str]) -> LitplugCLI:
    args = [a for c in configs for a in ("--config", str(c))] + QUIET + overrides
    return LitplugCLI(args=args, run=False)


def train_original(seed: int, configs: Path = CONFIGS, checkpoint: str = "runs/unlearning/original.ckpt") -> Path:
    """Fit ``configs/original.yaml`` with ``seed``; return the checkpoint that config writes."""
    run = cli(
        [configs / "original.yaml"],
        ["--seed_everything", str(seed), "--data.init_args.seed", str(seed), "--trainer.limit_val_batches", "0"],
    )
    run.trainer.fit(run.model, run.datamodule)
    return Path(checkpoint).resolve()


def run_row(scenario: str, row: str, seed: int, checkpoint: Path) -> dict[str, float]:
    overrides = [
        "--seed_everything", str(seed),
        "--data.init_args.seed", str(seed),
        "--data.init_args.datamodule.init_args.seed", str(seed),
        "--trainer.limit_val_batches", "0",
        "--trainer.enable_checkpointing", "false",
    ]  # fmt: skip
    if row != "retrain":
        overrides += ["--model.init_args.checkpoint", str(checkpoint)]
    run = cli([CONFIGS / f"{scenario}.yaml", CONFIGS / "methods" / f"{row}.yaml"], overrides)
    start = time.perf_counter()
    run.trainer.fit(run.model, run.datamodule)
    seconds = time.perf_counter() - start
    metrics = run.trainer.test(run.model, run.datamodule, verbose=False)[0]
    out = {k.split("/")[-1]: float(v) for k, v in metrics.items() if k.startswith("unlearn/test/")}
    out["time"] = seconds
    return out


def table(results: dict[str, dict[int, dict[str, float]]], seeds: list[int]) -> str:
    cols = ["UA", "RA", "TA", "MIA"]
    lines = [
        "| method | UA | RA | TA | MIA-efficacy | run time (s) | time / retrain | avg gap |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def fmt(values: list[float]) -> str:
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.2f} ± {std:.2f}"

    for row, per_seed in results.items():
        cells = [fmt([per_seed[s][c] for s in seeds]) for c in cols]
        ratio = [per_seed[s]["time"] / results["retrain"][s]["time"] for s in seeds]
        gaps = [statistics.mean(abs(per_seed[s][c] - results["retrain"][s][c]) for c in cols) for s in seeds]
        lines.append(
            f"| {row} | "
            + " | ".join(cells)
            + f" | {fmt([per_seed[s]['time'] for s in seeds])} | {fmt(ratio)} | {fmt(gaps)} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--scenarios", nargs="+", default=["class", "random"])
    parser.add_argument("--rows", nargs="+", default=ROWS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.chdir(tempfile.mkdtemp(prefix="litplug_unlearning_"))  # checkpoints and runs/ go here
    results: dict[str, dict[str, dict[int, dict[str, float]]]] = {s: {r: {} for r in args.rows} for s in args.scenarios}
    for seed in args.seeds:
        checkpoint = train_original(seed)
        for scenario in args.scenarios:
            for row in args.rows:
                results[scenario][row][seed] = run_row(scenario, row, seed, checkpoint)
                print(f"# seed {seed} {scenario} {row}: {results[scenario][row][seed]}", flush=True)
    for scenario in args.scenarios:
        title = "class-wise forgetting (digit 3)" if scenario == "class" else "random forgetting (10%)"
        print(f"\n### Digits, {title}, seeds {args.seeds}, MLP 64-128-128-10\n")
        print(table(results[scenario], args.seeds))


if __name__ == "__main__":
    main()
