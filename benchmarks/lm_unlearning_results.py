"""Regenerate the language-model unlearning table of benchmarks/RESULTS.md from the configs in configs/lm/.

For every seed: train the original causal transformer on the Markov corpus (original.yaml; the
marked forget sequences are seen 20x per epoch), measure it, then run every method
(unlearning/<method>.yaml on unlearning.yaml), without and with a saliency mask
(configs/callbacks/unlearning_mask.yaml), and read the test metrics: per-token loss (nats) on the
forget, retain and held-out test sets, and MIA, the AUC (%) of membership inference by loss on
forget vs test sequences (50 = chance). Prints a markdown table of mean +- std over the seeds.

    OMP_NUM_THREADS=1 python benchmarks/lm_unlearning_results.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from unlearning_results import cli, train_original

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
LM = CONFIGS / "lm"
METHODS = ["gradient_ascent", "gradient_difference", "npo", "npo_rt"]
COLUMNS = ["forget_loss", "retain_loss", "test_loss", "MIA"]


def run_row(method: str, mask: bool, seed: int, checkpoint: Path, fit: bool = True) -> dict[str, float]:
    overrides = [
        "--seed_everything", str(seed),
        "--data.init_args.seed", str(seed),
        "--data.init_args.datamodule.init_args.seed", str(seed),
        "--model.init_args.checkpoint", str(checkpoint),
        "--trainer.limit_val_batches", "0",
        "--trainer.enable_checkpointing", "false",
    ]  # fmt: skip
    configs = [LM / "unlearning.yaml", LM / "unlearning" / f"{method}.yaml"] + (
        [CONFIGS / "callbacks" / "unlearning_mask.yaml"] if mask else []
    )
    run = cli(configs, overrides)
    start = time.perf_counter()
    if fit:
        run.trainer.fit(run.model, run.datamodule)
    seconds = time.perf_counter() - start
    metrics = run.trainer.test(run.model, run.datamodule, verbose=False)[0]
    out = {k.split("/")[-1]: float(v) for k, v in metrics.items() if k.startswith("unlearn/test/")}
    out["time"] = seconds
    return out


def fmt(values: list[float], digits: int = 3) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {std:.{digits}f}"


def table(results: dict[str, dict[int, dict[str, float]]], seeds: list[int]) -> str:
    lines = [
        "| method | forget loss | retain loss | test loss | retain vs original | forget - test | MIA AUC (%) "
        "| fit time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row, per_seed in results.items():
        cells = [fmt([per_seed[s][c] for s in seeds], 1 if c == "MIA" else 3) for c in COLUMNS]
        change = [100 * (per_seed[s]["retain_loss"] / results["original"][s]["retain_loss"] - 1) for s in seeds]
        gap = [per_seed[s]["forget_loss"] - per_seed[s]["test_loss"] for s in seeds]
        lines.append(
            f"| {row} | {cells[0]} | {cells[1]} | {cells[2]} | {fmt(change, 1)}% | {fmt(gap)} | {cells[3]} | "
            f"{fmt([per_seed[s]['time'] for s in seeds], 1)} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--masks", nargs="+", choices=["none", "saliency"], default=["none", "saliency"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.chdir(tempfile.mkdtemp(prefix="litplug_lm_unlearning_"))  # checkpoints go here
    rows = ["original"] + [
        m + ("" if mask == "none" else " + saliency mask") for m in args.methods for mask in args.masks
    ]
    results: dict[str, dict[int, dict[str, float]]] = {r: {} for r in rows}
    for seed in args.seeds:
        checkpoint = train_original(seed, LM, "runs/lm/original.ckpt")
        results["original"][seed] = run_row("npo_rt", False, seed, checkpoint, fit=False)
        for method in args.methods:
            for mask in args.masks:
                row = method + ("" if mask == "none" else " + saliency mask")
                results[row][seed] = run_row(method, mask == "saliency", seed, checkpoint)
                print(f"# seed {seed} {row}: {results[row][seed]}", flush=True)
    print(f"\n### Markov corpus, causal transformer 2x64, seeds {args.seeds}\n")
    print(table(results, args.seeds))


if __name__ == "__main__":
    main()
