"""ELR: an optimizer step equals SGD on the reference loss (CE + lambda ELR term) written by hand,
with gradient accumulation, in float64."""

import torch
import torch.nn.functional as F
from noisy_label_helpers import fit, reference_step

from litplug.callbacks import ELR
from litplug.modules import MLP, Classifier


def test_elr_step_equals_the_reference_loss():
    beta, lam = 0.7, 3.0
    model, rec = fit(ELR(beta=beta, lam=lam), epochs=2, accumulate=2)
    targets = torch.zeros(16, 3, dtype=torch.float64)

    def loss(z, y, idx):  # the reference elr_loss.forward
        p = F.softmax(z, dim=1).clamp(1e-4, 1.0 - 1e-4)
        targets[idx] = beta * targets[idx] + (1 - beta) * (p.detach() / p.detach().sum(dim=1, keepdim=True))
        return F.cross_entropy(z, y) + lam * ((1 - (targets[idx] * p).sum(dim=1)).log()).mean()

    ref = Classifier(MLP(input_shape=[6], num_outputs=3, hidden=[8]), 3).double()
    for step in range(len(rec.batches) // 2 - 1):  # 2 micro-batches per step
        want = reference_step(ref, rec.params[2 * step], rec.batches[2 * step : 2 * step + 2], loss)
        for got, w in zip(rec.params[2 * step + 2], want):
            torch.testing.assert_close(got, w, rtol=1e-10, atol=1e-12)
