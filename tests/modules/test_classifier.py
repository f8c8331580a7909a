"""Classifier, MLP and ConvNet."""

import pytest
import torch
from harness import fast_trainer, read_scalars
from lightning.pytorch.loggers import TensorBoardLogger

from litplug.datamodules import Digits, SyntheticClassification
from litplug.modules import MLP, Classifier, ConvNet


@pytest.mark.parametrize("shape", [[1, 8, 8], [3, 12, 10]])
def test_backbones_take_their_input_shape(shape):
    for net in (MLP(input_shape=shape, num_outputs=5), ConvNet(input_shape=shape, num_outputs=5)):
        assert net(torch.zeros(2, *shape)).shape == (2, 5)
        torch.fx.symbolic_trace(net)  # the bound engine traces backbones with torch.fx


def test_classifier_learns_and_logs(tmp_path):
    torch.manual_seed(0)
    model = Classifier(MLP(input_shape=[8], num_outputs=3, hidden=[32]), num_classes=3)
    dm = SyntheticClassification(num_samples=600, input_shape=[8], num_classes=3, separation=3.0)
    trainer = fast_trainer(tmp_path, max_epochs=3, logger=TensorBoardLogger(tmp_path), log_every_n_steps=1)
    trainer.fit(model, dm)
    trainer.test(model, dm, verbose=False)
    scalars = read_scalars(tmp_path)
    assert {"train/loss", "val/loss", "val/acc", "test/acc", "test/loss"} <= set(scalars)
    assert scalars["test/acc"][-1][1] > 0.9
    assert scalars["train/loss"][-1][1] < scalars["train/loss"][0][1]


def test_scheduler_is_configured(tmp_path):
    model = Classifier(
        MLP(hidden=[8]),
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
        lr_scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5),
    )
    trainer = fast_trainer(tmp_path, max_epochs=2, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(model, Digits())
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.025)
