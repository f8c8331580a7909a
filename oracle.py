"""The retrain oracle of the unlearning evaluation: for each seed, train the target model (every
trained person of :class:`~litplug.datamodules.FictitiousQA`) and, for each forget size, the retain
model (without the forget people) once, and keep them; a later call finds them and trains nothing.

    python -m litplug.oracle --out runs/qa --forget-percent 1 5 10 --seeds 0 1 2

writes ``runs/qa/seed0/target.pt`` and ``runs/qa/seed0/retain{01,05,10}.pt`` (state dicts of a
:class:`~litplug.modules.CausalTransformer`, read back through :mod:`litplug.loading`). The seed
draws the corpus and its split (the people vary with the seed) and, unless ``model_seed`` is given,
the initialisation and the order of the samples. The forget sets are nested and the held-out
people are never trained on at any forget size, so one target model serves the three sizes, as in
TOFU. Every unlearning run starts from ``target.pt`` and is scored against its ``retain*.pt``
(:class:`~litplug.callbacks.UnlearningEvaluation`).

Each model's settings lie beside it (``target.json``, ``retain05.json``): the corpus
(``num_entities``, ``seed``, and ``forget_percent`` for a retain model; the target model is the same
at every forget size), the training (``epochs``, ``lr``, ``batch_size``, ``model_seed``) and the
network (``architecture``). A call whose settings differ from those of a model already in ``out``
raises a ``ValueError`` naming each differing setting, and so does a model without its settings file:
retraining in place would replace a model that finished runs were scored against, so a folder holds
one recipe and other settings go to another ``out``. The settings file is JSON, read as data.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import seed_everything

from .datamodules.qa import FORGET_PERCENTS, FictitiousQA
from .loading import load_json
from .modules.language import CausalTransformer, LanguageModel
from .validation import check_choice, check_int, check_number, check_positive_int

ARCHITECTURE = {"dim": 64, "depth": 2, "heads": 4}
RECIPE = {"num_entities": 520, "epochs": 25, "lr": 3e-3, "batch_size": 64}


def backbone(dm: FictitiousQA) -> CausalTransformer:
    """The oracle's network for the corpus ``dm`` (its vocabulary and length)."""
    return CausalTransformer(vocab_size=dm.vocab_size, max_len=dm.max_len, **ARCHITECTURE)


def oracle_paths(out: str | Path, forget_percent: int, seed: int, model_seed: int | None = None) -> dict[str, Path]:
    """Where :func:`train_oracle` keeps the target and the retain model of ``forget_percent`` and
    ``seed`` (and ``model_seed``, when it differs from ``seed``)."""
    tag = "" if model_seed is None or model_seed == seed else f"_model{model_seed}"
    folder = Path(out) / f"seed{seed}"
    return {"target": folder / f"target{tag}.pt", "retain": folder / f"retain{forget_percent:02d}{tag}.pt"}


def oracle_settings(
    kind: Literal["target", "retain"],
    forget_percent: int,
    seed: int,
    num_entities: int = RECIPE["num_entities"],
    epochs: int = RECIPE["epochs"],
    lr: float = RECIPE["lr"],
    batch_size: int = RECIPE["batch_size"],
    model_seed: int | None = None,
) -> dict[str, Any]:
    """The settings :func:`train_oracle_model` records beside a model (JSON values). A target model
    has no ``forget_percent``: it is trained on the same people at every forget size."""
    settings: dict[str, Any] = {"kind": kind, "num_entities": num_entities, "seed": seed}
    if kind == "retain":
        settings["forget_percent"] = forget_percent
    settings |= {"epochs": epochs, "lr": float(lr), "batch_size": batch_size}
    settings |= {"model_seed": seed if model_seed is None else model_seed, "architecture": dict(ARCHITECTURE)}
    return settings


def settings_path(model_path: str | Path) -> Path:
    """The settings file of an oracle model (``retain05.pt`` -> ``retain05.json``)."""
    return Path(model_path).with_suffix(".json")


def read_settings(model_path: str | Path) -> dict[str, Any] | None:
    """The settings recorded beside ``model_path`` (``None`` without a settings file), read by
    :func:`litplug.loading.load_json`."""
    path = settings_path(model_path)
    return load_json(path) if path.is_file() else None


def _check_cached(path: Path, wanted: dict[str, Any]) -> None:
    """Refuse a cached model trained with other settings than ``wanted`` (or without a record)."""
    advice = (
        f"runs may have been scored against it, so litplug does not replace it: pass another `out` (--out) for "
        f"these settings, or delete {str(path)!r} and {str(settings_path(path))!r} to retrain it"
    )
    recorded = read_settings(path)
    if recorded is None:
        raise ValueError(
            f"{str(path)!r} has no settings file {settings_path(path).name!r}, so its settings cannot be compared "
            f"with these ({wanted}); {advice}"
        )
    missing = object()
    differing = [
        k for k in sorted(wanted.keys() | recorded.keys()) if recorded.get(k, missing) != wanted.get(k, missing)
    ]
    if differing:
        said = "; ".join(
            f"{k}: {recorded.get(k, '(none)')!r} there, {wanted.get(k, '(none)')!r} here" for k in differing
        )
        raise ValueError(f"{str(path)!r} was trained with other settings ({said}); {advice}")


