"""Regenerate the model-merging tables of benchmarks/RESULTS.md (embedded digits, plain-torch training loops).

Sections (``--sections``, default all):

* ``lmc``: two MLPs (three hidden layers of ``width``) trained from different seeds; test accuracy
  and loss barrier at the midpoint of the linear path, naive and after ``align``.
* ``tasks``: one base MLP trained on plain digits, fine-tuned on plain, mirrored and rotated digits
  (one label space); each task's test accuracy for each fine-tune, task arithmetic and TIES at the
  scale chosen on the validation split, and a multi-task model fine-tuned on all three jointly.
* ``map``: for the mirrored and rotated task vectors, MAP's front (quadratic fits of validation
  accuracy from a few evaluations) against the front of an 11 x 11 grid of evaluations.
* ``speed``: ``litplug.merging.align`` vs the ``rebasin`` package (``pip install rebasin``,
  in the ``bench`` extra) on the same pair of trained MLPs, timed round-robin in one run.

    OMP_NUM_THREADS=1 python benchmarks/merging.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from litplug.datamodules import Digits
from litplug.merging import (
    align,
    barrier,
    evaluate_classifier,
    grid_pareto_front,
    map_pareto_front,
    task_arithmetic,
    ties_merge,
)
from litplug.modules import MLP

TASKS: dict[str, Callable[[Tensor], Tensor]] = {
    "plain": lambda x: x,
    "mirrored": lambda x: x.flip(-1),
    "rotated": lambda x: x.rot90(1, (-2, -1)),
}
SCALES = [round(0.1 * i, 1) for i in range(1, 21)]


def digits(seed: int) -> dict[str, tuple[Tensor, Tensor]]:
    dm = Digits(seed=seed)
    dm.setup()
    out = {}
    for split, ds in (("train", dm.train_set), ("val", dm.val_set), ("test", dm.test_set)):
        out[split] = ((ds.x.float() * ds.scale - ds.mean) / ds.std, ds.y.clone())
    return out


def batches(x: Tensor, y: Tensor, size: int = 256) -> list[tuple[Tensor, Tensor]]:
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(y), size)]


def train(model: nn.Module, x: Tensor, y: Tensor, epochs: int, seed: int, lr: float = 1e-3) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=gen).split(64):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def mlp(hidden: Sequence[int], seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return MLP(input_shape=[1, 8, 8], num_outputs=10, hidden=list(hidden))


def mean_std(values: Sequence[float], scale: float = 1.0, digits_: int = 3) -> str:
    m = statistics.mean(values) * scale
    s = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{m:.{digits_}f} ± {s:.{digits_}f}"


# ----------------------------------------------------------------------------- lmc
def lmc(seeds: Sequence[int], widths: Sequence[int], epochs: int) -> dict:
    rows: dict[int, dict[str, list[float]]] = {}
    for width in widths:
        acc: dict[str, list[float]] = {}
        for seed in seeds:
            data = digits(seed)
            (xtr, ytr), (xte, yte) = data["train"], data["test"]
            a = train(mlp([width] * 3, 1000 + 2 * seed), xtr, ytr, epochs, seed)
            b = train(mlp([width] * 3, 1001 + 2 * seed), xtr, ytr, epochs, seed + 500)
            test = batches(xte, yte)
            for name, first in (("naive", False), ("aligned", True)):
                r = barrier(a, b, test, alphas=[0.0, 0.25, 0.5, 0.75, 1.0], align_first=first, example_input=xtr[:64])
                if not first:
                    acc.setdefault("acc_a", []).append(r.accuracy[0])
                    acc.setdefault("acc_b", []).append(r.accuracy[-1])
                acc.setdefault(f"{name}_mid_acc", []).append(r.accuracy[2])
                acc.setdefault(f"{name}_mid_barrier", []).append(r.midpoint_loss_barrier)
                acc.setdefault(f"{name}_max_barrier", []).append(r.loss_barrier)
            print(
                f"lmc width {width} seed {seed}: " + ", ".join(f"{k}={v[-1]:.4f}" for k, v in acc.items()), flush=True
            )
        rows[width] = acc
    print(
        "\n| width | test acc A / B | midpoint acc naive | midpoint acc aligned "
        "| loss barrier (midpoint) naive | aligned | max over path naive | aligned |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for width, r in rows.items():
        ab = f"{statistics.mean(r['acc_a']):.3f} / {statistics.mean(r['acc_b']):.3f}"
        print(f"| {width} | {ab} | {mean_std(r['naive_mid_acc'])} | {mean_std(r['aligned_mid_acc'])} | "
              f"{mean_std(r['naive_mid_barrier'])} | {mean_std(r['aligned_mid_barrier'])} | "
              f"{mean_std(r['naive_max_barrier'])} | {mean_std(r['aligned_max_barrier'])} |")  # fmt: skip
    return rows


# ----------------------------------------------------------------------------- tasks
def task_data(seed: int) -> dict[str, dict[str, tuple[Tensor, Tensor]]]:
    data = digits(seed)
    return {t: {s: (f(x), y) for s, (x, y) in data.items()} for t, f in TASKS.items()}


def task_accs(model: nn.Module, data: dict, split: str) -> dict[str, float]:
    return {t: evaluate_classifier(model, batches(*data[t][split]))[1] for t in TASKS}


def load(template: nn.Module, state: dict[str, Tensor]) -> nn.Module:
    model = copy.deepcopy(template)
    model.load_state_dict(state)
    return model.eval()


def best_scale(template: nn.Module, merge: Callable[[float], dict], data: dict) -> tuple[float, nn.Module]:
    scored = []
    for s in SCALES:
        model = load(template, merge(s))
        scored.append((statistics.mean(task_accs(model, data, "val").values()), s, model))
    score, s, model = max(scored, key=lambda r: (r[0], -r[1]))
    return s, model


def finetunes(seed: int, base_epochs: int, ft_epochs: int) -> tuple[nn.Module, dict, dict[str, nn.Module], nn.Module]:
    data = task_data(seed)
    base = train(mlp([256, 256], seed), *data["plain"]["train"], base_epochs, seed)
    tuned = {t: train(copy.deepcopy(base), *data[t]["train"], ft_epochs, seed + 1, lr=5e-4) for t in TASKS}
    xs = torch.cat([data[t]["train"][0] for t in TASKS])
    ys = torch.cat([data[t]["train"][1] for t in TASKS])
    joint = train(copy.deepcopy(base), xs, ys, ft_epochs, seed + 1, lr=5e-4)
    return base, data, tuned, joint


def tasks(seeds: Sequence[int], base_epochs: int, ft_epochs: int) -> dict:
    table: dict[str, dict[str, list[float]]] = {}
    scales: dict[str, list[float]] = {"task arithmetic": [], "TIES (density 0.2)": []}

    def add(row: str, accs: dict[str, float]) -> None:
        for t, v in accs.items():
            table.setdefault(row, {}).setdefault(t, []).append(v)
        table[row].setdefault("mean", []).append(statistics.mean(accs.values()))

    for seed in seeds:
        base, data, tuned, joint = finetunes(seed, base_epochs, ft_epochs)
        sb = base.state_dict()
        fts = [tuned[t].state_dict() for t in TASKS]
        add("base (plain digits only)", task_accs(base, data, "test"))
        for t, m in tuned.items():
            add(f"fine-tune on {t}", task_accs(m, data, "test"))
        s, m = best_scale(base, lambda s, sb=sb, fts=fts: task_arithmetic(sb, fts, s), data)
        scales["task arithmetic"].append(s)
        add("task arithmetic", task_accs(m, data, "test"))
        s, m = best_scale(base, lambda s, sb=sb, fts=fts: ties_merge(sb, fts, density=0.2, scale=s), data)
        scales["TIES (density 0.2)"].append(s)
        add("TIES (density 0.2)", task_accs(m, data, "test"))
        add("multi-task (joint fine-tune)", task_accs(joint, data, "test"))
        print(f"tasks seed {seed}: " + ", ".join(f"{r}={v['mean'][-1]:.3f}" for r, v in table.items()), flush=True)
    print("\n| model | " + " | ".join(TASKS) + " | mean | scale (val) |")
    print("|---|" + "---|" * (len(TASKS) + 2))
    for row, r in table.items():
        sc = ", ".join(f"{s:g}" for s in scales[row]) if row in scales else ""
        print(f"| {row} | " + " | ".join(mean_std(r[t]) for t in [*TASKS, "mean"]) + f" | {sc} |")
    return {"table": table, "scales": scales}


# ----------------------------------------------------------------------------- map
def hypervolume(points: Tensor) -> float:
    """Area dominated by 2-d points (maximised) above the origin."""
    pts = sorted(points.tolist(), key=lambda p: -p[0])
    area, best_y = 0.0, 0.0
    for x, y in pts:
        if y > best_y:
            area += x * (y - best_y)
            best_y = y
    return area


def map_section(seeds: Sequence[int], base_epochs: int, ft_epochs: int) -> dict:
    pair = ["mirrored", "rotated"]
    out: dict[str, list[float]] = {}
    for seed in seeds:
        base, data, tuned, _ = finetunes(seed, base_epochs, ft_epochs)
        sb, fts = base.state_dict(), [tuned[t].state_dict() for t in pair]
        probe = copy.deepcopy(base)

        def evaluate(c: Sequence[float], split: str = "val", probe=probe, sb=sb, fts=fts, data=data) -> list[float]:
            probe.load_state_dict(task_arithmetic(sb, fts, list(c)))
            return [evaluate_classifier(probe, batches(*data[t][split]))[1] for t in pair]

        grid = grid_pareto_front(evaluate, 2, points=11, low=0.0, high=1.5)
        front = map_pareto_front(evaluate, 2, low=0.0, high=1.5, seed=seed)
        # the MAP front's coefficients scored for real (only to report; MAP itself needs none of these)
        step = max(1, len(front.coefficients) // 40)
        chosen = front.coefficients[::step]
        measured = torch.tensor([evaluate(c.tolist()) for c in chosen])
        predicted = front.values[::step]
        hv_grid, hv_map = hypervolume(grid.values), hypervolume(measured)
        for k, v in {
            "grid_evals": grid.evaluations, "map_evals": front.evaluations, "hv_grid": hv_grid, "hv_map": hv_map,
            "r2_mirrored": front.fits[0].r2, "r2_rotated": front.fits[1].r2,
            "pred_error": float((predicted - measured).abs().mean()), "grid_front_size": len(grid.values),
            "map_front_size": len(front.values),
            "best_mean_grid": float(grid.values.mean(1).max()), "best_mean_map": float(measured.mean(1).max()),
        }.items():  # fmt: skip
            out.setdefault(k, []).append(float(v))
        print(f"map seed {seed}: " + ", ".join(f"{k}={v[-1]:.4f}" for k, v in out.items()), flush=True)
    print(
        "\n| front | evaluations | hypervolume (val acc mirrored x rotated) | best mean val acc on the front "
        "| fit R² (mirrored / rotated) | mean abs error, predicted vs measured |"
    )
    print("|---|---|---|---|---|---|")
    print(
        f"| grid 11 x 11 over [0, 1.5]^2 | {int(out['grid_evals'][0])} | {mean_std(out['hv_grid'])} "
        f"| {mean_std(out['best_mean_grid'])} | | |"
    )
    print(
        f"| MAP (quadratic fits) | {int(out['map_evals'][0])} | {mean_std(out['hv_map'])} "
        f"| {mean_std(out['best_mean_map'])} | "
        f"{mean_std(out['r2_mirrored'])} / {mean_std(out['r2_rotated'])} | {mean_std(out['pred_error'])} |"
    )
    return out


# ----------------------------------------------------------------------------- speed
def distance(a: nn.Module, b: nn.Module) -> float:
    sb = dict(b.named_parameters())
    return float(sum((p.detach() - sb[n].detach()).pow(2).sum() for n, p in a.named_parameters()))


def speed(width: int, epochs: int, repeats: int) -> dict:
    data = digits(0)
    xtr, ytr = data["train"]
    a = train(mlp([width] * 3, 1000), xtr, ytr, epochs, 0)
    b = train(mlp([width] * 3, 1001), xtr, ytr, epochs, 500)
    x = xtr[:64]
    try:
        from rebasin import PermutationCoordinateDescent
    except ImportError as err:
        print(f"rebasin not importable: {err}")
        PermutationCoordinateDescent = None
    times: dict[str, list[float]] = {"litplug": [], "rebasin": []}
    results: dict[str, nn.Module] = {}
    for _ in range(repeats):
        t = time.perf_counter()
        results["litplug"] = align(a, b, x)
        times["litplug"].append(time.perf_counter() - t)
        if PermutationCoordinateDescent is not None:
            other = copy.deepcopy(b)
            t = time.perf_counter()
            pcd = PermutationCoordinateDescent(a, other, x)
            pcd.rebasin()
            times["rebasin"].append(time.perf_counter() - t)
            results["rebasin"] = other
    out = {"distance_naive": distance(a, b)}
    print(f"\nMLP 64-{width}-{width}-{width}-10, {repeats} round-robin repeats, median seconds")
    print(
        "| implementation | median time (s) | ratio to litplug | squared distance to A after alignment "
        "| max |output change| |"
    )
    print("|---|---|---|---|---|")
    ref_t = statistics.median(times["litplug"])
    for name, model in results.items():
        t = statistics.median(times[name])
        with torch.no_grad():
            change = float((model(x) - b(x)).abs().max())
        out[name] = {"time": t, "distance": distance(a, model), "change": change}
        print(f"| {name} | {t:.3f} | {t / ref_t:.2f}x | {distance(a, model):.2f} | {change:.1e} |")
    print(f"| (no alignment) | | | {out['distance_naive']:.2f} | |")
    if "rebasin" in results:
        same = all(
            torch.equal(p, results["rebasin"].state_dict()[k]) for k, p in results["litplug"].state_dict().items()
        )
        print(f"same permutations: {same}")
        out["same"] = same
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--sections", nargs="+", default=["lmc", "tasks", "map", "speed"])
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--epochs", type=int, default=20, help="training epochs of the LMC / speed MLPs")
    parser.add_argument("--base-epochs", type=int, default=10)
    parser.add_argument("--ft-epochs", type=int, default=10)
    parser.add_argument("--speed-width", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None, help="also write the raw numbers here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {}
    if "lmc" in args.sections:
        results["lmc"] = lmc(args.seeds, args.widths, args.epochs)
    if "tasks" in args.sections:
        results["tasks"] = tasks(args.seeds, args.base_epochs, args.ft_epochs)
    if "map" in args.sections:
        results["map"] = map_section(args.seeds, args.base_epochs, args.ft_epochs)
    if "speed" in args.sections:
        results["speed"] = speed(args.speed_width, args.epochs, args.repeats)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    main()
