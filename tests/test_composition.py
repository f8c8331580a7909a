"""Methods of different families in one run, composed the way users do it: YAML fragments on
the command line (SAM + EMA + UnlearningMask on an Unlearner)."""

from pathlib import Path

import torch
from harness import read_scalars

from litplug.callbacks import EMA, SAM, UnlearningMask
from litplug.cli import LitplugCLI, main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--test_after_fit=false"]


def test_unlearning_mask_with_sam_and_ema_from_yaml(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(
        [
            "fit",
            "--config",
            str(CONFIGS / "digits/unlearning/original.yaml"),
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=4",
            "--trainer.limit_val_batches=1",
            *QUIET,
        ]
    )
    original = torch.load(tmp_path / "runs/unlearning/original.ckpt", weights_only=False)["state_dict"]

    fragments = [
        "digits/unlearning/class.yaml",
        "digits/unlearning/methods/gradient_difference.yaml",
        "callbacks/unlearning_mask.yaml",
        "callbacks/sam.yaml",
        "callbacks/ema.yaml",
    ]
    args = ["fit"] + [a for f in fragments for a in ("--config", str(CONFIGS / f))]
    cli = LitplugCLI(
        args=[
            *args,
            "--trainer.max_epochs=2",
            "--trainer.limit_train_batches=4",
            "--trainer.limit_val_batches=1",
            "--trainer.log_every_n_steps=2",
            *QUIET,
        ]
    )

    (mask_cb,) = [c for c in cli.trainer.callbacks if isinstance(c, UnlearningMask)]
    (ema,) = [c for c in cli.trainer.callbacks if isinstance(c, EMA)]
    assert any(isinstance(c, SAM) for c in cli.trainer.callbacks)
    assert ema.updates == 8
    masks = mask_cb.state_dict()["masks"]
    final = cli.model.state_dict()  # fit ended on the EMA average (final_weights: average)
    exported = torch.load(tmp_path / "runs/ema_backbone.pt", weights_only=True)
    # the mask covers every parameter, biases included (a small bias may be all updatable)
    assert set(masks) == {n for n, p in cli.model.named_parameters() if p.requires_grad}
    assert sum(int((~m).sum()) for m in masks.values()) > 0
    for name, updatable in masks.items():
        frozen = ~updatable
        # Frozen entries stay bit-identical through SAM's perturbation and in the EMA average.
        assert torch.equal(final[name][frozen], original[name][frozen]), name
        assert torch.equal(exported[name.removeprefix("backbone.")][frozen], original[name][frozen]), name
        if updatable.any():
            assert not torch.equal(final[name][updatable], original[name][updatable]), name

    scalars = read_scalars(tmp_path / "runs")
    assert {"sam/loss_increase", "ema/decay", "unlearn/mask_ratio", "unlearn/val/UA"} <= set(scalars)
