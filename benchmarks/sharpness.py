r"""Step time of litplug's sharpness callbacks relative to plain training of the same model, and
side by side with ``pytorch_optimizer.SAM`` driven by hand in manual optimization (the peer).

    python benchmarks/sharpness.py [--steps 40] [--rounds 3] [--hidden 1024] [--batch-size 256] \
        [--device cpu] [--threads 1]

Every variant trains the same MLP (fresh copy of one initialisation, SGD with momentum) on the same
Digits batches in one process. A callback times every step from batch start to batch end (data
loading excluded) after ``--warmup`` steps; the step time is the mean over an aligned window of 5
steps (so every_n_steps=5 counts one perturbed and four plain steps), and the best window over
``--rounds`` interleaved rounds is reported (the minimum is the estimate least disturbed by other
load on the machine, as ``timeit`` does). Targets: SAM every step
<= 2.1x plain (the floor is 2.0x: two forward/backward passes), every 5 steps <= 1.3x.
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer

from litplug.callbacks import SAM, SurrogateSharpness
from litplug.datamodules import Digits
from litplug.modules import MLP, Classifier

CYCLE = 5


class StepClock(Callback):
    """Wall time of every training step (batch start to batch end: data loading excluded)."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.t0, self.durations = warmup, 0.0, []

    def _now(self, pl_module) -> float:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.t0 = self._now(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx >= self.warmup:
            self.durations.append(self._now(pl_module) - self.t0)


class PeerSAM(LightningModule):
    """The peer: ``pytorch_optimizer.SAM`` around SGD, first_step/second_step in manual optimization."""

    def __init__(self, backbone, rho: float, lr: float) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.backbone, self.rho, self.lr = backbone, rho, lr

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt = self.optimizers()

        def second_pass():
            loss = F.cross_entropy(self.backbone(x), y)
            self.manual_backward(loss)
            return loss

        opt.zero_grad()
        loss = F.cross_entropy(self.backbone(x), y)
        self.manual_backward(loss)
        opt.step(closure=second_pass)  # SAM.step: first_step, closure at w + e, second_step
        self.log("train/loss", loss)

    def configure_optimizers(self):
        from pytorch_optimizer import SAM as PeerOptimizer

        return PeerOptimizer(self.parameters(), torch.optim.SGD, rho=self.rho, lr=self.lr, momentum=0.9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    init = MLP(input_shape=[1, 8, 8], num_outputs=10, hidden=[args.hidden, args.hidden])
    state = init.state_dict()
    lr = 0.05

    def backbone():
        net = MLP(input_shape=[1, 8, 8], num_outputs=10, hidden=[args.hidden, args.hidden])
        net.load_state_dict(state)
        return net

    def classifier():
        return Classifier(backbone(), optimizer=partial(torch.optim.SGD, lr=lr, momentum=0.9))

    variants = {
        "plain": (classifier, []),
        "litplug SAM every_n_steps=1": (classifier, [SAM(rho=0.05)]),
        "litplug SAM every_n_steps=5": (classifier, [SAM(rho=0.05, every_n_steps=5)]),
        "litplug IGNITE (SurrogateSharpness)": (classifier, [SurrogateSharpness()]),
    }
    try:
        import pytorch_optimizer  # noqa: F401

        variants["pytorch_optimizer.SAM (manual opt.)"] = (lambda: PeerSAM(backbone(), rho=0.05, lr=lr), [])
    except ImportError:
        print("pytorch_optimizer not installed: the peer is skipped (pip install pytorch_optimizer)")

    # Digits has ~1150 training images: repeat the loader so every run has enough batches.
    dm = Digits(batch_size=args.batch_size)
    dm.setup()
    loader = torch.utils.data.DataLoader(
        torch.utils.data.ConcatDataset([dm.train_set] * 32), batch_size=args.batch_size, shuffle=False, drop_last=True
    )
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, (make, callbacks) in variants.items():
            clock = StepClock(args.warmup)
            trainer = Trainer(
                accelerator=args.device,
                devices=1,
                max_steps=args.warmup + args.steps,
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                callbacks=[*[type(c)(**_init_args(c)) for c in callbacks], clock],
            )
            trainer.fit(make(), loader)
            # means over aligned windows of CYCLE steps (every_n_steps=5 perturbs one step of each)
            d = clock.durations
            times[name].extend(sum(d[i : i + CYCLE]) / CYCLE for i in range(0, len(d) - CYCLE + 1, CYCLE))

    plain = min(times["plain"])
    targets = {"litplug SAM every_n_steps=1": "<= 2.1", "litplug SAM every_n_steps=5": "<= 1.3"}
    print(
        f"\nMLP {args.hidden}x{args.hidden}, batch {args.batch_size}, {args.device}, "
        f"torch threads {torch.get_num_threads()}, "
        f"best {CYCLE}-step window of {args.rounds} rounds x {args.steps} steps"
    )
    print("| variant | ms / step | x plain | target |")
    print("|---|---|---|---|")
    for name, ts in times.items():
        t = min(ts)
        print(f"| {name} | {1000 * t:.2f} | {t / plain:.2f} | {targets.get(name, '')} |")


def _init_args(callback: Callback) -> dict:
    """Rebuild a callback from its constructor arguments (a fresh instance per run)."""
    import inspect

    names = inspect.signature(type(callback).__init__).parameters
    return {n: getattr(callback, n) for n in names if n != "self" and hasattr(callback, n)}


if __name__ == "__main__":
    main()
