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


def test_the_monitor_path_mutes_once(monkeypatch):
    """SharpnessMonitor.measure mutes the module itself; module_loss inside it does not snapshot
    and put back the metric states again for every held batch."""
    import litplug.plumbing.third_party_private as private
    from litplug.callbacks import SharpnessMonitor

    entered = []
    original = private.muted

    def counting(*args, **kwargs):
        entered.append(args[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(private, "muted", counting)
    module = Logging()
    monitor = SharpnessMonitor(layerwise=False)
    monitor.held = [(features().x[:8], features().y[:8]), (features().x[8:16], features().y[8:16])]
    values = monitor.measure(module)
    assert entered == [] and module.logged == [] and torch.isfinite(values["model"])
    module_loss(module, monitor.held[0])  # outside any `muted`: muted here
    assert entered == [module]
