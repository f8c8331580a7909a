"""Unlearning on FictitiousQA measured as TOFU/open-unlearning measure it: every method against
the retain model of the oracle (``litplug.oracle``), over seeds and forget sizes, with the sanity
rows: the retain model against a second retain model of the same corpus trained from another model
seed (``seed + 100``: another initialisation and sample order), and the target model. The second
retain model is the one of forget 10%, for every forget size: it never saw the forget people of
any size nor the held-out people (the forget sets are nested), and one model instead of three keeps
the oracle at 15 models.
The seed draws the corpus and its split of people, so seed-specific people average out over the
seeds. Prints a markdown table of the mean and a 95% t-interval over the seeds (forget quality,
model utility, privleak, MIA AUCs, forget truth ratio, forget exact memorisation) and, per method
and forget size, in how many seeds it reaches forget quality >= 0.05 with a model utility within
5% of the retain model's (the ``ok`` column), then the sanity rows per seed.

The models are trained and scored by ``--processes`` worker processes (one thread each); the
oracle's models are cached under ``--out``. The run prints its wall time, the CPU seconds of all
its processes (user + sys) and the load average.

    OMP_NUM_THREADS=1 python benchmarks/qa_unlearning_results.py --seeds 0 1 2 --forget-percents 1 5 10
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import resource
import statistics
import time
from pathlib import Path

import torch

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
OTHER = 100  # the second retain model of seed s has model seed s + OTHER
COLUMNS = ["forget_quality", "model_utility", "privleak", "mia_loss", "mia_min_k", "forget_truth_ratio", "forget_em"]
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571}  # Student t quantiles by degrees of freedom


def _worker_init() -> None:
    torch.set_num_threads(1)


def corpus(args: argparse.Namespace, percent: int, seed: int):
    from litplug.datamodules import FictitiousQA

    dm = FictitiousQA(num_entities=args.num_entities, forget_percent=percent, seed=seed)
    dm.setup()
    return dm


def train_model(job: tuple[argparse.Namespace, str, int, int, int]) -> str:
    from litplug.oracle import train_oracle_model

    args, kind, percent, seed, model_seed = job
    path = train_oracle_model(args.out, kind, percent, seed, num_entities=args.num_entities,
                              epochs=args.oracle_epochs, model_seed=model_seed)  # fmt: skip
    return str(path)


def load(dm, path: Path) -> torch.nn.Module:
    from litplug.loading import load_state_dict
    from litplug.oracle import backbone

    net = backbone(dm)
    net.load_state_dict(load_state_dict(path))
    return net.eval()


def unlearn(dm, target: Path, method: str, steps: int, lr: float, seed: int) -> torch.nn.Module:
    from lightning.pytorch import Trainer, seed_everything

    from litplug.datamodules import ForgetRetain
    from litplug.modules import Unlearner
    from litplug.oracle import backbone

    seed_everything(seed, verbose=False)
    model = Unlearner(backbone(dm), str(target), method, objective="causal_lm", seed=seed,
                      optimizer=lambda p: torch.optim.Adam(p, lr=lr), **SETTINGS[method])  # fmt: skip
    trainer = Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)  # fmt: skip
    trainer.fit(model, ForgetRetain(dm, scenario="class", forget_classes=[1]))
    return model.backbone.eval()


def evaluation_sets(dm, retain_people: int | None) -> tuple[dict, dict]:
    """The corpus's evaluation sets, the retained questions cut to the last ``retain_people``
    people (model utility is a mean over them; the retain split is the costliest to score). The
    last retain people are retain people at every forget size (the forget sets come first)."""
    data, texts = dm.evaluation_sets()
    if retain_people is not None:
        rows = retain_people * 7  # seven questions per person, people-major
        data["retain"] = data["retain_paraphrase"] = tuple(t[-rows:] for t in data["retain"])
        data["retain_perturbed"] = tuple(t[-rows * dm.num_perturbed :] for t in data["retain_perturbed"])
    return data, texts


def score(job: tuple[argparse.Namespace, int, int]) -> tuple[int, int, dict[str, dict[str, float]]]:
    """Unlearn every method from the target model of ``seed`` and score every row against the
    retain model of ``percent`` and ``seed`` (its statistics computed once)."""
    from litplug.functional.unlearning_metrics import suite_from_statistics, suite_statistics
    from litplug.oracle import oracle_paths

    args, percent, seed = job
    dm = corpus(args, percent, seed)
    data, texts = evaluation_sets(dm, args.eval_retain_people)
    paths = oracle_paths(args.out, percent, seed)
    other = oracle_paths(args.out, 10, seed, seed + OTHER)
    retain_stats = suite_statistics(load(dm, paths["retain"]), data)
    rows = {
        "retain": retain_stats,
        "retain (other seed)": suite_statistics(load(dm, other["retain"]), data),
        "target": suite_statistics(load(dm, paths["target"]), data),
    }
    for method in args.methods:
        rows[method] = suite_statistics(unlearn(dm, paths["target"], method, args.steps, args.lr, seed), data)
    return percent, seed, {name: suite_from_statistics(s, retain_stats, texts) for name, s in rows.items()}


def interval(values: list[float]) -> str:
    values = [v for v in values if v == v]
    if not values:
        return "n/a"
    mean = statistics.mean(values)
    if len(values) == 1:
        return f"{mean:.3g}"
    half = T_975.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))
    return f"{mean:.3g} ± {half:.2g}"


def cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main(argv: list[str] | None = None) -> dict[tuple[int, str], list[dict[str, float]]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/qa")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--forget-percents", type=int, nargs="+", default=[1, 5, 10])
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--num-entities", type=int, default=520)
    parser.add_argument("--oracle-epochs", type=int, default=25)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--eval-retain-people", type=int, default=100, help="score utility on this many people")
    parser.add_argument("--processes", type=int, default=2)
    args = parser.parse_args(argv)
    if len(args.seeds) < 1:
        parser.error("--seeds needs a seed")
    start, load_before = time.perf_counter(), os.getloadavg()
    jobs = [(args, "target", args.forget_percents[0], s, s) for s in args.seeds]
    jobs += [(args, "retain", p, s, s) for p in args.forget_percents for s in args.seeds]
    jobs += [(args, "retain", 10, s, s + OTHER) for s in args.seeds]
    results: dict[tuple[int, str], list[dict[str, float]]] = {}
    per_seed: dict[tuple[int, int], dict[str, dict[str, float]]] = {}
    with multiprocessing.get_context("spawn").Pool(args.processes, initializer=_worker_init) as pool:
        for path in pool.imap_unordered(train_model, jobs):
            print(f"[{time.perf_counter() - start:.0f}s] {path}", flush=True)
        work = [(args, p, s) for p in args.forget_percents for s in args.seeds]
        for percent, seed, rows in pool.imap_unordered(score, work):
            per_seed[percent, seed] = rows
            print(f"[{time.perf_counter() - start:.0f}s] forget {percent}% seed {seed} scored", flush=True)
        pool.close()
        pool.join()  # the workers exit and are waited for, so their CPU time counts in RUSAGE_CHILDREN
    for percent in args.forget_percents:
        for seed in args.seeds:
            for name, report in per_seed[percent, seed].items():
                results.setdefault((percent, name), []).append(report)
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
    print("\nsanity rows per seed (" + ", ".join(str(s) for s in args.seeds) + "):")
    for percent in args.forget_percents:
        retain_utility = ", ".join(f"{r['model_utility']:.3g}" for r in results[percent, "retain"])
        for name in ("retain (other seed)", "target"):
            runs = results[percent, name]
            columns = ("forget_quality", "mia_loss", "privleak")
            cells = [f"{c} " + ", ".join(f"{r[c]:.3g}" for r in runs) for c in columns]
            if name != "target":
                utility = ", ".join(f"{r['model_utility']:.3g}" for r in runs)
                cells.append(f"model_utility {utility} (retain model {retain_utility})")
            print(f"forget {percent}% {name}: " + "; ".join(cells))
    wall, cpu = time.perf_counter() - start, cpu_seconds()
    print(f"wall time {wall:.0f} s; CPU time {cpu:.0f} s (user + sys, all processes; {cpu / 2:.0f} s on 2 idle "
          f"cores); load average {load_before[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")  # fmt: skip
    return results


if __name__ == "__main__":
    main()