def _write_atomically(path: Path, write: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    tmp.replace(path)  # a killed run leaves no half-written file behind


def train_oracle_model(
    out: str | Path,
    kind: Literal["target", "retain"],
    forget_percent: int,
    seed: int,
    num_entities: int = RECIPE["num_entities"],
    epochs: int = RECIPE["epochs"],
    lr: float = RECIPE["lr"],
    batch_size: int = RECIPE["batch_size"],
    model_seed: int | None = None,
) -> Path:
    """Train (or find) one model of the oracle: the ``target`` (forget and retain people) or the
    ``retain`` model (retain people only) of the corpus drawn from ``seed``, initialised and fed in
    an order drawn from ``model_seed`` (default ``seed``); its path. A model already at that path is
    returned if it was trained with these settings, else refused (see the module docstring)."""
    check_choice("kind", kind, ("target", "retain"))
    check_choice("forget_percent", forget_percent, FORGET_PERCENTS)
    check_int("seed", seed)
    check_positive_int("epochs", epochs)
    check_number("lr", lr, low=0, low_open=True)
    check_positive_int("batch_size", batch_size)
    check_int("model_seed", model_seed, allow_none=True)
    model_seed = seed if model_seed is None else model_seed
    path = oracle_paths(out, forget_percent, seed, model_seed)[kind]
    wanted = oracle_settings(kind, forget_percent, seed, num_entities, epochs, lr, batch_size, model_seed)
    if path.exists():
        _check_cached(path, wanted)
        return path
    dm = FictitiousQA(
        num_entities=num_entities, forget_percent=forget_percent, exclude_forget=kind == "retain", seed=seed
    )
    dm.setup()
    seed_everything(model_seed, verbose=False)
    net = backbone(dm)
    # A plain loop over LanguageModel's loss: on CPU, a Trainer's per-step overhead about doubles the
    # cost of training this small network, and the oracle trains many of them.
    model = LanguageModel(net)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    ids, labels = dm.train_set.input_ids, dm.train_set.labels
    order = torch.Generator().manual_seed(model_seed)
    net.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(ids), generator=order).split(batch_size):
            loss = model.batch_loss({"input_ids": ids[batch], "labels": labels[batch]})
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    path.parent.mkdir(parents=True, exist_ok=True)
    # The settings first: a model on disk always has its record beside it.
    _write_atomically(settings_path(path), lambda p: p.write_text(json.dumps(wanted, indent=1) + "\n"))
    _write_atomically(path, lambda p: torch.save(net.state_dict(), p))
    return path


def train_oracle(
    out: str | Path,
    forget_percent: int,
    seed: int,
    num_entities: int = RECIPE["num_entities"],
    epochs: int = RECIPE["epochs"],
    lr: float = RECIPE["lr"],
    batch_size: int = RECIPE["batch_size"],
    model_seed: int | None = None,
) -> dict[str, Path]:
    """Train (or find) the target and the retain model of one forget size and ``seed`` (see
    :func:`train_oracle_model`); their paths."""
    return {
        kind: train_oracle_model(out, kind, forget_percent, seed, num_entities, epochs, lr, batch_size, model_seed)
        for kind in ("target", "retain")
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m litplug.oracle",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--out", default="runs/qa", help="folder of the cached models")
    parser.add_argument(
        "--forget-percent", type=int, nargs="+", default=[5], choices=list(FORGET_PERCENTS), help="forget sizes"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="corpus seeds (people and split)")
    parser.add_argument("--num-entities", type=int, default=RECIPE["num_entities"], help="people in the corpus")
    parser.add_argument("--epochs", type=int, default=RECIPE["epochs"], help="training epochs")
    parser.add_argument("--lr", type=float, default=RECIPE["lr"], help="learning rate")
    parser.add_argument("--batch-size", type=int, default=RECIPE["batch_size"], help="batch size")
    parser.add_argument("--model-seed", type=int, help="another initialisation and order (a second target, retain)")
    args = parser.parse_args(argv)
    for percent in args.forget_percent:  # an impossible forget size is refused before anything trains
        FictitiousQA(num_entities=args.num_entities, forget_percent=percent)
    for percent in args.forget_percent:
        for seed in args.seeds:
            paths = train_oracle(
                args.out, percent, seed, args.num_entities, args.epochs, args.lr, args.batch_size, args.model_seed
            )
            print(f"forget {percent}% seed {seed}: {paths['target']} {paths['retain']}")


if __name__ == "__main__":
    main()
