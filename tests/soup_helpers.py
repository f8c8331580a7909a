"""Helpers shared by the tests of CheckpointSoup and WiSEFT: a classifier, a short fit on digits and a
recorder of the epoch-end weights."""

from harness import fast_trainer
from lightning.pytorch import Callback, seed_everything
from lightning.pytorch.loggers import TensorBoardLogger

from litplug.datamodules import Digits
from litplug.modules import MLP, Classifier


class EpochEnds(Callback):
    def __init__(self):
        self.states = []

    def on_train_epoch_end(self, trainer, pl_module):
        self.states.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})


def classifier():
    return Classifier(MLP(input_shape=[1, 8, 8], num_outputs=10, hidden=[16], batch_norm=True), num_classes=10)


def fit(tmp_path, callbacks, epochs=4, model=None, **kwargs):
    seed_everything(0)
    model = model or classifier()
    logger = TensorBoardLogger(tmp_path, name="", version="")
    args = dict(max_epochs=epochs, limit_train_batches=4, limit_val_batches=2, precision="64-true", logger=logger)
    trainer = fast_trainer(tmp_path, callbacks=callbacks, **(args | kwargs))
    trainer.fit(model, Digits(batch_size=32))
    return model, trainer
