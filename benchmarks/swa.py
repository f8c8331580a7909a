"""SWA on digits, with and without the SWA learning rate, against plain training and Lightning's
``StochasticWeightAveraging``, over seeds, side by side in one run.

    OMP_NUM_THREADS=1 python benchmarks/swa.py --seeds 0 1 2      # a few minutes on 2 CPU cores

Every arm trains the same MLP (64-128-128-10, BatchNorm) with SGD (lr 0.1, momentum 0.9, weight
decay 5e-4) and a cosine schedule over ``--epochs`` epochs (20), on the same split, from the same seed:
  * plain: the schedule runs to the end; the final weights;
  * SWA, user's schedule: ``SWA(start_epoch=0.75)``, the mean of the last quarter's epochs while the
    cosine schedule decays the rate to 0, BatchNorm recomputed;
  * SWA + SWA lr: ``SWA(start_epoch=0.75, swa_lrs=0.05, annealing_epochs=2)``: from epoch 15 of 20 on,
    SWALR replaces the cosine schedule and holds the rate at 0.05; the average, and the live
    (last) weights of that run ("SWA lr, live");
  * Lightning: ``StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=16, annealing_epochs=2)``,
    the same swap epoch (its snapshots are one epoch earlier, see docs/averaging.md).
Reports test accuracy and test loss (cross-entropy), mean ± std over seeds.
"""

from __future__ import annotations

import argparse
import statistics
from functools import partial

import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import StochasticWeightAveraging

from litplug.callbacks import SWA
from litplug.datamodules import Digits
from litplug.modules import MLP, Classifier

SWA_LR, ANNEALING = 0.05, 2
EPOCHS = 20


def model() -> Classifier:
    return Classifier(
        MLP(input_shape=[1, 8, 8], num_outputs=10, hidden=[128, 128], batch_norm=True),
        optimizer=partial(torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=5e-4),
        lr_scheduler=partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=EPOCHS),
    )


def fit_and_test(seed: int, callback=None) -> tuple[Classifier, Trainer, Digits]:
    seed_everything(seed)
    net, data = model(), Digits(batch_size=64)
    trainer = Trainer(
        max_epochs=EPOCHS,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback] if callback else [],
    )
    trainer.fit(net, data)
    return net, trainer, data


def test(net: Classifier, trainer: Trainer, data: Digits) -> tuple[float, float]:
    (out,) = trainer.test(net, data, verbose=False)
    return out["test/acc"], out["test/loss"]


def run_seed(seed: int) -> dict[str, tuple[float, float]]:
    res = {}
    res["plain"] = test(*fit_and_test(seed))
    res["SWA, user's schedule"] = test(*fit_and_test(seed, SWA(start_epoch=0.75)))
    # "live" everywhere, so that `test` sees the weights the model holds: first the live ones
    swa = SWA(start_epoch=0.75, swa_lrs=SWA_LR, annealing_epochs=ANNEALING, evaluate_with="live", final_weights="live")
    net, trainer, data = fit_and_test(seed, swa)
    res["SWA lr, live"] = test(net, trainer, data)  # the last weights of the run, BatchNorm as trained
    net.load_state_dict(swa.averaged_state_dict())  # the average, BatchNorm recomputed
    res["SWA + SWA lr"] = test(net, trainer, data)
    start = int(0.75 * EPOCHS) + 1  # Lightning's 1-based epoch: the same SWALR swap epoch
    lightning = StochasticWeightAveraging(
        swa_lrs=SWA_LR, swa_epoch_start=start, annealing_epochs=ANNEALING, device=None
    )
    res["Lightning SWA"] = test(*fit_and_test(seed, lightning))
    return res


def main(seeds: list[int]) -> None:
    per_seed = [run_seed(s) for s in seeds]
    print(f"\ndigits, {EPOCHS} epochs, seeds {seeds}: test accuracy / test loss, mean ± std")
    print("| arm | test acc | test loss | per seed (acc) |")
    print("|---|---|---|---|")
    for arm in per_seed[0]:
        accs = [r[arm][0] for r in per_seed]
        losses = [r[arm][1] for r in per_seed]
        sd = (lambda v: statistics.stdev(v)) if len(per_seed) > 1 else (lambda v: 0.0)
        print(
            f"| {arm} | {statistics.mean(accs):.4f} ± {sd(accs):.4f} | {statistics.mean(losses):.4f} ± "
            f"{sd(losses):.4f} | {' '.join(f'{a:.4f}' for a in accs)} |"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    args = parser.parse_args()
    EPOCHS = args.epochs
    main(args.seeds)
