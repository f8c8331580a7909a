"""Speed of litplug's unlearning masks, measured side by side in one run (CPU, digits, an MLP
64-1024-1024-10, batch 256, Adam, 1 thread).

1. Per-step cost of mask enforcement:
   - in a Lightning ``Trainer`` with ``Unlearner(method="finetune")``, without and with
     ``UnlearningMask`` (ratio 0.5): median step time (forward, backward, optimizer step) of short
     fits run alternately, so that load changes on a shared machine hit both alike; and the time
     spent inside the mask's per-step hooks, measured within the masked steps themselves;
   - in a plain PyTorch loop, steps interleaved: no mask, litplug's functional core
     (``enforce_masked_grads_`` before ``step()``, ``restore_frozen_`` after: exact), and the
     reference codebases' enforcement (SalUn: ``p.grad *= mask`` before ``step()``: cheaper in
     passes but not exact, weight decay and Adam state still move frozen weights).
2. Cost of computing each criterion at fit start relative to one training epoch over the forget
   set (forward, backward, step on every forget batch).

    python benchmarks/unlearning.py [--batch 256]
"""

from __future__ import annotations

import argparse
import statistics
import time
import types

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.plugins.precision import Precision

from litplug.callbacks import UnlearningMask
from litplug.datamodules import Digits, ForgetRetain
from litplug.functional import enforce_masked_grads_, frozen_values, pack_mask, restore_frozen_
from litplug.modules import MLP, Unlearner

HIDDEN = [1024, 1024]
BATCH = 256
STEPS = 30  # per fit; ROUNDS fits of each kind, alternating
ROUNDS = 6


def make_model(optimizer: str = "adam") -> Unlearner:
    seed_everything(0)
    make_opt = {
        "adam": lambda p: torch.optim.Adam(p, lr=1e-3),
        "sgd": lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9),
    }
    return Unlearner(
        MLP(input_shape=[1, 8, 8], num_outputs=10, hidden=HIDDEN), None, "finetune", optimizer=make_opt[optimizer]
    )


def data() -> ForgetRetain:
    return ForgetRetain(Digits(batch_size=BATCH), "class", [3])


