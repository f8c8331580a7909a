"""CertifiedClassifier: loss, evaluation metrics, normalisation, purity of training_step, errors."""

import copy
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from harness import fast_trainer, read_scalars
from lightning.pytorch import seed_everything
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from litplug.bounds import UnsupportedOperationError, bounded, linear_bounds, margin_bounds, margin_spec
from litplug.callbacks import IBPWarmup
from litplug.datamodules import Digits
from litplug.modules import MLP, CertifiedClassifier

NORM = dict(mean=(0.0,), std=(1.0,), pixel_range=(0.0, 1.0))


def _model(**kwargs):
    backbone = MLP(input_shape=[1, 8, 8], num_outputs=10, hidden=[32], batch_norm=True)
    return CertifiedClassifier(backbone, num_classes=10, eps=kwargs.pop("eps", 0.1), **kwargs)


def test_an_unsupported_layer_is_refused_at_construction():
    # Bad values of the arguments are rows of the bad-input matrix (tests/test_bad_inputs.py).
    with pytest.raises(UnsupportedOperationError, match="GELU"):
        CertifiedClassifier(nn.Sequential(nn.Flatten(), nn.Linear(64, 10), nn.GELU()), eps=0.1)


class _Product(nn.Module):
    """A backbone multiplying two activations: no interval rule (the bounds of h * h are not those
    of a scaling)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.out = nn.Linear(64, 16), nn.Linear(64, 16), nn.Linear(16, 10)

    def forward(self, x):
        x = x.flatten(1)
        h = torch.relu(self.a(x))
        return self.out(h * h + torch.mul(h, torch.sigmoid(self.b(x))))


class _InputAsWeight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(64, 64)

    def forward(self, x):
        h = torch.relu(self.inp(x.flatten(1)))
        return F.linear(h, h[:10])  # the weight depends on the input


def test_unsupported_operations_refused_at_construction_with_the_node():
    with pytest.raises(
        UnsupportedOperationError, match=r"mul of two perturbed tensors .*node 'mul' \(mul\(relu, relu\)\)"
    ):
        CertifiedClassifier(_Product(), eps=0.1, **NORM)
    with pytest.raises(UnsupportedOperationError, match=r"linear with a perturbed weight .*node 'linear'"):
        CertifiedClassifier(_InputAsWeight(), eps=0.1, **NORM)

    class Exp(nn.Module):
        def forward(self, x):
            return torch.exp(x.flatten(1))

    with pytest.raises(UnsupportedOperationError, match="exp at node 'exp'"):
        CertifiedClassifier(Exp(), eps=0.1, **NORM)

    # a product with a constant (a scaling) is bounded
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Linear(64, 10)

        def forward(self, x):
            return self.inp(x.flatten(1)) * 2.0

    CertifiedClassifier(Scaled(), eps=0.1, **NORM)


def test_fsdp2_rejected_at_setup():
    model = _model(**NORM)
    model._device_mesh = object()  # what ModelParallelStrategy sets before configure_model
    with pytest.raises(ValueError, match="ModelParallelStrategy"):
        model.configure_model()


def test_loss_closed_form_and_training_step_is_pure():
    torch.manual_seed(0)
    model = _model(kappa_final=0.2, **NORM).train()
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    model.current_eps = 0.05
    assert model.kappa == pytest.approx(1 - 0.8 * 0.5)
    loss1 = model.training_step((x, y), 0)
    loss2 = model.training_step((x, y), 0)  # what SAM does: the same objective twice
    assert torch.equal(loss1, loss2)
    with torch.no_grad():
        clean = model.backbone(x)  # train-mode BN: the clean batch's statistics, as in the bounds
        margins = margin_bounds(model.backbone, x, y, 0.05, **NORM)
    expected = model.kappa * F.cross_entropy(clean, y) + (1 - model.kappa) * F.cross_entropy(-margins, y)
    torch.testing.assert_close(loss1.detach(), expected, rtol=1e-5, atol=1e-6)
    model.current_eps = 0.0  # natural training
    assert model.kappa == 1.0
    torch.testing.assert_close(model.training_step((x, y), 0).detach(), F.cross_entropy(model.backbone(x), y).detach())


def test_normalisation_learned_from_datamodule_and_checked():
    class Shifted(Digits):
        mean = (0.3,)
        std = (0.5,)

    model = _model()
    trainer = fast_trainer(".", max_steps=1, limit_val_batches=1)
    trainer.fit(model, Shifted(batch_size=32))
    assert model.normalization == {"mean": (0.3,), "std": (0.5,), "pixel_range": (0.0, 1.0)}
    lower, upper = model.box(torch.full((1, 1, 8, 8), (0.95 - 0.3) / 0.5), 0.1)
    torch.testing.assert_close(lower, torch.full((1, 1, 8, 8), (0.85 - 0.3) / 0.5))
    torch.testing.assert_close(upper, torch.full((1, 1, 8, 8), (1.0 - 0.3) / 0.5))  # clamped to the pixel range

    class Bare(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return torch.rand(1, 8, 8), 0

    with pytest.raises(ValueError, match="normalisation"):
        fast_trainer(".", max_steps=1).fit(_model(), torch.utils.data.DataLoader(Bare(), batch_size=4))


def test_fit_logs_and_verified_samples_survive_pgd(tmp_path):
    seed_everything(0)
    model = _model(eps=0.05, pgd_steps=5, optimizer=partial(torch.optim.Adam, lr=3e-3))
    logger = TensorBoardLogger(tmp_path, name="", version="")
    trainer = fast_trainer(
        tmp_path,
        max_epochs=4,
        logger=logger,
        log_every_n_steps=1,
        limit_val_batches=2,
        callbacks=[IBPWarmup(start_epoch=1, ramp_epochs=2)],
    )
    dm = Digits(batch_size=64)
    trainer.fit(model, dm)
    scalars = read_scalars(tmp_path)
    for tag in [
        "certified/eps",
        "certified/kappa",
        "certified/robust_loss",
        "certified/verified_acc",
        "certified/unstable_relu",
        "certified/tightness",
        "certified/reg_tightness",
        "certified/reg_relu",
        "val/pgd_acc",
        "val/acc",
    ]:
        assert tag in scalars, tag
    eps = [v for _, v in sorted(scalars["certified/eps"])]
    assert eps[0] == 0.0 and eps[-1] == pytest.approx(0.05)
    assert all(0 < v <= 1 for _, v in scalars["certified/tightness"])

    model.eval()
    x, y = next(iter(dm.test_dataloader()))
    result = model.certify(x, y)
    clean_ok = model(x).argmax(1) == y
    assert result["verified"].any()
    assert not (result["verified"] & ~result["pgd_correct"]).any()  # a verified sample is never broken
    assert not (result["verified"] & ~clean_ok).any()
    assert result["pgd_correct"].float().mean() <= clean_ok.float().mean()


def test_crown_ibp_objective():
    """beta * CROWN-IBP + (1 - beta) * IBP margins, beta = 1 - eps_t / eps; IBP's objective at eps."""
    with pytest.raises(ValueError, match="`bound` must be one of 'ibp', 'crown-ibp'"):
        _model(bound="crown")
    torch.manual_seed(0)
    backbone = MLP(input_shape=[1, 8, 8], num_outputs=10, hidden=[32, 32]).double()
    model = CertifiedClassifier(backbone, num_classes=10, eps=0.1, bound="crown-ibp", **NORM)
    reference = CertifiedClassifier(copy.deepcopy(backbone), num_classes=10, eps=0.1, **NORM)
    x, y = torch.rand(16, 1, 8, 8, dtype=torch.float64), torch.randint(0, 10, (16,))
    model.current_eps = reference.current_eps = 0.025
    assert model.beta == pytest.approx(0.75) and reference.beta == 0.0
    loss = model.training_step((x, y), 0)
    lower, upper = model.box(x, 0.025)
    # the papers' CROWN-IBP bound (crown_bounds tightens it with IBP's; training does not)
    crown_ibp = linear_bounds(bounded(backbone), lower, upper, "crown-ibp", margin_spec(y, 10).double()).lower
    ibp = margin_bounds(backbone, x, y, 0.025, **NORM)
    margins = 0.75 * crown_ibp + 0.25 * ibp
    kappa = model.kappa
    expected = kappa * F.cross_entropy(backbone(x), y) + (1 - kappa) * F.cross_entropy(-margins, y)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(loss, list(backbone.parameters()))
    assert all(g.abs().sum() > 0 for g in grads)
    model.current_eps = reference.current_eps = 0.1  # end of the ramp: IBP's objective
    assert model.beta == 0.0
    torch.testing.assert_close(model.training_step((x, y), 0), reference.training_step((x, y), 0))


