"""IBP vs CROWN-IBP training on digits, each model verified with IBP, CROWN-IBP and CROWN; the
tightness curve (CROWN / IBP widths per layer over training); local Lipschitz bounds against the
largest sampled gradient norm. The tables of docs/certified.md and benchmarks/RESULTS.md.

    PYTHONPATH=<dir holding litplug> python benchmarks/certified_crown.py [--seeds 3] [--eps 0.1 0.2] [--jobs 2]

Each run is configs/digits/crown_ibp.yaml with ``model.init_args.bound`` set to ``ibp`` or
``crown-ibp``, ``model.init_args.eps`` and ``seed_everything`` (``--epochs`` shortens every run
alike, ``--ramp`` sets the eps ramp's length, 15 epochs in the config), plus a
:class:`~litplug.callbacks.BoundTightness` recorder. After fit, on the test split: clean accuracy,
verified accuracy by each verifier, and on ``--lipschitz`` test samples the ratio of the largest
gradient l1 norm over 1,000 sampled points of the eps box to the bound of
:func:`litplug.bounds.local_lipschitz` (<= 1: sound; closer to 1: tighter). Runs go to separate
processes with 1 torch thread each, ``--jobs`` at a time: a run starts as soon as any running
one ends; each run's result goes to stderr (and ``--out``) when it ends, the tables keep the order
seed, eps, training.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CONFIG = "configs/digits/crown_ibp.yaml"
VERIFIERS = ("ibp", "crown-ibp", "crown")


def run_one(
    bound: str, eps: float, seed: int, epochs: int | None, lipschitz: int, ramp: int | None = None, tightness: int = 2
) -> None:
    import torch
    from lightning.pytorch import Callback

    from litplug.bounds import local_lipschitz
    from litplug.callbacks import BoundTightness, IBPWarmup
    from litplug.cli import LitplugCLI

    torch.set_num_threads(1)
    curve: list[dict[str, float]] = []

    class Recorder(Callback):
        def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            if trainer.sanity_checking:
                return
            if trainer.current_epoch % tightness:  # BoundTightness measured nothing: stale metrics
                return
            found = {k.split("/")[-1]: float(v) for k, v in trainer.callback_metrics.items() if "width_ratio" in k}
            if not found:
                return
            curve.append({"epoch": trainer.current_epoch, "eps": float(pl_module.current_eps), **found})

    start = time.perf_counter()
    extra = ["--trainer.max_epochs", str(epochs)] if epochs else []
    cli = LitplugCLI(
        args=[
            "--config", str(ROOT / CONFIG),
            "--model.init_args.eps", str(eps),
            "--model.init_args.bound", bound,
            "--model.init_args.pgd_steps", "0",
            "--seed_everything", str(seed),
            "--trainer.logger", "false",
            "--trainer.enable_checkpointing", "false",
            "--trainer.enable_progress_bar", "false",
            "--trainer.default_root_dir", tempfile.mkdtemp(prefix="certified_crown_"),
            *extra,
        ],
        run=False,
    )  # fmt: skip
    if ramp:
        (warmup,) = [c for c in cli.trainer.callbacks if isinstance(c, IBPWarmup)]
        warmup.ramp_epochs = ramp
    cli.trainer.callbacks.extend([BoundTightness(every_n_epochs=tightness, num_samples=32), Recorder()])
    cli.trainer.fit(cli.model, cli.datamodule)
    seconds = time.perf_counter() - start
    start = time.perf_counter()
    model = cli.model.eval()
    cli.datamodule.setup("test")
    counts = dict.fromkeys(("clean", *VERIFIERS), 0)
    total = 0
    with torch.no_grad():
        for x, y in cli.datamodule.test_dataloader():
            counts["clean"] += int((model(x).argmax(1) == y).sum())
            for method in VERIFIERS:
                counts[method] += int(model.certify(x, y, method)["verified"].sum())
            total += len(y)
    verify_seconds = time.perf_counter() - start
    x = next(iter(cli.datamodule.test_dataloader()))[0][:lipschitz]
    lower, upper = model.box(x, eps)
    bound_l = local_lipschitz(model.backbone, lower, upper)
    ratios = []
    g = torch.Generator().manual_seed(0)
    for i in range(len(x)):
        points = lower[i] + torch.rand(1000, *x.shape[1:], generator=g) * (upper[i] - lower[i])
        points.requires_grad_(True)
        out = model.backbone(points)
        norms = torch.stack(
            [
                torch.autograd.grad(out[:, k].sum(), points, retain_graph=True)[0].flatten(1).abs().sum(1)
                for k in range(out.shape[1])
            ],
            1,
        ).amax(0)
        ratios.append((norms / bound_l[i]).detach())
    ratio = torch.stack(ratios)
    result = {
        "seconds": seconds,
        "eval_seconds": time.perf_counter() - start,
        "verify_seconds": verify_seconds,
        "epochs": cli.trainer.max_epochs,
        **{f"{k}_acc": v / total for k, v in counts.items()},
        "lipschitz_ratio_mean": float(ratio.mean()),
        "lipschitz_ratio_max": float(ratio.max()),
        "lipschitz_bound_mean": float(bound_l.mean()),
        "curve": curve,
    }
    print(json.dumps(result))


def command(run: tuple[str, float, int], args: argparse.Namespace) -> list[str]:
    bound, eps, seed = run
    cmd = [sys.executable, __file__, "--one", bound, str(eps), str(seed)]
    cmd += ["--lipschitz", str(args.lipschitz), "--tightness-every", str(args.tightness_every)]
    if args.epochs:
        cmd += ["--epochs", str(args.epochs)]
    if args.ramp:
        cmd += ["--ramp", str(args.ramp)]
    return cmd


def run_all(todo: list[tuple[str, float, int]], args: argparse.Namespace) -> list[dict]:
    """The result of each run of ``todo``, each in a process of its own, ``args.jobs`` at a time: a
    run starts as soon as any running one ends. Each result is printed (stderr, and appended to
    ``args.out``) when its run ends; the first failure stops the other runs and raises."""
    results: list[dict | None] = [None] * len(todo)
    live: set[subprocess.Popen] = set()

    def one(cmd: list[str]) -> tuple[int, str]:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        live.add(proc)
        stdout, _ = proc.communicate()
        live.discard(proc)
        return proc.returncode, stdout

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(one, command(run, args)): i for i, run in enumerate(todo)}
        for future in as_completed(futures):
            i = futures[future]
            (bound, eps, seed), (code, stdout) = todo[i], future.result()
            if code != 0:
                pool.shutdown(wait=False, cancel_futures=True)
                for proc in list(live):
                    proc.terminate()
                raise RuntimeError(f"run bound={bound} eps={eps} seed={seed} failed with exit code {code}")
            result = results[i] = json.loads(stdout.strip().splitlines()[-1])
            record = {"bound": bound, "eps": eps, "seed": seed, **result}
            print(json.dumps(record), file=sys.stderr)
            if args.out:
                with args.out.open("a") as f:
                    f.write(json.dumps(record) + "\n")
    return [r for r in results if r is not None]


def cell(values: list[float], scale: float = 100.0, digits: int = 1, unit: str = "%") -> str:
    mean = scale * statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.{digits}f}{unit}"
    return f"{mean:.{digits}f} ± {scale * statistics.stdev(values):.{digits}f}{unit}"


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--eps", type=float, nargs="+", default=[0.1, 0.2])
    parser.add_argument("--epochs", type=int, help="max_epochs of every run (default: the config's)")
    parser.add_argument("--ramp", type=int, help="epochs of the eps ramp (default: the config's, 15)")
    parser.add_argument("--tightness-every", type=int, default=2, help="epochs between BoundTightness measurements")
    parser.add_argument("--lipschitz", type=int, default=8, help="test samples for the Lipschitz comparison")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--out", type=Path, help="append each run's result here as a JSON line")
    parser.add_argument("--one", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        bound, eps, seed = args.one
        run_one(bound, float(eps), int(seed), args.epochs, args.lipschitz, args.ramp, args.tightness_every)
        return
    # seed by seed: a partial run covers every cell
    todo = [(bound, eps, seed) for seed in range(args.seeds) for eps in args.eps for bound in ("ibp", "crown-ibp")]
    done = run_all(todo, args)
    results: dict[tuple[str, float], list[dict]] = {}
    for (bound, eps, _), result in zip(todo, done):  # the tables in the order of todo, whatever ended first
        results.setdefault((bound, eps), []).append(result)
    print(f"{args.seeds} seed(s) per cell: mean ± sample std\n")
    print("| eps | training | clean | verified (IBP) | verified (CROWN-IBP) | verified (CROWN) | fit time (s) |")
    print("|---|---|---|---|---|---|---|")
    for (bound, eps), rs in results.items():
        accs = " | ".join(cell([r[f"{k}_acc"] for r in rs]) for k in ("clean", *VERIFIERS))
        print(f"| {eps} | {bound} | {accs} | {statistics.fmean(r['seconds'] for r in rs):.0f} |")
    print("\nTightness: mean CROWN / IBP width per ReLU layer on 32 validation inputs (seed mean)\n")
    for (bound, eps), rs in results.items():
        epochs = len(rs[0]["curve"])
        picks = sorted({0, epochs // 4, epochs // 2, 3 * epochs // 4, epochs - 1})
        for e in picks:
            rows = [r["curve"][e] for r in rs if len(r["curve"]) > e]
            layers = [k for k in rows[0] if k not in ("epoch", "eps")]
            values = ", ".join(f"{k} {statistics.fmean(r.get(k, float('nan')) for r in rows):.3f}" for k in layers)
            print(f"- eps {eps}, {bound}, epoch {rows[0]['epoch']} (eps_t {rows[0]['eps']:.3f}): {values}")
    print("\nLocal Lipschitz (l_inf -> l1): largest sampled gradient norm / bound (1,000 points per sample)\n")
    for (bound, eps), rs in results.items():
        mean = statistics.fmean(r["lipschitz_ratio_mean"] for r in rs)
        worst = max(r["lipschitz_ratio_max"] for r in rs)
        print(f"- eps {eps}, {bound}: mean ratio {mean:.3f}, max ratio {worst:.3f} (<= 1: no violation)")


if __name__ == "__main__":
    main()
