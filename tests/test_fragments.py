"""The shipped callback fragments (configs/callbacks/*.yaml) work in a user's own LightningCLI
script that never imports litplug: their class paths are full import paths."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "callbacks"

USER_SCRIPT = """\
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class Net(LightningModule):
    def __init__(self, lr: float = 0.1):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
        self.lr = lr

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", F.mse_loss(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class Data(LightningDataModule):
    def _loader(self):
        x = torch.randn(32, 4, generator=torch.Generator().manual_seed(0))
        return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)

    def train_dataloader(self):
        return self._loader()

    def val_dataloader(self):
        return self._loader()


if __name__ == "__main__":
    # One command line per run, as JSON (the test runs several in one process to save start-up).
    import json
    import sys

    for args in json.loads(sys.argv[1]):
        LightningCLI(Net, Data, args=args)
"""

TRAINER = [
    "--trainer.max_epochs=2",
    "--trainer.enable_checkpointing=false",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]

# Fragments trained together on the user's module (one run per group: SAM and IGNITE are one
# penalty per Trainer, EMA and SWA both evaluate on their average); the other SAM variants and the
# fragments that need a litplug contract (certified, unlearning, indexed data) are parsed only.
FIT_GROUPS = [
    ["ema", "sam", "sharpness_monitor", "lr_monitor", "early_stopping"],
    ["swa", "ignite"],
]
PARSE_ONLY = sorted({p.stem for p in CONFIGS.glob("*.yaml")} - {name for group in FIT_GROUPS for name in group})


def _configs(names: list[str]) -> list[str]:
    return [a for name in names for a in ("--config", str(CONFIGS / f"{name}.yaml"))]


def _class_paths(node):
    if isinstance(node, dict):
        yield from ([node["class_path"]] if "class_path" in node else [])
        for value in node.values():
            yield from _class_paths(value)
    elif isinstance(node, list):
        for value in node:
            yield from _class_paths(value)


def test_every_fragment_uses_full_import_paths():
    for path in CONFIGS.glob("*.yaml"):
        for class_path in _class_paths(yaml.safe_load(path.read_text())):
            assert class_path.startswith(("litplug.", "lightning.")), (path.name, class_path)


def test_fragments_run_in_a_user_lightning_cli_that_never_imports_litplug(tmp_path):
    """The first run would already fail on a short name (nothing has imported litplug yet); the
    test above keeps the later runs honest (every class path is a full one)."""
    assert "litplug" not in USER_SCRIPT
    (tmp_path / "mycli.py").write_text(USER_SCRIPT)
    runs = [["fit", *_configs(group), *TRAINER] for group in FIT_GROUPS]
    runs.append(["fit", *_configs(PARSE_ONLY), *TRAINER, "--print_config"])  # exits after printing
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    proc = subprocess.run(
        [sys.executable, str(tmp_path / "mycli.py"), json.dumps(runs)], cwd=tmp_path, env=env,
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("`Trainer.fit` stopped") + proc.stderr.count("`Trainer.fit` stopped") == len(FIT_GROUPS)
    for name in ("litplug.callbacks.SAM", "litplug.callbacks.IBPWarmup", "litplug.callbacks.UnlearningMask"):
        assert f"class_path: {name}" in proc.stdout
