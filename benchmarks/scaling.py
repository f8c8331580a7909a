"""Cost at scale: step time and extra peak memory of each plugin, from ~1M to >=100M parameters.

    OMP_NUM_THREADS=1 python benchmarks/scaling.py             # full run, writes benchmarks/SCALING.md + .png
    OMP_NUM_THREADS=1 python benchmarks/scaling.py --quick     # two small sizes, a few steps (a smoke run)

Rows: EMA, SWA, SAM (every step, every 5 steps), ``pytorch_optimizer.SAM`` (the peer, manual
optimisation), IGNITE (:class:`~litplug.callbacks.SurrogateSharpness`) and UnlearningMask
(``magnitude``, ratio 0.5) on Lightning's demo encoder-decoder Transformer
(``lightning.pytorch.demos.Transformer``, vocabulary 1000, dropout 0) of growing width and depth,
256 tokens per step (batch 8 x sequence 32) at every size;
the IBP training step (:class:`~litplug.modules.CertifiedClassifier` after warmup) and
``certify`` on CNN7 of growing width. Every model trains with SGD (momentum 0.9) on random data.

Each measurement is one ``Trainer.fit`` in a fresh process (``--child``), so that a peak is that
run's own. Per size, every variant first gets one memory run (``MEMORY_STEPS`` steps), then the
timing runs go round-robin over the variants, plain included, ``--rounds`` times (interleaved, so
load changes on a shared machine hit every variant alike).

* step time: a callback (the last one) times every step from batch start to batch end after two
  warmup steps and before the epoch's last step (in which SWA takes its snapshot: a cost per
  epoch, not per step); a run's step time is the median over its steps (for SAM every 5 steps, the
  median over its 5-step cycles of one perturbed and four plain steps); the best run over the
  rounds is reported (the run least disturbed by other load). EMA's update, all of its per-step
  work, is also timed inside the run (its ``on_train_batch_end``), which run-to-run noise does not
  reach. Ratio = variant / plain of the same size; the extra time per step is the difference.
  Timing runs fix glibc's mmap threshold at its 32 MB maximum and never trim the heap, so that a
  step reuses freed memory as steps of a long run do (with glibc's adaptive default, whether a
  step pays page faults depends on what the process freed before, which moved single ratios by up
  to 30%; this also makes the CPU allocator behave like PyTorch's caching allocator on CUDA).
* extra peak memory: the memory run's peak resident set size (``resource.getrusage``,
  ``ru_maxrss``) minus the plain memory run's, in multiples of the parameter bytes. glibc's mmap
  threshold is pinned low (``MALLOC_MMAP_THRESHOLD_``) in memory runs, so that freed tensors go
  back to the system and the peak is that of live tensors; not in timing runs, where it would turn
  every large allocation into fresh pages (page faults in every step). On CUDA,
  ``torch.cuda.max_memory_allocated`` instead.
* ``certify``: samples/s of ``CertifiedClassifier.certify`` over samples/s of the plain forward
  (eval mode, no gradients), interleaved in one process; reported as a throughput ratio.

Floors (extra memory a plugin cannot avoid): EMA/SWA one averaged copy (1.0x), SAM the
perturbation (1.0x), UnlearningMask the frozen values of the masked half of the weights in scope
plus one bit per entry (``(1 - ratio) + 1/32`` of the scoped fp32 bytes), IGNITE the copy of the
weights (or of the perturbed weights) and the loss gradient kept across its two extra passes (2.0x).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
VOCAB = 1000
# name -> (d_model, nlayers, heads, batch, seq, steps): nlayers encoder and nlayers decoder layers;
# 8 x 32 = 256 tokens per step at every size
TRANSFORMERS = {
    "1M": (128, 2, 4, 8, 32, 10),
    "10M": (256, 5, 4, 8, 32, 10),
    "30M": (512, 4, 8, 8, 32, 10),
    "100M": (768, 6, 8, 8, 32, 10),
}
WARMUP = 2  # untimed steps at the start of a run
MEMORY_STEPS = 2  # steps of a memory run (the peak is reached in the first perturbed/averaged step)
# name -> (width, linear, batch, steps)
CONVNETS = {"1M": (16, 128, 16, 10), "10M": (32, 640, 8, 10), "100M": (64, 3072, 4, 5)}
TRANSFORMER_VARIANTS = ["plain", "ema", "swa", "sam", "sam_every5", "peer_sam", "ignite", "mask"]
CONV_VARIANTS = ["plain", "ibp", "certify"]
QUICK = {"transformer": {"1M": (128, 2, 4, 4, 16, 5), "10M": (256, 5, 4, 2, 16, 5)}, "conv": {"1M": (16, 128, 8, 5)}}
LABELS = {
    "ema": "EMA",
    "swa": "SWA",
    "sam": "SAM (every step)",
    "sam_every5": "SAM (every 5 steps)",
    "peer_sam": "pytorch_optimizer.SAM",
    "ignite": "IGNITE",
    "mask": "UnlearningMask (magnitude, 0.5)",
    "ibp": "IBP step (CertifiedClassifier)",
    "certify": "certify (throughput vs plain forward)",
}


# ----------------------------------------------------------------------------- the child run
def _child(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F
    from lightning.pytorch import Callback, LightningModule, Trainer
    from torch.utils.data import DataLoader

    torch.manual_seed(0)
    device = spec["device"]
    cuda = device == "cuda"
    variant, family = spec["variant"], spec["family"]

    class StepClock(Callback):
        def __init__(self) -> None:
            self.t0, self.durations = 0.0, []

        def _now(self) -> float:
            if cuda:
                torch.cuda.synchronize()
            return time.perf_counter()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.t0 = self._now()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            # two warmup steps (the allocator's heap grows in the first ones); the epoch's last step
            # is not timed: SWA's snapshot runs in it, a cost per epoch (see the notes), not per step
            if WARMUP <= batch_idx < WARMUP + steps:
                self.durations.append(self._now() - self.t0)

    def sgd(params):
        return torch.optim.SGD(params, lr=1e-3, momentum=0.9)

    callbacks: list[Callback] = []
    hook_durations: list[float] = []
    if family == "transformer":
        from lightning.pytorch.demos import Transformer

        d, layers, heads, batch, seq, steps = spec["config"]
        steps = MEMORY_STEPS if spec["measure"] == "memory" else steps

        class LM(LightningModule):
            def __init__(self, manual: bool = False) -> None:
                super().__init__()
                self.model = Transformer(vocab_size=VOCAB, ninp=d, nhead=heads, nhid=4 * d, nlayers=layers, dropout=0.0)
                self.automatic_optimization = not manual

            def forward(self, x):
                return self.model(x, x)

            def batch_loss(self, batch):
                x, y = batch
                return F.nll_loss(self(x), y.reshape(-1))

            def training_step(self, batch, batch_idx):
                if self.automatic_optimization:
                    return self.batch_loss(batch)
                opt = self.optimizers()

                def second_pass():
                    loss = self.batch_loss(batch)
                    self.manual_backward(loss)
                    return loss

                opt.zero_grad()
                self.manual_backward(self.batch_loss(batch))
                opt.step(closure=second_pass)  # pytorch_optimizer.SAM: first_step, closure at w + e, second_step

            def configure_optimizers(self):
                if self.automatic_optimization:
                    return sgd(self.parameters())
                from pytorch_optimizer import SAM as PeerSAM

                return PeerSAM(self.parameters(), torch.optim.SGD, rho=0.05, lr=1e-3, momentum=0.9)

        model = LM(manual=variant == "peer_sam")
        data = [
            (torch.randint(0, VOCAB, (batch, seq)), torch.randint(0, VOCAB, (batch, seq)))
            for _ in range(steps + WARMUP + 1)
        ]
        from litplug.callbacks import EMA, SAM, SWA, SurrogateSharpness, UnlearningMask

        make = {
            "ema": lambda: EMA(decay=0.999),
            "swa": lambda: SWA(start_epoch=0),
            "sam": lambda: SAM(rho=0.05),
            "sam_every5": lambda: SAM(rho=0.05, every_n_steps=5),
            "ignite": lambda: SurrogateSharpness(),
            "mask": lambda: UnlearningMask("magnitude", ratio=0.5),
        }
        if variant in make:
            callbacks.append(make[variant]())
        if variant == "ema":  # EMA's whole per-step cost is its batch-end update: time it inside the run
            ema, update = callbacks[-1], callbacks[-1].on_train_batch_end

            def timed_update(trainer, pl_module, outputs, batch, batch_idx):
                t0 = time.perf_counter()
                update(trainer, pl_module, outputs, batch, batch_idx)
                if WARMUP <= batch_idx < WARMUP + steps:
                    hook_durations.append(time.perf_counter() - t0)

            ema.on_train_batch_end = timed_update
    else:
        from litplug.modules import CNN7, CertifiedClassifier, Classifier

        width, linear, batch, steps = spec["config"]
        steps = MEMORY_STEPS if spec["measure"] == "memory" else steps
        backbone = CNN7([3, 32, 32], 10, width, linear)
        if variant == "plain":
            model = Classifier(backbone, num_classes=10, optimizer=sgd)
        else:
            model = CertifiedClassifier(
                backbone, eps=8 / 255, mean=(0.0,), std=(1.0,), pixel_range=(0.0, 1.0), optimizer=sgd
            )
        data = [(torch.rand(batch, 3, 32, 32), torch.randint(0, 10, (batch,))) for _ in range(steps + WARMUP + 1)]

    params = sum(p.numel() * p.element_size() for p in model.parameters())
    scoped = sum(p.numel() * p.element_size() for p in model.parameters() if p.dim() >= 2)
    result: dict[str, Any] = {
        "param_bytes": params,
        "scoped_bytes": scoped,
        "params": sum(p.numel() for p in model.parameters()),
    }
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    if variant == "certify":
        model = model.to(device).eval()
        x = data[0][0].repeat(4, 1, 1, 1).to(device)
        y = data[0][1].repeat(4).to(device)
        times: list[list[float]] = [[], []]
        with torch.no_grad():
            for i in range(steps + 1):
                for j, fn in enumerate((lambda: model.backbone(x), lambda: model.certify(x, y))):
                    t0 = time.perf_counter()
                    fn()
                    if cuda:
                        torch.cuda.synchronize()
                    if i:
                        times[j].append(time.perf_counter() - t0)
        result["forward_s"], result["certify_s"] = statistics.median(times[0]), statistics.median(times[1])
    else:
        clock = StepClock()
        trainer = Trainer(
            accelerator="gpu" if cuda else "cpu",
            devices=1,
            max_epochs=1,
            max_steps=len(data),
            callbacks=[*callbacks, clock],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            limit_val_batches=0,
        )
        trainer.fit(model, DataLoader(data, batch_size=None))
        # median over cycles of the plugin's schedule (5 steps for SAM every 5, else 1 step): a step
        # disturbed by other load on the machine does not move it
        cycle = 5 if variant == "sam_every5" else 1
        means = [sum(clock.durations[i : i + cycle]) / cycle for i in range(0, len(clock.durations), cycle)]
        result["step_s"] = statistics.median(means)
        result["steps_s"] = clock.durations
        if hook_durations:
            result["hook_s"] = statistics.median(hook_durations)
    result["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if cuda:
        result["cuda_peak"] = torch.cuda.max_memory_allocated()
    return result


def _run_child(spec: dict[str, Any], threads: int) -> dict[str, Any]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore")
    if spec["measure"] == "memory":
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"  # freed tensors go back to the system: the peak is of live tensors
    else:  # steady state: freed memory stays in the heap and is reused, as in a long run (no page faults per step)
        env.update(MALLOC_MMAP_THRESHOLD_=str(32 << 20), MALLOC_TRIM_THRESHOLD_=str(1 << 40))
    out = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)], env=env, capture_output=True, text=True, check=False
    )
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"child {spec} failed:\n{out.stderr[-3000:]}")


# ----------------------------------------------------------------------------- the parent
FLOORS = {"ema": "1.00", "swa": "1.00", "sam": "1.00", "sam_every5": "1.00", "peer_sam": "1.00", "ignite": "2.00"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="two small sizes, a few steps")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved runs of every variant per size")
    parser.add_argument("--sizes", nargs="*", help="subset of the model sizes (e.g. 1M 100M)")
    parser.add_argument("--variants", nargs="*", help="subset of the variants (plain always runs)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(HERE / "SCALING"), help="path stem of the .md table and the .png plot")
    parser.add_argument("--render", help="re-render the .md and .png from a .json this script wrote (no runs)")
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(_child(json.loads(args.child))), flush=True)
        return
    if args.render:
        saved = json.loads(Path(args.render).read_text())
        if isinstance(saved, dict):
            vars(args).update(saved["args"])
        _write(saved["rows"] if isinstance(saved, dict) else saved, args)
        return

    families = QUICK if args.quick else {"transformer": TRANSFORMERS, "conv": CONVNETS}
    variants = {"transformer": TRANSFORMER_VARIANTS, "conv": CONV_VARIANTS}
    rows: list[dict[str, Any]] = []
    for family, sizes in families.items():
        if args.variants and not set(args.variants) & set(variants[family]):
            continue  # no variant of this family asked for
        for size, config in sizes.items():
            if args.sizes and size not in args.sizes:
                continue
            chosen = [v for v in variants[family] if not args.variants or v == "plain" or v in args.variants]
            runs: dict[str, list[dict[str, Any]]] = {v: [] for v in chosen}
            memory: dict[str, dict[str, Any]] = {}
            for variant in chosen:  # one memory run each: the peak does not depend on the load
                if variant != "certify":
                    spec = {"family": family, "variant": variant, "config": list(config), "device": args.device}
                    memory[variant] = _run_child({**spec, "measure": "memory"}, args.threads)
                    print(f"  {family} {size} {variant} memory: {memory[variant]['peak_rss']}", file=sys.stderr)
            for _ in range(1 if args.quick else args.rounds):
                for variant in chosen:
                    spec = {"family": family, "variant": variant, "config": list(config), "device": args.device}
                    runs[variant].append(_run_child({**spec, "measure": "time"}, args.threads))
                    r = runs[variant][-1]
                    print(f"  {family} {size} {variant}: {r.get('step_s', r.get('certify_s'))}", file=sys.stderr)
            rows.extend(_rows(family, size, runs, memory, args.device))
    saved = {
        "args": {"quick": args.quick, "rounds": args.rounds, "device": args.device, "threads": args.threads},
        "rows": rows,
    }
    Path(args.out + ".json").write_text(json.dumps(saved, indent=1))
    _write(rows, args)


def _write(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    table = _table(rows, args)
    print(table)
    Path(args.out + ".md").write_text(table)
    _plot(rows, args.out + ".png")


def _rows(
    family: str,
    size: str,
    runs: dict[str, list[dict[str, Any]]],
    memory: dict[str, dict[str, Any]],
    device: str,
) -> list[dict[str, Any]]:
    mem_key = "cuda_peak" if device == "cuda" else "peak_rss"
    plain = runs["plain"]
    base_t = min(r["step_s"] for r in plain)
    base_m = memory["plain"][mem_key]
    pbytes = plain[0]["param_bytes"]
    out = []
    for variant, rs in runs.items():
        if variant == "plain":
            continue
        row = {"family": family, "size": size, "variant": variant, "params": plain[0]["params"], "plain_step_s": base_t}
        if variant == "certify":
            row["ratio"] = min(r["forward_s"] for r in rs) / min(r["certify_s"] for r in rs)
            row["extra_mem"] = None
        else:
            row["ratio"] = min(r["step_s"] for r in rs) / base_t
            row["extra_ms"] = 1e3 * (min(r["step_s"] for r in rs) - base_t)
            row["rounds"] = [r["step_s"] for r in rs]  # per round, in the order run (interleaved)
            row["plain_rounds"] = [r["step_s"] for r in plain]
            if "hook_s" in rs[0]:
                row["hook_ms"] = 1e3 * min(r["hook_s"] for r in rs)
            row["extra_mem"] = (memory[variant][mem_key] - base_m) / pbytes
        if variant == "mask":
            row["floor"] = f"{0.53125 * plain[0]['scoped_bytes'] / pbytes:.2f}"
        else:
            row["floor"] = FLOORS.get(variant, "-")
        out.append(row)
    return out


def _table(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    import platform

    import torch

    where = (
        "CUDA (max_memory_allocated)" if args.device == "cuda" else f"CPU, {args.threads} thread(s) per run, peak RSS"
    )
    lines = [
        "# Cost at scale: step time and extra peak memory of each plugin\n",
        f"One run of `OMP_NUM_THREADS={args.threads} python benchmarks/scaling.py{' --quick' if args.quick else ''} "
        f"--rounds {1 if args.quick else args.rounds}` on {where}; torch {torch.__version__}, {platform.machine()}, "
        f"{os.cpu_count()} cores "
        "shared with other work. " + ("Not run on GPU.\n" if args.device == "cpu" else "\n"),
        "![step overhead and extra peak memory against model size](SCALING.png)\n",
        "| model | params | plugin | step time (x plain) | extra time per step | extra peak memory (x param bytes) "
        "| memory floor |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        model = ("Transformer" if r["family"] == "transformer" else "CNN7") + f" {r['size']}"
        ratio = f"{r['ratio']:.2f}" + (" (throughput)" if r["variant"] == "certify" else "")
        mem = "-" if r["extra_mem"] is None else f"{r['extra_mem']:.2f}"
        ms = f"{r['extra_ms']:+.0f} ms" if "extra_ms" in r else "-"
        lines.append(
            f"| {model} | {r['params'] / 1e6:.1f}M | {LABELS[r['variant']]} | {ratio} | {ms} | {mem} | {r['floor']} |"
        )
    transformers = [r for r in rows if r["family"] == "transformer" and "plain_rounds" in r]
    largest = max(transformers, key=lambda r: r["params"])["plain_rounds"] if transformers else []
    plain_rounds = " / ".join(f"{t:.2f}" for t in largest) or "-"
    lines += ["", *_verdicts(rows), "", NOTES.format(plain_rounds=plain_rounds)]
    return "\n".join(lines) + "\n"


NOTES = """Reading the table:

