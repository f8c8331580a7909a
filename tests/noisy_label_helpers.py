"""Helpers shared by the tests of ELR and PS-KD: a recorder of the batches and weights, a float64 fit
on features, and one SGD step on a reference loss written by hand."""

from functools import partial

import torch
from foreign import features
from harness import fast_trainer
from lightning.pytorch import Callback, seed_everything

from litplug.datamodules import Indexed
from litplug.modules import MLP, Classifier

LR = 0.5


class Batches(Callback):
    def __init__(self):
        self.batches, self.params = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append((batch[0].clone(), batch[1].clone(), trainer.datamodule.batch_index.clone()))
        self.params.append([p.detach().clone() for p in pl_module.parameters()])


def fit(callback, epochs, accumulate=1):
    seed_everything(0)
    model = Classifier(MLP(input_shape=[6], num_outputs=3, hidden=[8]), 3, optimizer=partial(torch.optim.SGD, lr=LR))
    rec = Batches()
    trainer = fast_trainer(
        "unused", max_epochs=epochs, precision="64-true", callbacks=[callback, rec], limit_val_batches=0,
        accumulate_grad_batches=accumulate,
    )  # fmt: skip
    trainer.fit(model, Indexed(features(n=16, batch_size=4)))
    return model, rec


def reference_step(model, params, micro, loss):
    with torch.no_grad():
        for p, w in zip(model.parameters(), params):
            p.copy_(w)
    model.zero_grad()
    for x, y, idx in micro:
        (loss(model(x), y, idx) / len(micro)).backward()
    return [w - LR * p.grad for p, w in zip(model.parameters(), params)]
