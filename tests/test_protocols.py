"""litplug.protocols: the contracts callbacks check at setup."""

import pytest
import torch
import torch.nn.functional as F
from foreign import Handwritten, Manual, ManualNoLoss, features, lm, tokens
from harness import fast_trainer
from lightning.pytorch import seed_everything
from torch.utils.data import DataLoader, TensorDataset

from litplug.callbacks import GradientAscentSearch, IBPWarmup, SharpnessMonitor, UnlearningMask
from litplug.datamodules import Digits, ForgetRetain, OfflineDesigns
from litplug.functional import topk_masks
from litplug.modules import MLP, CertifiedClassifier, Classifier, Regressor, Unlearner
from litplug.protocols import (
    CertifiedModule,
    ForgetRetainData,
    HasBatchLoss,
    OfflineDesignsData,
    missing_members,
)


def test_litplug_objects_satisfy_their_protocols():
    mlp = MLP(input_shape=[4], num_outputs=2, hidden=[4])
    assert isinstance(
        CertifiedClassifier(MLP(input_shape=[1, 8, 8], num_outputs=10, hidden=[4]), 10, eps=0.1), CertifiedModule
    )
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
        (
            lambda: IBPWarmup(),
            "CertifiedModule",
            "Handwritten lacks \\['backbone', 'current_eps', 'eps', 'regularizer_tolerance', 'regularizer_weight'\\]",
        ),
        (
            lambda: GradientAscentSearch(),
            "OfflineDesignsData",
            "NoneType lacks \\['designs', 'lower', 'score', 'scores', 'unstandardise', 'upper'\\]",
        ),
        (
            lambda: UnlearningMask("saliency"),
            "ForgetRetainData",
            "NoneType lacks \\['forget_dataloader', 'retain_dataloader'\\]",
        ),
    ],
)
def test_setup_error_names_the_protocol_and_what_lacks(tmp_path, callback, protocol, lacks):
    with pytest.raises(
        TypeError, match=f"needs the (module|datamodule) to satisfy {protocol} \\(litplug.protocols\\); {lacks}"
    ):
        fast_trainer(tmp_path, max_steps=1, callbacks=[callback()]).fit(Handwritten(), _loader())


def test_saliency_mask_scores_the_modules_own_loss(tmp_path):
    """Lightning's demo transformer (forward needs the target; training_step returns the token
    NLL): the mask is the top-k of the gradient of its mean loss over the forget set, and frozen
    entries stay bit-exact."""
    seed_everything(0)
    model, data = lm(), tokens()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    mask = UnlearningMask("saliency", ratio=0.3, scope="weights")
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


# --- manual optimisation ------------------------------------------------------------------


def test_monitor_never_steps_an_optimizer(tmp_path):
    """Manual optimisation with batch_loss: measured on it, one optimizer step per batch; without
    batch_loss the monitor refuses at setup (re-running training_step would step)."""
    seed_everything(0)
    model = Manual()
    monitor = SharpnessMonitor(rho=0.1, num_batches=2)
    trainer = fast_trainer(tmp_path, max_epochs=2, limit_train_batches=4, limit_val_batches=0, callbacks=[monitor])
    trainer.fit(model, features())
    assert model.steps == 8 and trainer.global_step == 8
    assert torch.isfinite(trainer.callback_metrics["sharpness/model"])
    with pytest.raises(
        TypeError, match="SharpnessMonitor needs a loss on a batch; ManualNoLoss uses manual optimisation"
    ):
        fast_trainer(tmp_path, max_steps=1, callbacks=[SharpnessMonitor()]).fit(ManualNoLoss(), features())
    with pytest.raises(
        TypeError, match="UnlearningMask\\(criterion='saliency'\\) needs a loss on a batch; ManualNoLoss uses manual"
    ):
        fast_trainer(tmp_path, max_steps=1, callbacks=[UnlearningMask("saliency")]).fit(ManualNoLoss(), features())


def test_ibp_warmup_and_search_drive_manually_optimised_modules(tmp_path):
    from lightning.pytorch import LightningModule

    class Certified(LightningModule):
        """The certified interface, optimised by hand."""

        def __init__(self):
            super().__init__()
            self.automatic_optimization = False
            self.backbone = torch.nn.Linear(6, 3)
            self.eps, self.current_eps, self.regularizer_weight, self.regularizer_tolerance = 0.2, 0.2, 0.0, 0.5
            self.seen = []

        def training_step(self, batch, batch_idx):
            x, y = batch
            self.seen.append(self.current_eps)
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(
                F.cross_entropy(self.backbone(x), y) + self.current_eps * self.backbone.weight.abs().mean()
            )
            opt.step()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    model = Certified()
    fast_trainer(
        tmp_path,
        max_epochs=3,
        limit_train_batches=2,
        callbacks=[IBPWarmup(start_epoch=1, ramp_epochs=1, schedule="linear")],
    ).fit(model, features())
    assert model.seen == pytest.approx([0.0, 0.0, 0.0, 0.1, 0.2, 0.2])

    class ManualRegressor(Regressor):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(self.batch_loss(batch))
            opt.step()

    search = GradientAscentSearch(num_designs=4, steps=3)
    regressor = ManualRegressor(MLP(input_shape=[4], num_outputs=1, hidden=[8]))
    fast_trainer(tmp_path, max_steps=2, limit_val_batches=0, callbacks=[search]).fit(
        regressor, OfflineDesigns("sphere", dim=4, num_samples=64)
    )
    assert search.designs is not None and set(search.results) >= {"offline/score_max", "offline/score_median"}
