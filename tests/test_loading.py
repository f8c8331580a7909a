"""litplug.loading: files a user supplies are read without running code from them. Crafted files
whose payload would create a marker file are refused (and the marker never appears); genuine
Lightning checkpoints, state dicts, safetensors files, save_pretrained folders and CIFAR-10
batches still load."""

from __future__ import annotations

import pathlib
import pickle
import re

import numpy as np
import pytest
import torch
from harness import fast_trainer
from lightning.pytorch.demos.boring_classes import BoringModel
from safetensors.torch import save_file
from torch import nn

from litplug.datamodules import CIFAR10
from litplug.loading import load_data_pickle, load_file, load_json, load_state_dict, load_weights
from litplug.modules import MLP, ModelSoup, Unlearner

PACKAGE = pathlib.Path(__file__).resolve().parents[1]


class Payload:
    """Unpickling calls ``open(marker, "w")``: the file appears if any code from the pickle runs."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _mlp() -> nn.Module:
    return MLP(input_shape=[4], num_outputs=3, hidden=[5])


def _crafted(tmp_path, legacy=False) -> tuple[pathlib.Path, pathlib.Path]:
    marker, path = tmp_path / "marker", tmp_path / ("evil_legacy.pt" if legacy else "evil.ckpt")
    state = {f"backbone.{k}": v for k, v in _mlp().state_dict().items()}
    torch.save({"state_dict": state, "hooks": Payload(marker)}, path, _use_new_zipfile_serialization=not legacy)
    return path, marker


@pytest.mark.parametrize("legacy", [False, True])
def test_crafted_checkpoint_is_refused_naming_the_global_and_the_opt_in(tmp_path, legacy):
    path, marker = _crafted(tmp_path, legacy)
    with pytest.raises(ValueError, match=r"open.*trust_checkpoint=True") as err:
        load_file(path)
    assert str(path) in str(err.value) and not marker.exists()
    with pytest.raises(ValueError, match=r"`checkpoint`: .*open.*trust_checkpoint=True"):
        Unlearner(_mlp(), str(path), "finetune")
    assert not marker.exists()
    with pytest.raises(ValueError, match=r"open.*trust_checkpoint"):
        ModelSoup(_mlp(), [str(path)])
    assert not marker.exists()


def test_trust_checkpoint_runs_the_file(tmp_path):
    """The documented opt-in really is full unpickling (so its warning is true)."""
    path, marker = _crafted(tmp_path)
    model = Unlearner(_mlp(), str(path), "finetune", trust_checkpoint=True)
    assert marker.exists() and model.trust_checkpoint


def test_genuine_files_load(tmp_path):
    class WithPaths(BoringModel):
        def __init__(self, root: pathlib.Path = pathlib.Path("data"), betas=(0.9, 0.99)):
            super().__init__()
            self.save_hyperparameters()

    trainer = fast_trainer(tmp_path, max_steps=1, limit_val_batches=0)
    trainer.fit(WithPaths())
    trainer.save_checkpoint(tmp_path / "lightning.ckpt")
    ckpt = load_file(tmp_path / "lightning.ckpt")
    assert ckpt["hyper_parameters"]["root"] == pathlib.Path("data") and "optimizer_states" in ckpt
    net = nn.Linear(32, 2)
    assert load_weights(net, tmp_path / "lightning.ckpt") == "layer."

    weights = _mlp().state_dict()
    torch.save(weights, tmp_path / "state.pt")
    save_file(weights, tmp_path / "weights.bin")  # recognised by content, not by name
    for name in ("state.pt", "weights.bin"):
        got = load_state_dict(tmp_path / name)
        assert got.keys() == weights.keys() and all(torch.equal(got[k], weights[k]) for k in got)


def _cifar_batch(rng, n=4) -> dict:
    """One batch as the CIFAR-10 python files hold it: data as uint8 rows, labels as ints."""
    return {
        "batch_label": "training batch 1 of 5",
        "labels": rng.integers(0, 10, n).tolist(),
        "data": rng.integers(0, 256, (n, 3072)).astype(np.uint8),
        "filenames": [f"img_{i}.png".encode() for i in range(n)],
    }


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar_batch_reads_with_the_restricted_unpickler(tmp_path, protocol):
    batch = _cifar_batch(np.random.default_rng(0))
    (tmp_path / "b").write_bytes(pickle.dumps(batch, protocol=protocol))
    got = load_data_pickle(tmp_path / "b")
    assert got["labels"] == batch["labels"] and got["filenames"] == batch["filenames"]
    assert np.array_equal(got["data"], batch["data"])


def test_crafted_cifar_batch_is_refused_naming_the_file(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(pickle.dumps(_cifar_batch(rng), protocol=2))
    marker = tmp_path / "marker"
    evil = {**_cifar_batch(rng), "labels": Payload(marker)}
    (folder / "data_batch_3").write_bytes(pickle.dumps(evil, protocol=2))
    with pytest.raises(ValueError, match=r"data_batch_3.*refers to .*open"):
        CIFAR10(root=str(tmp_path)).setup()
    assert not marker.exists()


def test_no_unrestricted_unpickling_in_the_package():
    """Only litplug/loading.py calls torch.load, and only its documented opt-in unpickles fully."""
    found = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] in ("tests", "build") or rel.parts[0].startswith(".") or ".egg-info" in str(rel):  # .ci/venv
            continue
        text = path.read_text()
        for pattern in (r"weights_only\s*=\s*False", r"\bpickle\.loads?\(", r"\btorch\.load\(", r"\bUnpickler\("):
            for m in re.finditer(pattern, text):
                found.append(f"{rel}:{text[: m.start()].count(chr(10)) + 1}: {m.group()}")
    outside = [f for f in found if not f.startswith("loading.py:")]
    assert not outside, outside
    lines = (PACKAGE / "loading.py").read_text().splitlines()
    full = [i for i, line in enumerate(lines) if re.search(r"weights_only\s*=\s*False", line)]
    assert len(full) == 1 and lines[full[0] - 1].strip() == "if trust_checkpoint:"


def test_json_records_are_objects_read_as_data(tmp_path):
    path = tmp_path / "settings.json"
    path.write_text('{"epochs": 2, "lr": 0.003}')
    assert load_json(path) == {"epochs": 2, "lr": 0.003}
    for text, match in (("[1, 2]", "must hold a JSON object, got list"), ("{oops", "could not be read as JSON")):
        path.write_text(text)
        with pytest.raises(ValueError, match=match):
            load_json(path)
    path.write_bytes(b"\xff\xfe{")
    with pytest.raises(ValueError, match="settings.json' could not be read as JSON"):
        load_json(path)
