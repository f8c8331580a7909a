"""ELR and PS-KD: an optimizer step equals SGD on the reference loss (CE + lambda ELR term; CE with
PS-KD's soft targets) written by hand, with gradient accumulation, in float64; clear errors."""

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from foreign import features
from harness import fast_trainer
from lightning.pytorch import Callback, seed_everything

from litplug.callbacks import ELR, PSKD
from litplug.datamodules import Indexed
from litplug.modules import MLP, Classifier

LR = 0.5


class Batches(Callback):
    def __init__(self):
        self.batches, self.params = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append((batch[0].clone(), batch[1].clone(), trainer.datamodule.batch_index.clone()))
        self.params.append([p.detach().clone() for p in pl_module.parameters()])


def _fit(callback, epochs, accumulate=1):
    seed_everything(0)
    model = Classifier(MLP(input_shape=[6], num_outputs=3, hidden=[8]), 3, optimizer=partial(torch.optim.SGD, lr=LR))
    rec = Batches()
    trainer = fast_trainer(
        "unused", max_epochs=epochs, precision="64-true", callbacks=[callback, rec], limit_val_batches=0,
        accumulate_grad_batches=accumulate,
    )  # fmt: skip
    trainer.fit(model, Indexed(features(n=16, batch_size=4)))
    return model, rec


def _reference_step(model, params, micro, loss):
    with torch.no_grad():
        for p, w in zip(model.parameters(), params):
            p.copy_(w)
    model.zero_grad()
    for x, y, idx in micro:
        (loss(model(x), y, idx) / len(micro)).backward()
    return [w - LR * p.grad for p, w in zip(model.parameters(), params)]


def test_elr_step_equals_the_reference_loss():
    beta, lam = 0.7, 3.0
    model, rec = _fit(ELR(beta=beta, lam=lam), epochs=2, accumulate=2)
    targets = torch.zeros(16, 3, dtype=torch.float64)

    def loss(z, y, idx):  # the reference elr_loss.forward
        p = F.softmax(z, dim=1).clamp(1e-4, 1.0 - 1e-4)
        targets[idx] = beta * targets[idx] + (1 - beta) * (p.detach() / p.detach().sum(dim=1, keepdim=True))
        return F.cross_entropy(z, y) + lam * ((1 - (targets[idx] * p).sum(dim=1)).log()).mean()

    ref = Classifier(MLP(input_shape=[6], num_outputs=3, hidden=[8]), 3).double()
    for step in range(len(rec.batches) // 2 - 1):  # 2 micro-batches per step
        want = _reference_step(ref, rec.params[2 * step], rec.batches[2 * step : 2 * step + 2], loss)
        for got, w in zip(rec.params[2 * step + 2], want):
            torch.testing.assert_close(got, w, rtol=1e-10, atol=1e-12)


def test_pskd_step_equals_the_reference_soft_targets():
    alpha_t, epochs = 0.8, 3
    model, rec = _fit(PSKD(alpha=alpha_t), epochs=epochs)
    predictions = torch.zeros(16, 3, dtype=torch.float64)
    ref = Classifier(MLP(input_shape=[6], num_outputs=3, hidden=[8]), 3).double()
    per_epoch = 4
    for step in range(len(rec.batches) - 1):
        epoch = step // per_epoch
        alpha = alpha_t * (epoch + 1) / epochs

        def loss(z, y, idx, epoch=epoch, alpha=alpha):  # the reference training loop
            onehot = F.one_hot(y, 3).double()
            if epoch == 0:
                predictions[idx] = onehot
            soft = (1 - alpha) * onehot + alpha * predictions[idx]
            out = (-soft * F.log_softmax(z, dim=1)).sum(dim=1).mean()
            predictions[idx] = F.softmax(z, dim=1).detach()
            return out

        want = _reference_step(ref, rec.params[step], rec.batches[step : step + 1], loss)
        for got, w in zip(rec.params[step + 1], want):
            torch.testing.assert_close(got, w, rtol=1e-10, atol=1e-12)


def test_bad_setups_fail_before_training(tmp_path):
    model = Classifier(MLP(input_shape=[6], num_outputs=3), 3)
    for callback in (ELR(), PSKD()):
        with pytest.raises(TypeError, match="Wrap it: `litplug.datamodules.Indexed"):
            fast_trainer(tmp_path, callbacks=[callback]).fit(model, features())
        wrong = Classifier(MLP(input_shape=[5], num_outputs=3), 3)
        with pytest.raises(ValueError, match=f"{type(callback).__name__} needs a classifier-like module"):
            fast_trainer(tmp_path, callbacks=[callback]).fit(wrong, Indexed(features()))
        assert wrong.global_step == 0
