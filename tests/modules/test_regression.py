"""Regressor: losses and shapes by hand, a real fit whose logged val/mse and val/spearman match
references computed on the validation set (scipy), and the offline configs."""

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from harness import fast_trainer, read_scalars
from lightning.pytorch import seed_everything
from lightning.pytorch.loggers import TensorBoardLogger

import litplug.callbacks
from litplug.cli import LitplugCLI
from litplug.datamodules import OfflineDesigns
from litplug.datamodules.offline import BOTORCH_TASKS
from litplug.modules import MLP, Regressor

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "offline"


@pytest.mark.parametrize("loss", ["mse", "l1", "huber"])
def test_losses_and_shapes(loss):
    model = Regressor(MLP(input_shape=[3], num_outputs=1, hidden=[4]), loss=loss)
    x, y = torch.randn(5, 3), torch.randn(5)
    pred = model.predict(x, y)
    assert pred.shape == (5,)
    reference = {"mse": F.mse_loss, "l1": F.l1_loss, "huber": F.huber_loss}[loss](model(x).squeeze(1), y)
    torch.testing.assert_close(model.loss(pred, y), reference)
    with pytest.raises(ValueError, match="num_outputs"):
        Regressor(MLP(input_shape=[3], num_outputs=2, hidden=[4])).predict(x, y)


def test_fit_logs_mse_and_spearman(tmp_path):
    stats = pytest.importorskip("scipy.stats")
    seed_everything(0)
    dm = OfflineDesigns("sphere", dim=4, num_samples=800, batch_size=64)
    model = Regressor(
        MLP(input_shape=[4], num_outputs=1, hidden=[32, 32]), optimizer=lambda p: torch.optim.Adam(p, lr=0.01)
    )
    trainer = fast_trainer(tmp_path, max_epochs=20, logger=TensorBoardLogger(tmp_path, name="tb"), log_every_n_steps=1)
    trainer.fit(model, dm)
    scalars = read_scalars(tmp_path / "tb")
    assert {"train/loss", "val/loss", "val/mse", "val/spearman"} <= set(scalars)
    assert len(scalars["val/spearman"]) == 20
    x, y = dm.val_set.tensors
    model.eval()
    with torch.no_grad():
        pred = model(x).squeeze(1)
    assert scalars["val/mse"][-1][1] == pytest.approx(F.mse_loss(pred, y).item(), rel=1e-4)
    rho = stats.spearmanr(pred.numpy(), y.numpy()).statistic
    assert scalars["val/spearman"][-1][1] == pytest.approx(rho, abs=1e-4)
    assert rho > 0.8  # the sphere is easy to rank
    assert scalars["train/loss"][-1][1] < scalars["train/loss"][0][1]


def test_offline_configs_fit_their_task(tmp_path, monkeypatch):
    # tests/test_cli.py runs every complete config and its saved copy; here: the backbone matches
    # the task, and the IGNITE/SAM fragments append after the search callback.
    monkeypatch.chdir(tmp_path)
    tasks = ["sphere"] + (sorted(BOTORCH_TASKS) if importlib.util.find_spec("botorch") else [])
    for task in tasks:
        cli = LitplugCLI(args=["--config", str(CONFIGS / f"{task}.yaml")], run=False)
        assert cli.datamodule.task.name == task
        assert cli.model.backbone.input_shape == cli.datamodule.input_shape
    for fragment, name in (
        ("ignite", "SurrogateSharpness"),
        ("ignite_slow_dual", "SurrogateSharpness"),
        ("sam", "SAM"),
    ):
        if hasattr(litplug.callbacks, name):  # from the sharpness family
            cli = LitplugCLI(
                args=["--config", str(CONFIGS / "sphere.yaml"), "--config", str(CONFIGS / f"{fragment}.yaml")],
                run=False,
            )
            names = [type(c).__name__ for c in cli.trainer.callbacks]
            assert names[:2] == ["GradientAscentSearch", getattr(litplug.callbacks, name).__name__]
