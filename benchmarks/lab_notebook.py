"""What litplug's TensorBoard output costs on the 20-epoch digits run, and the pictures of the cards.

    python benchmarks/lab_notebook.py                      # the overhead (about 5 minutes on 2 CPU cores)
    python benchmarks/lab_notebook.py --images docs/img    # also the runs behind the cards' PNGs
    python benchmarks/lab_notebook.py --repeats 0 --images docs/img --figures soup offline  # some PNGs only

The overhead run is ``litplug fit`` of configs/digits/classifier.yaml (20 epochs) with EMA, SAM
and the sharpness monitor, each repeat in a fresh process (a user's run pays matplotlib's first
draw: font loading, caches). Every call that writes the layout, a figure or the hparams is timed
inside the run (wall clock and process CPU time, rendering and PNG encoding included) and set
against the whole ``fit``. litplug's writers are wrapped before the callbacks and modules import
them, so the timed calls are the ones the run makes. Interleaved with each such run is the same
run with the writers replaced by no-ops (``none``): the difference of the medians of the two
``fit`` times is the end-to-end check (noisier than the timed calls on a shared machine).

With ``--images`` it also runs, on digits: two models from different seeds aligned and averaged
(``align_then_average``: the interpolation figure), short certified training (configs/digits/ibp.yaml,
8 epochs, a 5-epoch eps ramp), the SalUn unlearning recipe after a short original run, the four
fine-tunes of configs/digits/soup_finetune.yaml and their greedy soup (configs/digits/soup.yaml),
two fine-tunes on digits 0-4 and 5-9 and their MAP merge (configs/digits/merge/map.yaml),
and the offline search on the sphere (configs/offline/sphere.yaml, 10 epochs); then copies the
figures out of the event files (TensorBoard's own PNG bytes) into the folder.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import litplug.board as board

WRITERS = ("log_figure", "write_charts", "write_hparams", "write_best")
SPENT: dict[str, list[float]] = {}  # name -> [wall seconds, CPU seconds]


def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            spent = SPENT.setdefault(name, [0.0, 0.0])
            spent[0] += time.perf_counter() - wall
            spent[1] += time.process_time() - cpu

    return wrapper


if os.environ.get("LAB_NOTEBOOK_VARIANT") == "none":
    for _name in WRITERS:
        setattr(board, _name, (lambda *a, **k: {}) if _name == "write_best" else (lambda *a, **k: False))
else:
    for _name in WRITERS:
        setattr(board, _name, timed(_name, getattr(board, _name)))

from litplug.cli import LitplugCLI, main  # noqa: E402  (after the wrapping above)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
VARIANTS = ("extras", "none")


def one_run() -> dict[str, Any]:
    """One 20-epoch run in this process; its timings."""
    args = ["--config", str(CONFIGS / "digits" / "classifier.yaml")]
    for fragment in ("ema", "sam", "sharpness_monitor"):
        args += ["--config", str(CONFIGS / "callbacks" / f"{fragment}.yaml")]
    cli = LitplugCLI(args=[*args, *QUIET], run=False)
    SPENT.clear()
    wall, cpu = time.perf_counter(), time.process_time()
    cli.before_fit()  # the hparams, as `litplug fit` writes them
    cli.trainer.fit(cli.model, cli.datamodule)
    return {
        "epochs": cli.trainer.current_epoch,
        "fit": time.perf_counter() - wall,
        "fit_cpu": time.process_time() - cpu,
        "spent": dict(SPENT),
    }


def overhead(repeats: int) -> None:
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    for r in range(repeats):
        for variant in VARIANTS:  # interleaved: both variants see the same load
            env = {**os.environ, "LAB_NOTEBOOK_VARIANT": variant}
            done = subprocess.run(
                [sys.executable, __file__, "--one"], env=env, capture_output=True, text=True, check=True
            )
            result = json.loads(done.stdout.strip().splitlines()[-1])
            runs[variant].append(result)
            share = sum(w for w, _ in result["spent"].values()) / result["fit"]
            print(f"repeat {r} {variant:6s}: fit {result['fit']:.2f} s, extras {100 * share:.2f}%", flush=True)
    extras = runs["extras"]
    med = statistics.median
    epochs = extras[0]["epochs"]
    print(f"\ndigits classifier + EMA + SAM + SharpnessMonitor, {epochs} epochs, {repeats} repeats (median)")
    for name in sorted(extras[0]["spent"]):
        wall = med(e["spent"][name][0] for e in extras)
        cpu = med(e["spent"][name][1] for e in extras)
        print(f"  {name:14s} {1000 * wall:8.1f} ms wall {1000 * cpu:8.1f} ms CPU")
    share = med(sum(w for w, _ in e["spent"].values()) / e["fit"] for e in extras)
    share_cpu = med(sum(c for _, c in e["spent"].values()) / e["fit_cpu"] for e in extras)
    fit, fit_none = med(e["fit"] for e in extras), med(e["fit"] for e in runs["none"])
    print(f"  fit {fit:.2f} s (extras no-ops: {fit_none:.2f} s, difference {100 * (fit / fit_none - 1):+.2f}%)")
    print(f"  TensorBoard extras / fit: {100 * share:.2f}% wall, {100 * share_cpu:.2f}% CPU (bound: 2%)")


def _copy_images(run: Path, out: Path, names: dict[str, str]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run), size_guidance={"images": 0})
    acc.Reload()
    for tag, file in names.items():
        (out / file).write_bytes(acc.Images(tag)[-1].encoded_image_string)
        print(f"  {tag} -> {out / file}")


RUNS = Path("runs")


def sharpness_image(out: Path) -> None:
    """From the first timed run (needs ``--repeats`` >= 1)."""
    _copy_images(RUNS / "litplug" / "version_0", out, {"sharpness/layers": "sharpness_layers.png"})


def merge_image(out: Path) -> None:
    runs = RUNS
    seeds = []
    for seed in (0, 1):
        main(["fit", "--config", str(CONFIGS / "digits" / "soup_finetune.yaml"), f"--seed_everything={seed}",
              f"--trainer.logger.init_args.version=seed_{seed}", "--test_after_fit=false", *QUIET])  # fmt: skip
        seeds.append(f"runs/soup/seed_{seed}/checkpoints/last.ckpt")
    main(["validate", "--config", str(CONFIGS / "digits" / "merge" / "align_then_average.yaml"),
          f"--model.init_args.checkpoints={seeds}", *QUIET])  # fmt: skip
    _copy_images(runs / "merge" / "align_then_average", out, {"merge/interpolation": "merge_interpolation.png"})


def map_image(out: Path) -> None:
    """A base on all digits (5 epochs), a fine-tune on digits 0-4 and one on 5-9, their MAP merge."""
    finetune = CONFIGS / "digits" / "soup_finetune.yaml"
    main(["fit", "--config", str(finetune), "--trainer.max_epochs=5", "--trainer.logger.init_args.version=base",
          "--test_after_fit=false", *QUIET])  # fmt: skip
    for task in (0, 1):
        main(["fit", "--config", str(finetune), "--data.class_path=DigitsTasks", f"--data.init_args.train_task={task}",
              "--ckpt_path=runs/soup/base/checkpoints/last.ckpt", f"--trainer.logger.init_args.version=task_{task}",
              "--test_after_fit=false", *QUIET])  # fmt: skip
    main(["validate", "--config", str(CONFIGS / "digits" / "merge" / "map.yaml"), *QUIET])
    _copy_images(RUNS / "merge" / "map", out, {"merge/pareto": "merge_pareto.png"})


def certified_images(out: Path) -> None:
    runs = RUNS
    warmup = ("{trainer: {callbacks: [{class_path: IBPWarmup, init_args: {start_epoch: 1, ramp_epochs: 5, "
              "schedule: smoothed, ibp_init: true, regularizer_weight: 0.5, "
              "regularizer_tolerance: 0.5}}]}}")  # fmt: skip
    main(["fit", "--config", str(CONFIGS / "digits" / "ibp.yaml"), "--config", warmup, "--trainer.max_epochs=8",
          "--trainer.logger.init_args.name=ibp", "--test_after_fit=false", *QUIET])  # fmt: skip
    _copy_images(
        runs / "ibp" / "version_0",
        out,
        {
            "certified/layer_bound_width": "certified_bound_width.png",
            "certified/layer_unstable_relu": "certified_unstable_relu.png",
            "certified/verified_vs_eps": "certified_verified_vs_eps.png",
        },
    )


def unlearning_images(out: Path) -> None:
    runs = RUNS
    unlearning = CONFIGS / "digits" / "unlearning"
    main(["fit", "--config", str(unlearning / "original.yaml"), "--trainer.max_epochs=10",
          "--trainer.logger.init_args.name=original", "--test_after_fit=false", *QUIET])  # fmt: skip
    main(["fit", "--config", str(unlearning / "class.yaml"), "--config",
          str(unlearning / "methods" / "random_label_saliency.yaml"), "--trainer.logger.init_args.name=salun",
          "--test_after_fit=false", *QUIET])  # fmt: skip
    _copy_images(
        runs / "salun" / "version_0",
        out,
        {"unlearn/mask_layers": "unlearning_mask_layers.png", "unlearn/sample_loss": "unlearning_sample_loss.png"},
    )


def soup_image(out: Path) -> None:
    """The four fine-tunes of configs/digits/soup_finetune.yaml (its header), then their greedy soup."""
    finetune = str(CONFIGS / "digits" / "soup_finetune.yaml")
    for version, extra in (
        ("lr_1e-3", []),
        ("lr_3e-3", ["--model.init_args.optimizer.init_args.lr=0.003"]),
        ("lr_3e-4", ["--model.init_args.optimizer.init_args.lr=0.0003"]),
        ("wd_1e-2", ["--model.init_args.optimizer.init_args.weight_decay=0.01"]),
    ):
        main(["fit", "--config", finetune, f"--trainer.logger.init_args.version={version}", *extra,
              "--test_after_fit=false", *QUIET])  # fmt: skip
    main(["validate", "--config", str(CONFIGS / "digits" / "soup.yaml"), *QUIET])
    _copy_images(RUNS / "soup" / "soup", out, {"soup/greedy": "soup_greedy.png"})


def offline_image(out: Path) -> None:
    """configs/offline/sphere.yaml (10 epochs): the search's designs against the dataset."""
    main(["fit", "--config", str(CONFIGS / "offline" / "sphere.yaml"), "--trainer.max_epochs=10",
          "--trainer.logger.init_args.name=offline", "--test_after_fit=false", *QUIET])  # fmt: skip
    _copy_images(RUNS / "offline" / "version_0", out, {"offline/designs": "offline_designs.png"})


IMAGES = {
    "sharpness": sharpness_image,
    "merge": merge_image,
    "map": map_image,
    "certified": certified_images,
    "unlearning": unlearning_images,
    "soup": soup_image,
    "offline": offline_image,
}


def run(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, help="also render the cards' PNGs into this folder")
    parser.add_argument("--repeats", type=int, default=5, help="runs of each variant, interleaved (0: none)")
    parser.add_argument("--figures", nargs="+", choices=list(IMAGES), default=list(IMAGES), help="which PNGs")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # one timed run (a child process)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(one_run()))
        return
    out = args.images.resolve() if args.images else None
    work = Path(tempfile.mkdtemp(prefix="litplug_tb_"))
    cwd = os.getcwd()
    os.chdir(work)
    try:
        if args.repeats:
            overhead(args.repeats)
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            for name in args.figures:
                IMAGES[name](out)
    finally:
        os.chdir(cwd)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    run(sys.argv[1:])
