"""Speed of litplug's unlearning masks, measured side by side in one run (CPU, digits, an MLP
64-1024-1024-10, batch 256, Adam).

1. Per-step cost of mask enforcement: median wall time of a training step (forward, backward,
   optimizer step) in a Lightning ``Trainer`` with ``Unlearner(method="finetune")``, without and
   with ``UnlearningMask`` (ratio 0.5); and the same in a plain PyTorch loop, without a mask and
   with the reference codebases' enforcement (SalUn: ``p.grad *= mask`` before ``step()``, which
   is cheaper but not exact: weight decay and Adam state still move frozen weights).
2. Cost of computing each criterion at fit start relative to one training epoch over the forget
   set (forward, backward, step on every forget batch).

    python benchmarks/unlearning.py
"""

from __future__ import annotations

import statistics
import time
import types

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, Trainer, seed_everything

from litplug.callbacks import UnlearningMask
from litplug.datamodules import Digits, ForgetRetain
from litplug.modules import MLP, Unlearner

HIDDEN = [1024, 1024]
STEPS = 60


def make_model() -> Unlearner:
    seed_everything(0)
    return Unlearner(MLP(input_shape=[1, 8, 8], num_outputs=10, hidden=HIDDEN), None, "finetune")


def data() -> ForgetRetain:
    return ForgetRetain(Digits(batch_size=256), "class", [3])


class StepTimer(Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.times.append(time.perf_counter() - self.start)


def lightning_step(mask: bool) -> float:
    timer = StepTimer()
    callbacks = [UnlearningMask("magnitude", ratio=0.5, scope="all"), timer] if mask else [timer]
    trainer = Trainer(max_steps=STEPS, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, limit_val_batches=0, callbacks=callbacks)  # fmt: skip
    trainer.fit(make_model(), data())
    return statistics.median(timer.times[5:])


def plain_step(mask: bool) -> float:
    model = make_model().backbone
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    masks = [torch.rand_like(p) < 0.5 for p in model.parameters()]
    dm = data()
    dm.setup()
    times = []
    loader = dm.retain_dataloader(shuffle=True)
    while len(times) < STEPS:
        for x, y in loader:
            start = time.perf_counter()
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            if mask:
                for p, m in zip(model.parameters(), masks):
                    p.grad *= m
            opt.step()
            times.append(time.perf_counter() - start)
    return statistics.median(times[5:])


def criterion_costs() -> dict[str, float]:
    dm = data()
    dm.setup()
    model = make_model()
    trainer = types.SimpleNamespace(datamodule=dm, world_size=1, global_rank=0)
    costs = {}
    for criterion in ("saliency", "attribution", "magnitude", "random"):
        cb = UnlearningMask(criterion, ratio=0.5, scope="all")
        named = cb._scoped(model)
        start = time.perf_counter()
        scores = cb._scores(trainer, model, named)
        from litplug.callbacks.unlearning import topk_masks

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


def main() -> None:
    torch.set_num_threads(1)
    rows = {
        "lightning, no mask": lightning_step(False),
        "lightning + UnlearningMask": lightning_step(True),
        "plain torch, no mask": plain_step(False),
        "plain torch + SalUn-style grad *= mask": plain_step(True),
    }
    print("\n| per training step | median ms | ratio to its no-mask baseline |\n|---|---|---|")
    for i, (name, t) in enumerate(rows.items()):
        base = list(rows.values())[i - i % 2]
        print(f"| {name} | {1000 * t:.2f} | {t / base:.3f} |")
    costs = criterion_costs()
    print("\n| criterion (score + exact top-k) | seconds | / one epoch over the forget set |\n|---|---|---|")
    for name in ("saliency", "attribution", "magnitude", "random"):
        print(f"| {name} | {costs[name]:.3f} | {costs[name] / costs['epoch']:.2f} |")
    print(f"| (one forget epoch) | {costs['epoch']:.3f} | 1.00 |")


if __name__ == "__main__":
    main()
