"""litplug.protocols: the contracts callbacks check at setup, and the module's own loss."""

import pytest
import torch
import torch.nn.functional as F
from foreign import Handwritten, Manual, ManualNoLoss, features, lm, tokens
from harness import fast_trainer
from lightning.pytorch import seed_everything
from torch.utils.data import DataLoader, TensorDataset

from litplug.callbacks import GradientAscentSearch, IBPWarmup, SharpnessMonitor, UnlearningMask
from litplug.callbacks.unlearning import topk_masks
from litplug.protocols import CertifiedModule, ForgetRetainData, HasBatchLoss, OfflineDesignsData, missing_members, module_loss
from litplug.modules import MLP, CertifiedClassifier, Classifier, Regressor, Unlearner
from litplug.datamodules import Digits, ForgetRetain, OfflineDesigns


def test_litplug_objects_satisfy_their_protocols():
    mlp = MLP(input_shape=[4], num_outputs=2, hidden=[4])
    assert isinstance(CertifiedClassifier(MLP(input_shape=[1, 8, 8], num_outputs=10, hidden=[4]), 10, eps=0.1), CertifiedModule)
    assert isinstance(ForgetRetain(Digits(), "class", [0]), ForgetRetainData)
    dm = OfflineDesigns("sphere", dim=4, num_samples=50)
    dm.setup("fit")
    assert isinstance(dm, OfflineDesignsData)
    for module in (Classifier(mlp, 2), Regressor(mlp), Unlearner(mlp, None, "retrain", num_classes=2)):
        assert isinstance(module, HasBatchLoss)
    assert missing_members(Handwritten(), HasBatchLoss) == ["batch_loss"]


def _loader():
    x, y = features().x, features().y
    return DataLoader(TensorDataset(x, y), batch_size=8)


@pytest.mark.parametrize(
    "callback, protocol, lacks",
    [
        (lambda: IBPWarmup(), "CertifiedModule", "Handwritten lacks \\['backbone', 'current_eps', 'eps', 'regularizer_tolerance', 'regularizer_weight'\\]"),
        (lambda: GradientAscentSearch(), "OfflineDesignsData", "NoneType lacks \\['designs', 'lower', 'score', 'scores', 'unstandardise', 'upper'\\]"),
        (lambda: UnlearningMask("saliency"), "ForgetRetainData", "NoneType lacks \\['forget_dataloader', 'retain_dataloader'\\]"),
    ],
)
def test_setup_error_names_the_protocol_and_what_lacks(tmp_path, callback, protocol, lacks):
    with pytest.raises(ValueError, match=f"needs the (module|datamodule) to satisfy {protocol} \\(litplug.protocols\\); {lacks}"):
        fast_trainer(tmp_path, max_steps=1, callbacks=[callback()]).fit(Handwritten(), _loader())


class Logging(Handwritten):
    def __init__(self):
        super().__init__()
        self.logged = []

    def log(self, name, *args, **kwargs):
        self.logged.append(name)


def test_module_loss_runs_training_step_muted_or_batch_loss():
    torch.manual_seed(0)
    module = Logging()
    x, y = features().x[:8], features().y[:8]
    stats = [b.clone() for b in module.net[1].buffers()]
    got = module_loss(module, (x, y), 3)
    assert module.logged == [] and all(torch.equal(a, b) for a, b in zip(stats, module.net[1].buffers()))
    assert torch.equal(got, F.cross_entropy(module(x), y)) and got.requires_grad

    manual = Manual()
    manual.optimizers = lambda: pytest.fail("module_loss stepped an optimizer")  # batch_loss, not training_step
    assert torch.equal(module_loss(manual, (x, y)), F.cross_entropy(manual(x), y))
    with pytest.raises(ValueError, match="manual optimisation.*batch_loss"):
        module_loss(ManualNoLoss(), (x, y))


def test_saliency_mask_scores_the_modules_own_loss(tmp_path):
    """Lightning's demo transformer (forward needs the target; training_step returns the token
    NLL): the mask is the top-k of the gradient of its mean loss over the forget set, and frozen
    entries stay bit-exact."""
    seed_everything(0)
    model, data = lm(), tokens()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    mask = UnlearningMask("saliency", ratio=0.3)
    fast_trainer(tmp_path, max_steps=2, callbacks=[mask]).fit(model, data)

    ref = lm()
    ref.load_state_dict(start)
    ref.eval()
    batches = list(data.forget_dataloader())
    total = sum(len(x) for x, _ in batches)
    for x, y in batches:
        (F.nll_loss(ref(x, y), y.view(-1)) * (len(x) / total)).backward()
    names = [n for n, p in ref.named_parameters() if p.dim() >= 2]
    scores = [dict(ref.named_parameters())[n].grad.abs() for n in names]
    expected = topk_masks(scores, int(sum(s.numel() for s in scores) * 0.3))
    assert sorted(mask.masks) == sorted(names)
    for n, e in zip(names, expected):
        assert torch.equal(mask.masks[n], e), n
        p = dict(model.named_parameters())[n].detach()
        assert torch.equal(p[~e], start[n][~e]), f"{n}: a frozen entry moved"
        assert not torch.equal(p, start[n]), f"{n}: nothing moved"
