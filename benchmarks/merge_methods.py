"""Every merge of ``litplug.merging`` on the digits task-arithmetic setup, alignment before merging
independently trained models, and merge time against mergekit.

Sections (``--sections``, default all):

* ``methods``: the base MLP and its fine-tunes on plain, mirrored and rotated digits of
  ``benchmarks/merging.py``'s ``tasks`` section; each merge's test accuracy per task, its scale
  chosen on the validation split as there (model stock and the uniform soup have none).
* ``align``: three MLPs trained on plain digits from different seeds; the uniform soup, TIES,
  DARE and model stock (relative to the first model) with and without ``align`` first.
* ``speed``: tiny GPT-2 (``GPT2Config``, 4 layers, width 128, built locally) base and three
  fine-tunes in safetensors; each method end to end (read, merge, write) with litplug and with
  mergekit 0.1.5's ``run_merge`` (``pip install -e ".[bench]"``), round-robin, median of
  ``--repeats``.

    OMP_NUM_THREADS=1 python benchmarks/merge_methods.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from litplug.merging import (
    align,
    breadcrumbs,
    dare,
    della,
    evaluate_classifier,
    linear,
    model_stock,
    slerp,
    task_arithmetic,
    ties_merge,
)
from litplug.merging.states import State
from merging import TASKS, best_scale, digits, finetunes, load, mean_std, mlp, task_accs, train


def merges(sb: State, fts: list[State], seed: int) -> dict[str, Callable[[float], State] | State]:
    """A merge per row: a function of the scale (chosen on validation) or a fixed state."""
    return {
        "task arithmetic": lambda s: task_arithmetic(sb, fts, s),
        "TIES (density 0.2, over the model)": lambda s: ties_merge(sb, fts, density=0.2, scale=s),
        "TIES (density 0.2, per tensor)": lambda s: ties_merge(sb, fts, density=0.2, scale=s, trim="tensor"),
        "DARE (density 0.5)": lambda s: dare(sb, fts, density=0.5, seed=seed, scale=s),
        "DARE-TIES (density 0.5)": lambda s: dare(sb, fts, density=0.5, seed=seed, scale=s, consensus=True),
        "DELLA (density 0.5, epsilon 0.1)": lambda s: della(sb, fts, density=0.5, epsilon=0.1, seed=seed, scale=s),
        "breadcrumbs (density 0.8, gamma 0.01)": lambda s: breadcrumbs(sb, fts, density=0.8, gamma=0.01, scale=s),
        "model stock": model_stock(sb, fts),
        "uniform soup of the fine-tunes": linear(fts),
    }


def methods(seeds: Sequence[int], base_epochs: int, ft_epochs: int) -> dict:
    table: dict[str, dict[str, list[float]]] = {}
    scales: dict[str, list[float]] = {}
    for seed in seeds:
        base, data, tuned, _ = finetunes(seed, base_epochs, ft_epochs)
        sb = base.state_dict()
        fts = [tuned[t].state_dict() for t in TASKS]
        for row, merge in merges(sb, fts, seed).items():
            if callable(merge):
                s, model = best_scale(base, merge, data)
                scales.setdefault(row, []).append(s)
            else:
                model = load(base, merge)
            accs = task_accs(model, data, "test")
            for t, v in accs.items():
                table.setdefault(row, {}).setdefault(t, []).append(v)
            table[row].setdefault("mean", []).append(statistics.mean(accs.values()))
        print(f"methods seed {seed}: " + ", ".join(f"{r}={v['mean'][-1]:.3f}" for r, v in table.items()), flush=True)
    print("\n| merge | " + " | ".join(TASKS) + " | mean | scale (val) |")
    print("|---|" + "---|" * (len(TASKS) + 2))
    for row, r in table.items():
        sc = ", ".join(f"{s:g}" for s in scales.get(row, []))
        print(f"| {row} | " + " | ".join(mean_std(r[t]) for t in [*TASKS, "mean"]) + f" | {sc} |")
    return {"table": table, "scales": scales}


def align_section(seeds: Sequence[int], epochs: int, width: int) -> dict:
    rows: dict[str, list[float]] = {}
    for seed in seeds:
        data = digits(seed)
        (xtr, ytr), (xte, yte) = data["train"], data["test"]
        models = [train(mlp([width, width], 3000 + 3 * seed + i), xtr, ytr, epochs, seed + i) for i in range(3)]
        test = [(xte[i : i + 256], yte[i : i + 256]) for i in range(0, len(yte), 256)]

        def acc(state: State, template=models[0], test=test) -> float:
            return evaluate_classifier(load(template, state), test)[1]

        rows.setdefault("each model (mean of 3)", []).append(statistics.mean(acc(m.state_dict()) for m in models))
        states = [m.state_dict() for m in models]
        aligned = [states[0]] + [align(models[0], s, xtr[:64]) for s in states[1:]]
        for label, ss in (("naive", states), ("aligned", aligned)):
            rows.setdefault(f"uniform soup, {label}", []).append(acc(linear(ss)))
            rows.setdefault(f"TIES (density 0.2, scale 1), {label}", []).append(acc(ties_merge(ss[0], ss[1:], 0.2)))
            rows.setdefault(f"DARE (density 0.5, scale 0.5), {label}", []).append(
                acc(dare(ss[0], ss[1:], 0.5, seed=seed, scale=0.5))
            )
            rows.setdefault(f"model stock, {label}", []).append(acc(model_stock(ss[0], ss[1:])))
        print(f"align seed {seed}: " + ", ".join(f"{r}={v[-1]:.3f}" for r, v in rows.items()), flush=True)
    print("\n| merge of 3 independently trained MLPs | test accuracy |")
    print("|---|---|")
    for row, values in rows.items():
        print(f"| {row} | {mean_std(values)} |")
    return rows


def speed(repeats: int) -> dict:
    import transformers
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions
    from safetensors.torch import load_file, save_file

    root = Path(tempfile.mkdtemp(prefix="merge_speed_"))
    paths = []
    for i in range(4):
        torch.manual_seed(0)
        config = transformers.GPT2Config(n_layer=4, n_embd=128, n_head=4, vocab_size=512, n_positions=64)
        model = transformers.GPT2LMHeadModel(config)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 * i * torch.randn_like(p))
        model.save_pretrained(root / f"m{i}")
        paths.append(str(root / f"m{i}"))
    base, fts = paths[0], paths[1:]
    kits = {
        "linear": ({"merge_method": "linear", "models": [{"model": p, "parameters": {"weight": 1.0}} for p in fts]},
                   lambda s: linear(s[1:])),
        "slerp": ({"merge_method": "slerp", "base_model": fts[0], "models": [{"model": fts[0]}, {"model": fts[1]}],
                   "parameters": {"t": 0.3}}, lambda s: slerp(s[1], s[2], 0.3)),
        "task_arithmetic": ({"merge_method": "task_arithmetic", "base_model": base,
                             "models": [{"model": p, "parameters": {"weight": 0.5}} for p in fts]},
                            lambda s: task_arithmetic(s[0], s[1:], 0.5)),
        "ties": ({"merge_method": "ties", "base_model": base,
                  "models": [{"model": p, "parameters": {"weight": 1.0, "density": 0.2}} for p in fts]},
                 lambda s: ties_merge(s[0], s[1:], 0.2, trim="tensor")),
        "breadcrumbs": ({"merge_method": "breadcrumbs", "base_model": base,
                         "models": [{"model": p, "parameters": {"weight": 0.5, "density": 0.8, "gamma": 0.01}}
                                    for p in fts]},
                        lambda s: breadcrumbs(s[0], s[1:], 0.8, 0.01, 0.5)),
        "model_stock": ({"merge_method": "model_stock", "base_model": base, "models": [{"model": p} for p in fts]},
                        lambda s: model_stock(s[0], s[1:])),
    }  # fmt: skip
    options = MergeOptions(copy_tokenizer=False, quiet=True, write_model_card=False)
    times: dict[str, dict[str, list[float]]] = {m: {"litplug": [], "mergekit": []} for m in kits}
    for r in range(repeats + 1):  # the first round warms up both
        for method, (config, ours) in kits.items():
            t = time.perf_counter()
            states = [load_file(f"{p}/model.safetensors") for p in paths]
            save_file(ours(states), str(root / f"ours_{method}.safetensors"))
            t_ours = time.perf_counter() - t
            t = time.perf_counter()
            run_merge(MergeConfiguration.model_validate(config), str(root / f"kit_{method}"), options)
            t_kit = time.perf_counter() - t
            if r:
                times[method]["litplug"].append(t_ours)
                times[method]["mergekit"].append(t_kit)
    n = sum(p.numel() for p in load_file(f"{paths[0]}/model.safetensors").values())
    print(f"\nGPT-2 4 x 128 ({n / 1e6:.2f}M parameters), float32, read + merge + write, median of {repeats}:")
    print("\n| method | litplug (s) | mergekit (s) | mergekit / litplug |")
    print("|---|---|---|---|")
    out = {}
    for method, t in times.items():
        a, b = statistics.median(t["litplug"]), statistics.median(t["mergekit"])
        out[method] = (a, b)
        print(f"| {method} | {a:.3f} | {b:.3f} | {b / a:.1f}x |")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--sections", nargs="+", default=["methods", "align", "speed"])
    parser.add_argument("--base-epochs", type=int, default=10)
    parser.add_argument("--ft-epochs", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=20, help="training epochs of the independent MLPs")
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if "methods" in args.sections:
        methods(args.seeds, args.base_epochs, args.ft_epochs)
    if "align" in args.sections:
        align_section(args.seeds, args.epochs, args.width)
    if "speed" in args.sections:
        speed(args.repeats)


if __name__ == "__main__":
    main()
