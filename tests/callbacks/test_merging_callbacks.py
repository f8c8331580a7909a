"""CheckpointSoup and WiSEFT against their equations on real fits: the soups are the means of the
recorded epoch-end weights, the greedy soup is never worse than its best snapshot on the
validation loss, WiSE-FT is the interpolation with the weights of the start; TensorBoard tags
read back; a resumed WiSE-FT interpolates from the first start."""

import pytest
import torch
from harness import fast_trainer, read_scalars
from lightning.pytorch import Callback, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from litplug.callbacks import CheckpointSoup, WiSEFT
from litplug.datamodules import Digits
from litplug.modules import MLP, Classifier


class EpochEnds(Callback):
    def __init__(self):
        self.states = []

    def on_train_epoch_end(self, trainer, pl_module):
        self.states.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})


def classifier():
    return Classifier(MLP(input_shape=[1, 8, 8], num_outputs=10, hidden=[16], batch_norm=True), num_classes=10)


def fit(tmp_path, callbacks, epochs=4, model=None, **kwargs):
    seed_everything(0)
    model = model or classifier()
    logger = TensorBoardLogger(tmp_path, name="", version="")
    args = dict(max_epochs=epochs, limit_train_batches=4, limit_val_batches=2, precision="64-true", logger=logger)
    trainer = fast_trainer(tmp_path, callbacks=callbacks, **(args | kwargs))
    trainer.fit(model, Digits(batch_size=32))
    return model, trainer


def mean(states):
    return {k: sum(s[k] for s in states) / len(states) for k in states[0] if states[0][k].is_floating_point()}


@pytest.mark.parametrize("final", ["uniform", "greedy"])
def test_checkpoint_soup_equals_the_mean_of_the_latest_epoch_ends(tmp_path, final):
    rec, soup = EpochEnds(), CheckpointSoup(k=3, final_weights=final)
    model, _ = fit(tmp_path, [rec, soup])
    assert soup.epochs == [1, 2, 3] and len(soup.snapshots) == 3
    members = [rec.states[1 + i] for i in (range(3) if final == "uniform" else soup.greedy_members)]
    for name, value in mean(members).items():
        torch.testing.assert_close(model.state_dict()[name], value, rtol=1e-12, atol=1e-12)
    scalars = read_scalars(tmp_path)
    assert [v for _, v in scalars["soup/snapshot_loss"]] == pytest.approx(soup.snapshot_losses)
    assert soup.losses["greedy"] <= min(soup.snapshot_losses)  # never worse than its best ingredient
    for name in ("uniform", "greedy", "live"):
        assert scalars[f"soup/{name}_loss"][0][1] == pytest.approx(soup.losses[name])


def test_wise_ft_interpolates_from_the_first_start_and_survives_resume(tmp_path):
    rec, wise = EpochEnds(), WiSEFT(alpha=0.3)
    seed_everything(0)
    start = {k: v.clone() for k, v in classifier().double().state_dict().items()}
    model, _ = fit(tmp_path / "full", [rec, wise], epochs=2)
    for name, value in start.items():
        if value.is_floating_point():
            want = torch.lerp(value, rec.states[-1][name], 0.3)
            torch.testing.assert_close(model.state_dict()[name], want, rtol=1e-12, atol=1e-12)
    assert wise.chosen == 0.3 and read_scalars(tmp_path / "full")["wise_ft/loss"][0][0] == 300
    # stop after one epoch, resume for the second: the same interpolation, from the same start
    # (float32: a float64 run does not resume bit-exactly even without callbacks)
    full, _ = fit(tmp_path / "full32", [WiSEFT(alpha=0.3)], epochs=2, precision="32-true")
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    fit(tmp_path / "part", [WiSEFT(alpha=0.3), ckpt], epochs=1, enable_checkpointing=True, precision="32-true")
    resumed = classifier()
    seed_everything(0)
    trainer = fast_trainer(
        tmp_path / "resumed", max_epochs=2, limit_train_batches=4, limit_val_batches=2, callbacks=[WiSEFT(alpha=0.3)]
    )
    trainer.fit(resumed, Digits(batch_size=32), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    for name, value in full.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name


def test_wise_ft_chooses_alpha_on_validation(tmp_path):
    wise = WiSEFT(alpha=[0.0, 0.5, 1.0])
    fit(tmp_path, [wise], epochs=2)
    assert wise.chosen == [0.0, 0.5, 1.0][min(range(3), key=lambda i: wise.losses[i])]
    assert wise.losses[2] < wise.losses[0]  # two epochs of training beat the initialisation


def test_refused_without_validation_data(tmp_path):
    with pytest.raises(ValueError, match="CheckpointSoup chooses its merge on validation data"):
        fit(tmp_path, [CheckpointSoup()], epochs=1, limit_val_batches=0)
