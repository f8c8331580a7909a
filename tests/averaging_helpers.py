"""Helpers shared by the tests of EMA, SWA and their base (tests/callbacks/test_{ema,swa,weight_averaging}.py)."""

import torch
from harness import fast_trainer, state_of
from lightning.pytorch import Callback, seed_everything

from litplug.datamodules import Digits
from litplug.modules import MLP, Classifier


def small_classifier(batch_norm=True):
    return Classifier(MLP(input_shape=[1, 8, 8], num_outputs=10, hidden=[16], batch_norm=batch_norm), num_classes=10)


class Probe(Callback):
    """Records full copies of the module's state at hooks (runs after the callback under test)."""

    def __init__(self):
        self.after_step, self.val_start, self.val_end, self.epoch_snapshots = [], [], [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after_step.append(state_of(pl_module))
        if batch_idx + 1 == trainer.num_training_batches:
            self.epoch_snapshots.append(self.after_step[-1])

    def on_validation_epoch_start(self, trainer, pl_module):
        self.val_start.append(state_of(pl_module))

    def on_validation_epoch_end(self, trainer, pl_module):
        self.val_end.append(state_of(pl_module))

    def on_test_epoch_start(self, trainer, pl_module):
        self.test_start = state_of(pl_module)


def fit(tmp_path, callback, epochs=2, batches=4, model=None, probe=None, **kwargs):
    seed_everything(0)
    model = model or small_classifier()
    callbacks = [callback] + ([probe] if probe else [])
    trainer = fast_trainer(
        tmp_path, max_epochs=epochs, limit_train_batches=batches, limit_val_batches=1, callbacks=callbacks, **kwargs
    )
    trainer.fit(model, Digits(batch_size=32))
    return trainer, model


def assert_states_equal(a, b, keys=None):
    for k in keys or a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
