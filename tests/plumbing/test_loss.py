"""litplug.plumbing.loss: the module's own loss on a batch (batch_loss, else training_step muted)."""

import pytest
import torch
import torch.nn.functional as F
from foreign import Handwritten, Manual, ManualNoLoss, features

from litplug.plumbing.loss import module_loss


def test_module_loss_runs_training_step_muted_or_batch_loss():
    torch.manual_seed(0)
    module = Logging()
    x, y = features().x[:8], features().y[:8]
    module.eval()
    got = module_loss(module, (x, y), 3)
    assert module.logged == []
    assert torch.equal(got, F.cross_entropy(module(x), y)) and got.requires_grad

    manual = Manual()
    manual.optimizers = lambda: pytest.fail("module_loss stepped an optimizer")  # batch_loss, not training_step
    assert torch.equal(module_loss(manual, (x, y)), F.cross_entropy(manual(x), y))
    with pytest.raises(TypeError, match="manual optimisation.*HasBatchLoss"):
        module_loss(ManualNoLoss(), (x, y))


class Logging(Handwritten):
    def __init__(self):
        super().__init__()
        self.logged = []

    def log(self, name, *args, **kwargs):
        self.logged.append(name)
