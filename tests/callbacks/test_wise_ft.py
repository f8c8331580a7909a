"""WiSEFT against its equation on real fits: the interpolation with the weights of the start,
chosen on validation; a resumed run interpolates from the first start."""

import torch
from harness import fast_trainer, read_scalars
from lightning.pytorch import seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from soup_helpers import EpochEnds, classifier, fit

from litplug.callbacks import WiSEFT
from litplug.datamodules import Digits


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
