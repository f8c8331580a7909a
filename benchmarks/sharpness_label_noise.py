"""Digits with 40% label noise: test accuracy of SGD, SAM, adaptive SAM and the gradient-norm
penalty (a = 0.5), mean over 3 seeds, from the configs in configs/digits/label_noise/.

    python benchmarks/sharpness_label_noise.py [--seeds 0 1 2] [--methods sgd sam asam gnp]

Each run is ``litplug fit --config configs/digits/label_noise/<method>.yaml`` with
``seed_everything`` and the data seed (label flips, split, shuffling) set to the seed; the CLI tests
the final weights after fit.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

from litplug.cli import LitplugCLI

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "digits" / "label_noise"


def run(method: str, seed: int, root: str) -> float:
    cli = LitplugCLI(
        args=[
            "fit",
            "--config",
            str(CONFIGS / f"{method}.yaml"),
            "--seed_everything",
            str(seed),
            "--data.init_args.seed",
            str(seed),
            "--trainer.logger",
            "false",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.enable_checkpointing",
            "false",
            "--trainer.enable_model_summary",
            "false",
            "--trainer.default_root_dir",
            root,
        ]
    )
    return float(cli.trainer.callback_metrics["test/acc"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=["sgd", "sam", "asam", "gnp"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {}
    with tempfile.TemporaryDirectory() as root:
        for method in args.methods:
            results[method] = [run(method, seed, root) for seed in args.seeds]
    print(f"\n| method | test accuracy, mean of {len(args.seeds)} seeds | per seed |")
    print("|---|---|---|")
    for method, accs in results.items():
        per_seed = ", ".join(f"{a:.4f}" for a in accs)
        print(f"| {method} | {statistics.mean(accs):.4f} | {per_seed} |")


if __name__ == "__main__":
    main()
