"""PS-KD: an optimizer step equals SGD on CE with PS-KD's soft targets written by hand, with
gradient accumulation, in float64."""

import torch
import torch.nn.functional as F
from noisy_label_helpers import fit, reference_step

from litplug.callbacks import PSKD
from litplug.modules import MLP, Classifier


def test_pskd_step_equals_the_reference_soft_targets():
    alpha_t, epochs = 0.8, 3
    model, rec = fit(PSKD(alpha=alpha_t), epochs=epochs)
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

        want = reference_step(ref, rec.params[step], rec.batches[step : step + 1], loss)
        for got, w in zip(rec.params[step + 1], want):
            torch.testing.assert_close(got, w, rtol=1e-10, atol=1e-12)
