"""BoundTightness: CROWN / IBP width ratios per ReLU layer logged on a validation batch."""

from functools import partial

import pytest
import torch
from harness import fast_trainer, read_scalars
from lightning.pytorch import seed_everything
from lightning.pytorch.loggers import TensorBoardLogger

from litplug.callbacks import BoundTightness, IBPWarmup
from litplug.callbacks.tightness import width_ratios
from litplug.datamodules import Digits
from litplug.modules import MLP, CertifiedClassifier


def test_logs_width_ratios_during_fit(tmp_path):
    seed_everything(0)
    backbone = MLP(input_shape=[1, 8, 8], num_outputs=10, hidden=[32, 32], batch_norm=True)
    model = CertifiedClassifier(backbone, num_classes=10, eps=0.1, optimizer=partial(torch.optim.Adam, lr=3e-3))
    trainer = fast_trainer(
        tmp_path, max_epochs=2, logger=TensorBoardLogger(tmp_path, name="", version=""), limit_train_batches=4,
        limit_val_batches=1, callbacks=[IBPWarmup(start_epoch=0, ramp_epochs=1), BoundTightness(num_samples=16)],
    )  # fmt: skip
    trainer.fit(model, Digits(batch_size=32))
    scalars = read_scalars(tmp_path)
    first = [v for _, v in scalars["certified/width_ratio/layer_0"]]
    assert len(first) == 2 and all(v == pytest.approx(1.0, abs=1e-5) for v in first)  # one Linear + BN: IBP exact
    second = [v for _, v in scalars["certified/width_ratio/layer_1"]]
    assert all(0 < v < 1 for v in second)
    assert all(0 < v < 1 for _, v in scalars["certified/width_ratio/output"])
    model.eval()
    x = torch.rand(8, 1, 8, 8)
    ratios = width_ratios(model, x, 0.1)
    assert set(ratios) == {"layer_0", "layer_1", "output"}
