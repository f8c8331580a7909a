"""Time per EMA update, side by side in one run, and the whole-step overhead on the digits run.

    python benchmarks/averaging.py            # about a minute on 2 CPU cores

Compared, on (a) a model with 1,000 small tensors and (b) one with a few large tensors:
  * floor: one ``lerp_`` over a single flat buffer with the same number of elements;
  * litplug ``EMA`` (its bound update: ``torch._foreach_lerp_`` over the name-paired tensors);
  * Lightning's ``EMAWeightAveraging`` (``AveragedModel.update_parameters``, as its callback calls it);
  * torch's own ``torch.optim.swa_utils.AveragedModel`` with ``get_ema_multi_avg_fn`` (what
    Lightning wraps, called directly);
  * timm's ``ModelEmaV3.update`` rule, written out below (``timm_rule``): timm is not installed,
    because it pulls a torchvision that replaces the installed torch.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable

import torch
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import EMAWeightAveraging
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from litplug.callbacks import EMA
from litplug.datamodules import Digits
from litplug.modules import MLP, Classifier

DECAY = 0.999


def interleaved(fns: dict[str, Callable[[], None]], rounds: int = 15, budget_s: float = 20.0) -> dict[str, float]:
    """Median seconds per call of each function, timed round-robin (one call each per round) so
    that drifting machine load hits every implementation alike."""
    for fn in fns.values():
        fn(), fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    for r in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
        if time.perf_counter() - start > budget_s and r >= 4:
            break
    return {name: statistics.median(ts) for name, ts in times.items()}


def timm_rule(module: nn.Module, decay: float) -> Callable[[], None]:
    """timm's ``ModelEmaV3.update`` (timm/utils/model_ema.py, ``foreach=True``, no warmup) written
    out: the EMA copy is a deep copy of the module; each update pairs the two state dicts in
    order, lerps the floating tensors with one ``torch._foreach_lerp_(ema, model, 1 - decay)`` and
    copies the others."""
    ema = copy.deepcopy(module).eval().requires_grad_(False)

    @torch.no_grad()
    def update() -> None:
        ema_values, model_values = [], []
        for ema_v, model_v in zip(ema.state_dict().values(), module.state_dict().values()):
            if ema_v.is_floating_point():
                ema_values.append(ema_v)
                model_values.append(model_v)
            else:
                ema_v.copy_(model_v)
        torch._foreach_lerp_(ema_values, model_values, weight=1.0 - decay)

    return update


class Wrap(LightningModule):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net


def many_small() -> nn.Module:
    return nn.Sequential(*[nn.Linear(64, 64) for _ in range(500)])  # 1,000 tensors, 2.08 M elements


def few_large() -> nn.Module:
    return nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(4)])  # 8 tensors, 4.2 M elements


def update_times(make: Callable[[], nn.Module]) -> dict[str, float]:
    torch.manual_seed(0)
    module = Wrap(make())
    n = sum(p.numel() for p in module.parameters())
    flat, flat_avg = torch.randn(n), torch.randn(n)
    fns: dict[str, Callable[[], None]] = {"floor": lambda: flat_avg.lerp_(flat, 1 - DECAY)}

    ema = EMA(decay=DECAY)
    ema._update(module, 1.0)  # binds to the module's tensors and takes the first (copy) update
    fns["litplug"] = lambda: ema._update(module, 1 - DECAY)

    lightning = EMAWeightAveraging(decay=DECAY)
    lightning.setup(None, module, "fit")  # builds its AveragedModel (a deep copy)
    fns["lightning"] = lambda: lightning._average_model.update_parameters(module)

    averaged = AveragedModel(module, multi_avg_fn=get_ema_multi_avg_fn(DECAY))
    fns["torch"] = lambda: averaged.update_parameters(module)

    fns["timm rule"] = timm_rule(module, DECAY)
    out: dict[str, float] = interleaved(fns)
    out["elements"] = float(n)
    return out


class Stopwatch(Callback):
    """Two of these sandwich the callback under test: ``first`` marks the batch start and the end
    of the training step, ``last`` the end of the callback's ``on_train_batch_end``."""

    def __init__(self, marks: list[list[float]], first: bool) -> None:
        self.marks, self.first = marks, first

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.first:
            self.marks.append([time.perf_counter()])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.marks[-1].append(time.perf_counter())


def digits_step(callback: Callback | None) -> tuple[float, float]:
    """Median seconds of the training step and of the callback's hook after it, in one run."""
    seed_everything(0)
    marks: list[list[float]] = []
    model = Classifier(MLP(input_shape=[1, 8, 8], num_outputs=10, hidden=[256, 256]), num_classes=10)
    callbacks = [Stopwatch(marks, True), *([callback] if callback else []), Stopwatch(marks, False)]
    trainer = Trainer(
        max_epochs=2, limit_val_batches=0, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
    )  # fmt: skip
    trainer.fit(model, Digits(batch_size=64))
    marks = marks[5:]
    return statistics.median(m[1] - m[0] for m in marks), statistics.median(m[2] - m[1] for m in marks)


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, decay {DECAY}")
    print("\nTime per EMA update (median), and ratio to the flat-buffer floor")
    print(f"{'model':<34}{'impl':<12}{'ms/update':>10}{'x floor':>9}{'litplug faster by':>19}")
    for label, make in (("(a) 1,000 small tensors", many_small), ("(b) 8 large tensors", few_large)):
        r = update_times(make)
        label = f"{label} ({r['elements'] / 1e6:.2f} M)"
        for impl in ("floor", "litplug", "lightning", "torch", "timm rule"):
            t = r[impl]
            speedup = f"{t / r['litplug']:.1f}x" if impl not in ("floor", "litplug") else ""
            print(f"{label:<34}{impl:<12}{t * 1e3:>10.3f}{t / r['floor']:>9.2f}{speedup:>19}")
            label = ""

    print("\nWhole training step on digits (MLP 256x256, batch 64, Adam; medians over 2 epochs = 46 steps)")
    print("the callback's on_train_batch_end is timed inside the same run as the step it follows")
    print(f"{'run':<16}{'step ms':>10}{'hook ms':>10}{'overhead':>10}")
    makers = {
        "plain": lambda: None,
        "litplug EMA": lambda: EMA(decay=DECAY),
        "Lightning EMA": lambda: EMAWeightAveraging(decay=DECAY),
    }
    for name, make in makers.items():
        step, hook = digits_step(make())
        print(f"{name:<16}{step * 1e3:>10.3f}{hook * 1e3:>10.3f}{hook / step * 100:>9.1f}%")


if __name__ == "__main__":
    main()