class StepTimer(Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.times.append(time.perf_counter() - self.start)


def timed_mask() -> tuple[UnlearningMask, list[float]]:
    """An UnlearningMask whose per-step work (gradient masking, restore) adds its time to a list."""
    mask = UnlearningMask("magnitude", ratio=0.5, scope="all")
    spent = [0.0]
    for name in ("_mask_grads", "_post_step"):
        method = getattr(mask, name)

        def timed(*args, _method=method, **kwargs):
            start = time.perf_counter()
            out = _method(*args, **kwargs)
            spent[0] += time.perf_counter() - start
            return out

        setattr(mask, name, timed)
    return mask, spent


def lightning_steps(optimizer: str) -> tuple[float, float, float]:
    """Median step time without and with the mask, and the mask hooks' share of a masked step."""
    times: dict[bool, list[float]] = {False: [], True: []}
    hook_share = []
    for _ in range(ROUNDS):
        for masked in (False, True):
            timer = StepTimer()
            mask, spent = timed_mask()
            trainer = Trainer(max_steps=STEPS, accelerator="cpu", logger=False, enable_checkpointing=False,
                              enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                              callbacks=[mask, timer] if masked else [timer])  # fmt: skip
            trainer.fit(make_model(optimizer), data())
            times[masked] += timer.times[3:]
            if masked:
                hook_share.append(spent[0] / sum(timer.times))
    return statistics.median(times[False]), statistics.median(times[True]), statistics.median(hook_share)


def plain_steps() -> list[float]:
    """Median step times of a plain loop: no mask, litplug's exact core, SalUn's multiply."""
    models = [make_model().backbone for _ in range(3)]
    opts = [torch.optim.Adam(m.parameters(), lr=1e-3) for m in models]
    gen = torch.Generator().manual_seed(0)
    masks = [torch.rand(p.shape, generator=gen) < 0.5 for p in models[0].parameters()]
    keep = [pack_mask(m) for m in masks]
    frozen = [frozen_values(p, k) for p, k in zip(models[1].parameters(), keep)]
    dm = data()
    dm.setup()
    times: list[list[float]] = [[], [], []]
    while len(times[0]) < STEPS * ROUNDS:
        for x, y in dm.retain_dataloader(shuffle=True):
            for i, (model, opt) in enumerate(zip(models, opts)):
                start = time.perf_counter()
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                params = list(model.parameters())
                if i == 1:
                    enforce_masked_grads_([p.grad for p in params], keep)
                elif i == 2:
                    for p, m in zip(params, masks):
                        p.grad *= m
                opt.step()
                if i == 1:
                    with torch.no_grad():
                        restore_frozen_(params, frozen, keep)
                times[i].append(time.perf_counter() - start)
    return [statistics.median(t[3:]) for t in times]


def criterion_costs() -> dict[str, float]:
    dm = data()
    dm.setup()
    model = make_model()
    trainer = types.SimpleNamespace(datamodule=dm, world_size=1, global_rank=0, precision_plugin=Precision())
    costs = {}
    for criterion in ("saliency", "attribution", "magnitude", "random"):
        cb = UnlearningMask(criterion, ratio=0.5, scope="all")
        named = cb._scoped(model)
        start = time.perf_counter()
        scores = cb._scores(trainer, model, named)
        from litplug.functional import topk_masks

        topk_masks(scores, int(sum(p.numel() for _, p in named) * 0.5))
        costs[criterion] = time.perf_counter() - start
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    start = time.perf_counter()
    for x, y in dm.forget_dataloader(shuffle=True):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    costs["epoch"] = time.perf_counter() - start
    return costs


def sqrt_of_zeros() -> tuple[float, float]:
    """Seconds of ``torch.sqrt`` over 2^20 random floats and over 2^20 zeros (Adam takes the square
    root of its second moment, which stays 0 at entries whose gradient is always 0)."""
    out = torch.empty(1 << 20)
    rand, zeros = torch.rand(1 << 20), torch.zeros(1 << 20)
    times: list[list[float]] = [[], []]
    for _ in range(50):
        for t, v in zip(times, (rand, zeros)):
            start = time.perf_counter()
            torch.sqrt(v, out=out)
            t.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def main() -> None:
    global BATCH
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=BATCH)
    BATCH = parser.parse_args().batch
    torch.set_num_threads(1)
    print(f"MLP 64-{HIDDEN[0]}-{HIDDEN[1]}-10, batch {BATCH}, 1 thread")
    print("\n| per training step | median ms | ratio to its no-mask baseline |\n|---|---|---|")
    for optimizer in ("adam", "sgd"):
        lightning_plain, lightning_masked, hook_share = lightning_steps(optimizer)
        print(f"| lightning, {optimizer}, no mask | {1000 * lightning_plain:.2f} | 1.000 |")
        print(
            f"| lightning, {optimizer} + UnlearningMask | {1000 * lightning_masked:.2f} "
            f"| {lightning_masked / lightning_plain:.3f} |"
        )
        print(f"| (time inside the mask's per-step hooks, share of a masked {optimizer} step) | | {hook_share:.3f} |")
    plain, core, salun = plain_steps()
    print(f"| plain torch, no mask | {1000 * plain:.2f} | 1.000 |")
    print(
        "| plain torch + litplug enforce_masked_grads_/restore_frozen_ (exact) "
        f"| {1000 * core:.2f} | {core / plain:.3f} |"
    )
    print(f"| plain torch + SalUn-style grad *= mask (not exact) | {1000 * salun:.2f} | {salun / plain:.3f} |")
    rand, zeros = sqrt_of_zeros()
    print(
        f"\ntorch.sqrt over 2^20 floats: random {1000 * rand:.2f} ms, zeros {1000 * zeros:.2f} ms ({zeros / rand:.1f}x)"
    )
    costs = criterion_costs()
    print("\n| criterion (score + exact top-k) | seconds | / one epoch over the forget set |\n|---|---|---|")
    for name in ("saliency", "attribution", "magnitude", "random"):
        print(f"| {name} | {costs[name]:.3f} | {costs[name] / costs['epoch']:.2f} |")
    print(f"| (one forget epoch) | {costs['epoch']:.3f} | 1.00 |")


if __name__ == "__main__":
    main()
