"""Unlearning on FictitiousQA measured as TOFU/open-unlearning measure it: every method against
the retain model of the oracle (``litplug.oracle``), over seeds and forget sizes, with the sanity
rows: the retain model against the retain model of another seed (seed s is scored against seed
s + 1's retain model, cyclically, so no extra model is trained) and the target model. Prints a
markdown table of the mean and a 95% t-interval over the seeds (forget quality, model utility,
privleak, MIA AUCs, forget truth ratio, forget exact memorisation) and, per method and forget
size, in how many seeds it reaches forget quality >= 0.05 with a model utility within 5% of the
retain model's (the ``ok`` column).

    OMP_NUM_THREADS=1 python benchmarks/qa_unlearning_results.py --seeds 0 1 2 --forget-percents 1 5 10
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import torch
from lightning.pytorch import Trainer, seed_everything

from litplug.datamodules import FictitiousQA, ForgetRetain
from litplug.functional.unlearning_metrics import unlearning_suite
from litplug.loading import load_state_dict
from litplug.modules import Unlearner
from litplug.oracle import backbone, train_oracle

METHODS = ["gradient_ascent", "gradient_difference", "finetune", "l1_sparse", "npo", "npo_rt", "simnpo", "rmu"]
SETTINGS = {  # method: Unlearner arguments (configs/lm/unlearning/*.yaml where one exists)
    "gradient_ascent": {},
    "gradient_difference": {"gamma": 5.0},
    "finetune": {},
    "l1_sparse": {"alpha": 5e-4},
    "npo": {"beta": 0.1},
    "npo_rt": {"beta": 0.1, "gamma": 5.0},
    "simnpo": {"beta": 4.5, "gamma": 1.0},
    "rmu": {"layer": "blocks.layers.1", "steering": 20.0, "gamma": 100.0},
}
COLUMNS = ["forget_quality", "model_utility", "privleak", "mia_loss", "mia_min_k", "forget_truth_ratio", "forget_em"]
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571}  # Student t quantiles by degrees of freedom


def load(dm: FictitiousQA, path: Path) -> torch.nn.Module:
    net = backbone(dm)
    net.load_state_dict(load_state_dict(path))
    return net.eval()


def unlearn(dm: FictitiousQA, target: Path, method: str, steps: int, lr: float, seed: int) -> torch.nn.Module:
    seed_everything(seed, verbose=False)
    model = Unlearner(backbone(dm), str(target), method, objective="causal_lm", seed=seed,
                      optimizer=lambda p: torch.optim.Adam(p, lr=lr), **SETTINGS[method])  # fmt: skip
    trainer = Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)  # fmt: skip
    trainer.fit(model, ForgetRetain(dm, scenario="class", forget_classes=[1]))
    return model.backbone.eval()


def evaluation_sets(dm: FictitiousQA, retain_people: int | None) -> tuple[dict, dict]:
    """The corpus's evaluation sets, the retained questions cut to the first ``retain_people``
    people (model utility is a mean over them; the retain split is the costliest to score)."""
    data, texts = dm.evaluation_sets()
    if retain_people is not None:
        rows = retain_people * 7  # seven questions per person, people-major
        for key in ("retain", "retain_paraphrase"):
            data[key] = tuple(t[:rows] for t in data[key])
        data["retain_perturbed"] = tuple(t[: rows * dm.num_perturbed] for t in data["retain_perturbed"])
    return data, texts


def interval(values: list[float]) -> str:
    values = [v for v in values if v == v]
    if not values:
        return "n/a"
    mean = statistics.mean(values)
    if len(values) == 1:
        return f"{mean:.3g}"
    half = T_975.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))
    return f"{mean:.3g} ± {half:.2g}"


def main(argv: list[str] | None = None) -> dict[tuple[int, str], list[dict[str, float]]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/qa")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--forget-percents", type=int, nargs="+", default=[1, 5, 10])
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--num-entities", type=int, default=100)
    parser.add_argument("--oracle-epochs", type=int, default=20)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--eval-retain-people", type=int, default=20, help="score utility on this many people")
    args = parser.parse_args(argv)
    if len(args.seeds) < 2:
        parser.error("--seeds needs two seeds or more (the retain model is compared with another seed's)")
    start = time.perf_counter()
    results: dict[tuple[int, str], list[dict[str, float]]] = {}
    for percent in args.forget_percents:
        dm = FictitiousQA(num_entities=args.num_entities, forget_percent=percent)
        dm.setup()
        sets = evaluation_sets(dm, args.eval_retain_people)
        oracle = {
            s: train_oracle(args.out, percent, s, num_entities=args.num_entities, epochs=args.oracle_epochs)
            for s in args.seeds
        }
        print(f"[{time.perf_counter() - start:.0f}s] oracle of forget {percent}% ready", flush=True)
        for i, seed in enumerate(args.seeds):
            retain = load(dm, oracle[seed]["retain"])
            other = load(dm, oracle[args.seeds[(i + 1) % len(args.seeds)]]["retain"])
            rows = {"retain": retain, "retain (other seed)": other, "target": load(dm, oracle[seed]["target"])}
            for method in args.methods:
                rows[method] = unlearn(dm, oracle[seed]["target"], method, args.steps, args.lr, seed)
            for name, net in rows.items():
                results.setdefault((percent, name), []).append(unlearning_suite(net, retain, *sets))
            print(f"[{time.perf_counter() - start:.0f}s] forget {percent}% seed {seed} done", flush=True)
    print("| forget % | row | ok | " + " | ".join(COLUMNS) + " |")
    print("|---|---|---|" + "---|" * len(COLUMNS))
    for (percent, name), runs in results.items():
        reference = results[percent, "retain"]
        ok = sum(
            r["forget_quality"] >= 0.05 and r["model_utility"] >= 0.95 * ref["model_utility"]
            for r, ref in zip(runs, reference)
        )
        print(
            f"| {percent} | {name} | {ok}/{len(runs)} | "
            + " | ".join(interval([r[c] for r in runs]) for c in COLUMNS)
            + " |"
        )
    print(f"wall time {time.perf_counter() - start:.0f} s")
    return results


if __name__ == "__main__":
    main()
