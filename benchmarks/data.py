"""Digits: data pruning (EL2N, GraNd, forgetting, random) against the kept fraction, early vs late
scores, and noisy-label training (CE, ELR, PS-KD, label smoothing); 3 seeds; scoring cost and
pruned-epoch time measured in the same runs.

    python benchmarks/data.py pruning [--seeds 0 1 2]
    python benchmarks/data.py noise [--seeds 0 1 2]
    python benchmarks/data.py cost [--seeds 0 1 2]

Pruning: an MLP (hidden 256, 256; Adam 1e-3, batch 64) on ``Indexed(Digits())`` for 20 epochs;
``DataPruning(score, keep, score_epoch)`` scores at the end of epoch 1 (early) or 9 (late) and
trains the remaining epochs on the kept fraction (hardest first). Random keeps a seeded uniform
subset at the same epoch. Reported: test accuracy of the final weights, the time of the scoring
pass, and the median epoch time after pruning relative to before (same run).

Cost: the scoring passes against one plain training epoch of the same model (a torch loop:
forward, backward, Adam step per batch of 64) and against a bare forward+backward pass over the same
batches, in CPU time of the process (one thread: other jobs on a shared machine count less than in
wall time), interleaved repeats, medians, for the MLP and for
``ConvNet`` (convolutions, BatchNorm, linear layers), and for the ConvNet on CIFAR-shaped random
inputs (3x32x32, 640 samples; no general path there); GraNd's closed form and its general
``torch.func`` path side by side; then ``DataPruning("grand")``'s scoring pass against a Lightning
training epoch inside 20-epoch runs of the MLP (the column of the pruning table).

Noise: the same MLP for 30 epochs on ``NoisyLabels(Digits(), rate)`` (symmetric); test accuracy
and expected calibration error (15 bins, torchmetrics) of the final weights.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from torchmetrics.classification import MulticlassCalibrationError

from litplug.callbacks import DataPruning
from litplug.datamodules import Digits, Indexed
from litplug.modules import MLP, Classifier, ConvNet


def _model(cls: type = Classifier, **kwargs: Any) -> Classifier:
    return cls(MLP(input_shape=[1, 8, 8], num_outputs=10, hidden=[256, 256]), num_classes=10, **kwargs)


class EpochTimer(Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_epoch_start(self, trainer: Trainer, pl_module: Any) -> None:
        self._t = time.perf_counter()

    def on_train_epoch_end(self, trainer: Trainer, pl_module: Any) -> None:
        self.times.append(time.perf_counter() - self._t)


class TimedPruning(DataPruning):
    """DataPruning that records the time of its scoring pass; ``random`` scores are seeded noise."""

    def __init__(self, score: str, seed: int = 0, **kwargs: Any) -> None:
        super().__init__(score="el2n" if score == "random" else score, **kwargs)
        self.random, self.seed, self.score_time = score == "random", seed, 0.0

    def _model_scores(self, trainer: Trainer, pl_module: Any, n: int) -> torch.Tensor:
        if self.random:
            return torch.rand(n, generator=torch.Generator().manual_seed(self.seed), dtype=torch.float64)
        return super()._model_scores(trainer, pl_module, n)

    def _prune(self, trainer: Trainer, pl_module: Any) -> None:
        t = time.perf_counter()
        super()._prune(trainer, pl_module)
        self.score_time = time.perf_counter() - t


def _trainer(epochs: int, callbacks: list[Callback]) -> Trainer:
    return Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=callbacks,
    )


def prune_run(score: str, keep: float, score_epoch: int, seed: int, epochs: int = 20) -> dict[str, float]:
    seed_everything(seed)
    model, timer = _model(), EpochTimer()
    callbacks: list[Callback] = [timer]
    pruning = None
    if keep < 1.0:
        pruning = TimedPruning(score, seed=seed, keep=keep, score_epoch=score_epoch)
        callbacks.insert(0, pruning)
    dm = Indexed(Digits(batch_size=64, seed=seed))
    trainer = _trainer(epochs, callbacks)
    trainer.fit(model, dm)
    acc = float(trainer.test(model, dm.datamodule, verbose=False)[0]["test/acc"])
    out = {"acc": acc}
    if pruning is not None:
        # full epochs: those before pruning, the scoring epoch without its scoring pass
        before = timer.times[: score_epoch + 1]
        full = statistics.median(before[:-1] + [before[-1] - pruning.score_time])
        out["epoch_ratio"] = statistics.median(timer.times[score_epoch + 2 :]) / full
        out["score_time"] = pruning.score_time
        out["epoch_time"] = full
    return out


def _mean_sd(values: list[float]) -> str:
    return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}"


def pruning(seeds: list[int]) -> None:
    rows: dict[tuple[str, float, int], list[dict[str, float]]] = {}
    full = [prune_run("el2n", 1.0, 1, s) for s in seeds]
    print("full", [r["acc"] for r in full], flush=True)
    for keep in (0.7, 0.5, 0.3):
        for score in ("el2n", "grand", "forgetting", "random"):
            rows[(score, keep, 1)] = [prune_run(score, keep, 1, s) for s in seeds]
            print(score, keep, 1, [r["acc"] for r in rows[(score, keep, 1)]], flush=True)
    for keep in (0.5, 0.3):
        for score in ("el2n", "grand", "forgetting"):
            rows[(score, keep, 9)] = [prune_run(score, keep, 9, s) for s in seeds]
            print(score, keep, 9, [r["acc"] for r in rows[(score, keep, 9)]], flush=True)
    print(f"\nTest accuracy (%), mean ± sd over seeds {seeds}; scores after epoch 1 (early) or 9 (late).\n")
    print("| score | 100% | 70% | 50% | 30% | 50%, late | 30%, late |\n|---|---|---|---|---|---|---|")
    for score in ("el2n", "grand", "forgetting", "random"):
        cells = [_mean_sd([r["acc"] for r in full])]
        cells += [_mean_sd([r["acc"] for r in rows[(score, k, 1)]]) for k in (0.7, 0.5, 0.3)]
        late = [rows.get((score, k, 9)) for k in (0.5, 0.3)]
        cells += [_mean_sd([r["acc"] for r in rs]) if rs else "" for rs in late]
        print(f"| {score} | " + " | ".join(cells) + " |")
    print("\nCost (median over runs): scoring pass time / one full training epoch; pruned epoch / full epoch.\n")
    print("| score | scoring / epoch | pruned epoch / full, keep 70% | 50% | 30% |\n|---|---|---|---|---|")
    for score in ("el2n", "grand", "forgetting", "random"):
        runs = [r for k in (0.7, 0.5, 0.3) for r in rows[(score, k, 1)]]
        ratio = statistics.median(r["score_time"] / r["epoch_time"] for r in runs)
        per_keep = [statistics.median(r["epoch_ratio"] for r in rows[(score, k, 1)]) for k in (0.7, 0.5, 0.3)]
        print(f"| {score} | {ratio:.2f} | " + " | ".join(f"{v:.2f}" for v in per_keep) + " |")


def noise_run(method: str, rate: float, seed: int, epochs: int = 30) -> dict[str, float]:
    from litplug.callbacks import ELR, PSKD
    from litplug.datamodules import NoisyLabels

    class Smoothed(Classifier):
        def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.cross_entropy(logits, y, label_smoothing=0.1 if self.training else 0.0)

    seed_everything(seed)
    model = _model(Smoothed) if method == "smoothing" else _model()
    callbacks: list[Callback] = {"elr": [ELR()], "pskd": [PSKD()]}.get(method, [])
    dm = Indexed(NoisyLabels(Digits(batch_size=64, seed=seed), rate=rate, seed=seed))
    trainer = _trainer(epochs, callbacks)
    trainer.fit(model, dm)
    dm.datamodule.datamodule.setup("test")
    probs, targets = [], []
    model.eval()
    with torch.no_grad():
        for x, y in dm.datamodule.datamodule.test_dataloader():
            probs.append(model(x).softmax(-1))
            targets.append(y)
    p, t = torch.cat(probs), torch.cat(targets)
    ece = MulticlassCalibrationError(num_classes=10, n_bins=15, norm="l1")(p, t)
    return {"acc": float((p.argmax(-1) == t).float().mean()), "ece": float(ece)}


def noise(seeds: list[int]) -> None:
    results = {}
    for rate in (0.2, 0.4):
        for method in ("ce", "elr", "pskd", "smoothing"):
            results[(method, rate)] = [noise_run(method, rate, s) for s in seeds]
            print(method, rate, results[(method, rate)], flush=True)
    print(f"\nTest accuracy (%) and ECE (%), mean ± sd over seeds {seeds}, symmetric noise.\n")
    print("| method | acc, 20% | ECE, 20% | acc, 40% | ECE, 40% |\n|---|---|---|---|---|")
    for method in ("ce", "elr", "pskd", "smoothing"):
        cells = []
        for rate in (0.2, 0.4):
            rs = results[(method, rate)]
            cells += [_mean_sd([r["acc"] for r in rs]), _mean_sd([r["ece"] for r in rs])]
        print(f"| {method} | " + " | ".join(cells) + " |")


def cost(seeds: list[int], repeats: int = 11) -> None:
    dm = Digits(batch_size=64)
    dm.setup()
    x = torch.stack([dm.train_set[i][0] for i in range(len(dm.train_set))])
    y = torch.stack([dm.train_set[i][1] for i in range(len(dm.train_set))])
    batches = [(x[i : i + 64], y[i : i + 64]) for i in range(0, len(y), 64)]
    seed_everything(0)
    _cost_table("MLP (hidden 256, 256)", _model(), batches, repeats)
    seed_everything(0)
    _cost_table(
        "ConvNet (channels 32, 64, BatchNorm, hidden 128)", Classifier(ConvNet(), num_classes=10), batches, repeats
    )
    seed_everything(0)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(640, 3, 32, 32, generator=g), torch.randint(0, 10, (640,), generator=g)
    _cost_table(
        "The same ConvNet on CIFAR-shaped inputs (3x32x32, random)",
        Classifier(ConvNet(input_shape=[3, 32, 32]), num_classes=10),
        [(x[i : i + 64], y[i : i + 64]) for i in range(0, len(y), 64)],
        max(3, repeats // 2),
        general=False,
    )
    inside = [prune_run("grand", 0.5, 1, s) for s in seeds]
    ratios = [r["score_time"] / r["epoch_time"] for r in inside]
    print(f"\nDataPruning('grand') scoring / Lightning epoch (MLP), seeds {seeds}: {[round(r, 2) for r in ratios]}")
    print(f"median {statistics.median(ratios):.2f}")


def _cost_table(
    title: str,
    model: torch.nn.Module,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    repeats: int,
    general: bool = True,
) -> None:
    from litplug.functional import el2n_scores, grand_scores
    from litplug.functional.pruning import _closed_form_layers, _per_sample_norms

    opt = torch.optim.Adam(model.parameters(), 1e-3)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def epoch() -> None:
        model.train()
        for xb, yb in batches:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
        model.eval()

    def forward_backward() -> None:
        for xb, yb in batches:
            model.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(xb), yb).backward()
        model.zero_grad(set_to_none=True)

    def per_sample() -> None:
        norms = _per_sample_norms(model, trainable, torch.nn.functional.cross_entropy, 256 * 2**20)
        torch.cat([norms(xb, yb) for xb, yb in batches])

    runs = {
        "training epoch": epoch,
        "forward+backward": forward_backward,
        "EL2N": lambda: el2n_scores(model, batches),
        "GraNd": lambda: grand_scores(model, batches),
        **({"GraNd, general torch.func path": per_sample} if general else {}),
    }
    model.eval()
    path = "closed form" if _closed_form_layers(model) is not None else "general path"
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            t = time.process_time()
            run()
            times[name].append(time.process_time() - t)
    base, bare = statistics.median(times["training epoch"]), statistics.median(times["forward+backward"])
    samples = sum(len(yb) for _, yb in batches)
    print(f"\n{title}: median CPU time of {repeats} interleaved repeats, {samples:,} samples, batch 64;")
    print(f"grand_scores takes its {path}.\n")
    print("| pass | seconds | / training epoch | / forward+backward |\n|---|---|---|---|")
    for name, ts in times.items():
        t = statistics.median(ts)
        print(f"| {name} | {t:.4f} | {t / base:.2f} | {t / bare:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("part", choices=["pruning", "noise", "cost"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    torch.set_num_threads(1)
    {"pruning": pruning, "noise": noise, "cost": cost}[args.part](args.seeds)


if __name__ == "__main__":
    main()
