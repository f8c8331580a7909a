"""The retrain oracle of the unlearning evaluation: for each forget size and seed, train the target
model (all training people of :class:`~litplug.datamodules.FictitiousQA`) and the retain model
(without the forget people) once, and keep them; a later call finds them and trains nothing.

    python -m litplug.oracle --out runs/qa --forget-percent 1 5 10 --seeds 0 1 2

writes ``runs/qa/forget05/seed0/{target,retain}.pt`` (state dicts of a
:class:`~litplug.modules.CausalTransformer`, read back through :mod:`litplug.loading`). Every
unlearning run starts from ``target.pt`` and is scored against ``retain.pt``
(:class:`~litplug.callbacks.UnlearningEvaluation`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from lightning.pytorch import Trainer, seed_everything

from .datamodules.qa import FictitiousQA
from .modules.language import CausalTransformer, LanguageModel
from .validation import check_int, check_positive_int

ARCHITECTURE = {"dim": 64, "depth": 2, "heads": 4}


def backbone(dm: FictitiousQA) -> CausalTransformer:
    """The oracle's network for the corpus ``dm`` (its vocabulary and length)."""
    return CausalTransformer(vocab_size=dm.vocab_size, max_len=dm.max_len, **ARCHITECTURE)


def oracle_paths(out: str | Path, forget_percent: int, seed: int) -> dict[str, Path]:
    folder = Path(out) / f"forget{forget_percent:02d}" / f"seed{seed}"
    return {"target": folder / "target.pt", "retain": folder / "retain.pt"}


def train_oracle(
    out: str | Path,
    forget_percent: int,
    seed: int,
    num_entities: int = 100,
    epochs: int = 60,
    lr: float = 3e-3,
    corpus_seed: int = 0,
) -> dict[str, Path]:
    """Train (or find) the target and the retain model of one forget size and model ``seed`` (the
    initialisation; the corpus and its split come from ``corpus_seed``, shared by every seed, so
    two retain models of different seeds saw the same people); their paths."""
    check_positive_int("epochs", epochs)
    check_int("seed", seed)
    check_int("corpus_seed", corpus_seed)
    paths = oracle_paths(out, forget_percent, seed)
    for name, exclude in (("target", False), ("retain", True)):
        if paths[name].exists():
            continue
        seed_everything(seed, verbose=False)
        dm = FictitiousQA(
            num_entities=num_entities, forget_percent=forget_percent, exclude_forget=exclude, seed=corpus_seed
        )
        net = backbone(dm)
        model = LanguageModel(net, optimizer=lambda params: torch.optim.Adam(params, lr=lr))
        Trainer(
            max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        ).fit(model, dm)  # fmt: skip
        paths[name].parent.mkdir(parents=True, exist_ok=True)
        tmp = paths[name].with_suffix(".tmp")
        torch.save(net.state_dict(), tmp)
        tmp.replace(paths[name])  # a killed run leaves no half-written model behind
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m litplug.oracle", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/qa", help="folder of the cached models (default: runs/qa)")
    parser.add_argument("--forget-percent", type=int, nargs="+", default=[5], choices=[1, 5, 10])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--num-entities", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=60)
    args = parser.parse_args(argv)
    for percent in args.forget_percent:
        for seed in args.seeds:
            paths = train_oracle(args.out, percent, seed, args.num_entities, args.epochs)
            print(f"forget {percent}% seed {seed}: {paths['target']} {paths['retain']}")


if __name__ == "__main__":
    main()
