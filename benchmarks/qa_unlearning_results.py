"""Unlearning on FictitiousQA measured as TOFU/open-unlearning measure it: every method against
the retain model of the oracle (``litplug.oracle``), over seeds and forget sizes, with two sanity
rows: the retain model against the retain model of another seed, and the target model. Prints a
markdown table of mean ± std over the seeds (forget quality, model utility, privleak, LOSS-attack
AUC, forget truth ratio).

    OMP_NUM_THREADS=1 python benchmarks/qa_unlearning_results.py --seeds 0 1 2 --forget-percents 1 5 10
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from lightning.pytorch import Trainer, seed_everything

from litplug.datamodules import FictitiousQA, ForgetRetain
from litplug.functional.unlearning_metrics import unlearning_suite
from litplug.loading import load_state_dict
from litplug.modules import Unlearner
from litplug.oracle import backbone, train_oracle

METHODS = ["gradient_ascent", "gradient_difference", "npo", "npo_rt", "simnpo", "rmu"]
SETTINGS = {  # method: Unlearner arguments (configs/lm/unlearning/*.yaml where one exists)
    "gradient_ascent": {},
    "gradient_difference": {"gamma": 5.0},
    "npo": {"beta": 0.1},
    "npo_rt": {"beta": 0.1, "gamma": 5.0},
    "simnpo": {"beta": 4.5, "gamma": 1.0},
    "rmu": {"layer": "blocks.layers.1", "steering": 20.0, "gamma": 100.0},
}
COLUMNS = ["forget_quality", "model_utility", "privleak", "mia_loss", "forget_truth_ratio"]


def load(dm: FictitiousQA, path: Path) -> torch.nn.Module:
    net = backbone(dm)
    net.load_state_dict(load_state_dict(path))
    return net.eval()


def unlearn(dm: FictitiousQA, target: Path, method: str, steps: int, lr: float, seed: int) -> torch.nn.Module:
    seed_everything(seed)
    model = Unlearner(backbone(dm), str(target), method, objective="causal_lm", seed=seed,
                      optimizer=lambda p: torch.optim.Adam(p, lr=lr), **SETTINGS[method])  # fmt: skip
    trainer = Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)  # fmt: skip
    trainer.fit(model, ForgetRetain(dm, scenario="class", forget_classes=[1]))
    return model.backbone.eval()


def fmt(values: list[float]) -> str:
    values = [v for v in values if v == v]
    if not values:
        return "n/a"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3g} ± {std:.2g}"


def main(argv: list[str] | None = None) -> dict[tuple[int, str], list[dict[str, float]]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/qa")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--forget-percents", type=int, nargs="+", default=[1, 5, 10])
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--num-entities", type=int, default=100)
    parser.add_argument("--oracle-epochs", type=int, default=60)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--lr", type=float, default=3e-4)
    args = parser.parse_args(argv)
    results: dict[tuple[int, str], list[dict[str, float]]] = {}
    for percent in args.forget_percents:
        dm = FictitiousQA(num_entities=args.num_entities, forget_percent=percent)
        dm.setup()
        sets = dm.evaluation_sets()
        oracle = {
            s: train_oracle(args.out, percent, s, num_entities=args.num_entities, epochs=args.oracle_epochs)
            for s in args.seeds + [max(args.seeds) + 1]
        }
        for i, seed in enumerate(args.seeds):
            retain = load(dm, oracle[seed]["retain"])
            other = load(dm, oracle[args.seeds[i + 1] if i + 1 < len(args.seeds) else max(args.seeds) + 1]["retain"])
            rows = {"retain (other seed)": other, "target": load(dm, oracle[seed]["target"])}
            for method in args.methods:
                rows[method] = unlearn(dm, oracle[seed]["target"], method, args.steps, args.lr, seed)
            for name, net in rows.items():
                results.setdefault((percent, name), []).append(unlearning_suite(net, retain, *sets))
    print("| forget % | row | " + " | ".join(COLUMNS) + " |")
    print("|---|---|" + "---|" * len(COLUMNS))
    for (percent, name), runs in results.items():
        print(f"| {percent} | {name} | " + " | ".join(fmt([r[c] for r in runs]) for c in COLUMNS) + " |")
    return results


if __name__ == "__main__":
    main()