- Memory is the memory run's peak resident set size minus the plain memory run's at the same
  size, in multiples of the parameter bytes; it does not depend on the load of the machine. The
  floor is what the plugin must hold (module docstring of `benchmarks/scaling.py`). At the small
  sizes the activations of the backward dominate the peak, so a copy allocated outside it (SWA's
  snapshot, taken after the epoch's last step) adds less than its size, and an allocator's
  rounding more; the 100M rows are the ones where the weights dominate.
- Step times are best-of-rounds medians of the steps of a run, one thread per run. The per-step
  overheads that are memory passes (EMA's lerp and finiteness check, the mask's pass over the
  gradients, SAM's norm and perturbation) cost a fixed time per parameter (the "extra time per
  step" column), so their ratio depends on how much compute a step has: here 256 tokens per step
  of the Transformers (batch 8 x sequence 32) and batch 16/8/4 of the CNN7 models. On one CPU
  core one pass over 100M fp32 values (a `copy_`) takes about 24 ms.
- Not timed: the epoch's last step, in which SWA takes its snapshot (a cost per epoch: the first
  snapshot, which also re-lays the weights into one buffer, added about 2.7 s to the last step of
  a 100M run in separate runs of this script's child). Run-to-run noise of a step on this machine
  is several percent (plain runs of the largest Transformer in this run: {plain_rounds} s), as
  large as the EMA and mask overheads and as the gap between SAM and its peer, so the whole-step
  ratios bound those only to within it; the verdicts give each round's ratio to the plain run of
  the same round beside the best-of-rounds ratio, and EMA's update is also timed inside the run.
- The IBP rows use CNN7 of growing width and hidden linear size; `certify` is the throughput of
  `CertifiedClassifier.certify` over the plain forward's (eval mode, no gradients)."""


def _verdicts(rows: list[dict[str, Any]]) -> list[str]:
    """Each step-overhead target at the largest size measured, and whether this run meets it."""
    out = ["Targets at the largest size of each family (this run):", ""]
    top: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r["variant"] not in top or r["params"] > top[r["variant"]]["params"]:
            top[r["variant"]] = r
    checks = [
        ("ema", "EMA step <= 1.02x plain (whole steps)", lambda r: r["ratio"] <= 1.02),
        ("mask", "UnlearningMask step <= 1.05x plain", lambda r: r["ratio"] <= 1.05),
        ("sam", "SAM every step <= 2.05x plain", lambda r: r["ratio"] <= 2.05),
        ("ibp", "IBP step <= 2.8x plain", lambda r: r["ratio"] <= 2.8),
        ("certify", "certify >= 0.45x the plain forward's throughput", lambda r: r["ratio"] >= 0.45),
    ]
    for variant, text, ok in checks:
        if variant in top:
            r = top[variant]
            paired = ""  # each round's run over that round's plain run (adjacent in time)
            if r.get("rounds") and r.get("plain_rounds"):
                per_round = " / ".join(f"{x / y:.2f}" for x, y in zip(r["rounds"], r["plain_rounds"]))
                paired = f" (per round: {per_round})"
            verdict = "holds" if ok(r) else "does not hold"
            out.append(f"- {text}: {r['ratio']:.2f}{paired} at {r['params'] / 1e6:.0f}M: {verdict}")
    if "hook_ms" in top.get("ema", {}):
        r = top["ema"]
        share = r["hook_ms"] / (1e3 * r["plain_step_s"])
        verdict = "holds" if share <= 0.02 else "does not hold"
        out.append(
            f"- EMA step <= 1.02x plain (its update timed inside the run): {r['hook_ms']:.0f} ms per step = "
            f"{share:.1%} of the plain step at {r['params'] / 1e6:.0f}M: {verdict}"
        )
    if "sam" in top and "peer_sam" in top:
        a, b = top["sam"]["ratio"], top["peer_sam"]["ratio"]
        ahead = [x < y for x, y in zip(top["sam"].get("rounds", []), top["peer_sam"].get("rounds", []))]
        times = ", ".join(
            f"{x:.2f} s vs {y:.2f} s" for x, y in zip(top["sam"].get("rounds", []), top["peer_sam"].get("rounds", []))
        )
        out.append(
            f"- SAM ahead of pytorch_optimizer.SAM in every round: {a:.2f} vs {b:.2f} (best rounds); per round "
            f"{times}: ahead in {sum(ahead)} of {len(ahead)}: {'holds' if ahead and all(ahead) else 'does not hold'}"
        )
    for variant in ("ema", "swa", "sam", "ignite", "mask"):
        r = top.get(variant)
        if r and r["extra_mem"] is not None:
            floor = float(r["floor"])
            ok = r["extra_mem"] <= 1.1 * floor
            out.append(
                f"- {LABELS[variant]} extra memory within 10% of its floor {floor:.2f}: {r['extra_mem']:.2f}: "
                f"{'holds' if ok else 'does not hold'}"
            )
    return out


def _plot(rows: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    for variant in dict.fromkeys(r["variant"] for r in rows):
        rs = sorted((r for r in rows if r["variant"] == variant), key=lambda r: r["params"])
        xs = [r["params"] for r in rs]
        ax_t.plot(xs, [r["ratio"] for r in rs], "o-", label=LABELS[variant])
        if all(r["extra_mem"] is not None for r in rs):
            ax_m.plot(xs, [r["extra_mem"] for r in rs], "o-", label=LABELS[variant])
    ax_t.set(
        xscale="log",
        xlabel="parameters",
        ylabel="step time / plain (certify: throughput / plain)",
        title="step overhead",
    )
    ax_m.set(xscale="log", xlabel="parameters", ylabel="extra peak memory / parameter bytes", title="memory overhead")
    ax_t.grid(alpha=0.3)
    ax_m.grid(alpha=0.3)
    ax_t.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