def test_crown_ibp_fit_and_crown_verifies_at_least_what_ibp_does(tmp_path):
    seed_everything(0)
    model = _model(eps=0.05, bound="crown-ibp", optimizer=partial(torch.optim.Adam, lr=3e-3))
    logger = TensorBoardLogger(tmp_path, name="", version="")
    trainer = fast_trainer(
        tmp_path, max_epochs=3, logger=logger, log_every_n_steps=1, limit_train_batches=6, limit_val_batches=1,
        callbacks=[IBPWarmup(start_epoch=1, ramp_epochs=2)],
    )  # fmt: skip
    dm = Digits(batch_size=64)
    trainer.fit(model, dm)
    beta = [v for _, v in sorted(read_scalars(tmp_path)["certified/beta"])]
    assert beta[0] == pytest.approx(1.0, abs=0.01) and all(a >= b for a, b in zip(beta, beta[1:]))
    model.eval()
    x, y = next(iter(dm.test_dataloader()))
    ibp, crown = model.certify(x, y)["verified"], model.certify(x, y, method="crown")["verified"]
    assert not (ibp & ~crown).any() and crown.sum() >= ibp.sum()


CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
CONFIGS = sorted(
    f"{p.parent.name}/{p.name}"
    for pattern in ("*/ibp*.yaml", "*/crown_ibp*.yaml")
    for p in CONFIG_DIR.glob(pattern)
    if p.parent.name != "callbacks"
)


@pytest.mark.parametrize("config", CONFIGS)
def test_configs_instantiate(config):
    from litplug.cli import LitplugCLI

    cli = LitplugCLI(args=["--config", str(CONFIG_DIR / config), "--trainer.logger", "false"], run=False)
    assert isinstance(cli.model, CertifiedClassifier)
    assert sum(isinstance(c, IBPWarmup) for c in cli.trainer.callbacks) == 1
    assert cli.model.bound == ("crown-ibp" if "crown_ibp" in config else "ibp")
    assert cli.model.eps == pytest.approx(
        {"0.3": 0.3, "0.4": 0.4, "2_255": 2 / 255, "8_255": 8 / 255}.get(config.split("eps")[-1][:-5], cli.model.eps)
    )


def test_callback_fragment_appends(tmp_path):
    import yaml

    from litplug.cli import LitplugCLI

    base = yaml.safe_load((CONFIG_DIR / "digits/ibp.yaml").read_text())
    base["trainer"]["callbacks"] = [{"class_path": "lightning.pytorch.callbacks.LearningRateMonitor"}]
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    args = [
        "--config",
        str(tmp_path / "base.yaml"),
        "--config",
        str(CONFIG_DIR / "callbacks/ibp_warmup.yaml"),
        "--trainer.logger",
        "false",
    ]
    cli = LitplugCLI(args=args, run=False)
    assert [type(c).__name__ for c in cli.trainer.callbacks[:2]] == ["LearningRateMonitor", "IBPWarmup"]
    cli = LitplugCLI(args=[*args, "--config", str(CONFIG_DIR / "callbacks/bound_tightness.yaml")], run=False)
    assert [type(c).__name__ for c in cli.trainer.callbacks[:3]] == [
        "LearningRateMonitor",
        "IBPWarmup",
        "BoundTightness",
    ]


def test_short_digits_run_from_config(tmp_path):
    from litplug.cli import LitplugCLI

    config = str(Path(__file__).resolve().parents[2] / "configs/digits/ibp.yaml")
    args = [
        "--config",
        config,
        "--trainer.max_epochs",
        "2",
        "--trainer.limit_train_batches",
        "3",
        "--trainer.limit_val_batches",
        "1",
        "--trainer.default_root_dir",
        str(tmp_path),
        "--trainer.logger",
        "false",
        "--trainer.enable_progress_bar",
        "false",
    ]
    cli = LitplugCLI(args=args, run=False)
    cli.trainer.fit(cli.model, cli.datamodule)
    assert cli.trainer.callbacks[0].batches == 6
    assert cli.model.current_eps > 0


def test_certify_matches_the_plain_engine_and_reads_the_clean_batch_only_for_batch_statistics():
    from litplug.bounds import BoundedNetwork, margin_spec
    from litplug.modules import CNN7

    torch.manual_seed(0)
    model = CertifiedClassifier(CNN7([1, 8, 8], 10, width=4, linear_size=16), num_classes=10, eps=0.001, **NORM)
    x = torch.rand(32, 1, 8, 8)
    with torch.no_grad():
        model.backbone.train()(x)  # running statistics of this data
        model.eval()
        y = model.backbone(x).argmax(1)
    y[::4] = (y[::4] + 1) % 10  # a few samples that cannot be verified
    engine, spec = BoundedNetwork(model.backbone), margin_spec(y, 10)
    lower, upper = model.box(x, model.eps)

    def plain(clean):  # the plain rules with autograd, the clean batch carried along
        with torch.enable_grad():
            return engine(lower, upper, clean=clean, spec=spec, fused=False).lower.detach()

    reference = plain(x)
    others = F.one_hot(y, 10) == 0
    assert reference[others].abs().min() > 1e-4  # no margin within rounding of 0
    with torch.no_grad():
        verified = model.certify(x, y)["verified"]
        margins = model.robust_terms(x, y, model.eps, clean_output=False)
    assert margins.clean is None  # eval-mode batch norm: no clean pass
    torch.testing.assert_close(margins.lower, reference, rtol=1e-5, atol=1e-5)
    assert torch.equal(verified, ((reference > 0) | ~others).all(1))
    assert verified.any() and not verified.all()
    # train-mode batch norm normalises with the clean batch's statistics: still carried along
    model.train()
    state = copy.deepcopy(model.backbone.state_dict())
    with torch.no_grad():
        train_margins = model.robust_terms(x, y, model.eps, clean_output=False)
    model.backbone.load_state_dict(state)
    assert train_margins.clean is not None
    with torch.no_grad():
        torch.testing.assert_close(train_margins.lower, plain(x), rtol=1e-5, atol=1e-5)
        model.backbone.load_state_dict(state)
        assert not torch.allclose(train_margins.lower, plain(None), rtol=1e-3, atol=1e-3)


def test_certify_with_crown_runs_crown_on_the_undecided_samples_only():
    torch.manual_seed(0)
    model = CertifiedClassifier(MLP(input_shape=[1, 8, 8], num_outputs=10, hidden=[32, 32]), eps=0.02, **NORM).eval()
    x = torch.rand(64, 1, 8, 8)
    with torch.no_grad():
        y = model.backbone(x).argmax(1)
        y[::8] = (y[::8] + 1) % 10
        lower, upper = model.box(x, model.eps)
        engine, spec = bounded(model.backbone), margin_spec(y, 10)
        others = F.one_hot(y, 10) == 0
        full = linear_bounds(engine, lower, upper, "crown", spec, tighten=True).lower
        first = linear_bounds(engine, lower, upper, "crown-ibp", spec, tighten=True).lower
        verified = model.certify(x, y, method="crown")["verified"]
    assert torch.equal(verified, ((full > 0) | ~others).all(1))
    decided_by_crown = verified & ~((first > 0) | ~others).all(1)
    assert decided_by_crown.any() and not verified.all()
