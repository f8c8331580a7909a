"""Model soups: functional core, ModelSoup under Trainer.validate, and the digits recipe end to end
through the CLI (fine-tunes -> greedy soup)."""

from pathlib import Path

import pytest
import torch
from harness import fast_trainer, read_scalars, state_of
from lightning.pytorch import seed_everything
from lightning.pytorch.loggers import TensorBoardLogger

from litplug.datamodules import Digits
from litplug.modules import MLP, Classifier, ModelSoup
from litplug.modules.soup import load_ingredient

ROOT = Path(__file__).resolve().parents[2]


def mlp(hidden=16):
    return MLP(input_shape=[1, 8, 8], num_outputs=10, hidden=[hidden], batch_norm=True)


@pytest.fixture(scope="module")
def ingredients(tmp_path_factory):
    """Three short fine-tunes from one seeded init with different learning rates, saved as a
    Lightning checkpoint, a plain state dict, and a Lightning checkpoint."""
    tmp = tmp_path_factory.mktemp("ingredients")
    paths = []
    for i, lr in enumerate((3e-3, 1e-2, 3e-4)):
        seed_everything(0)
        model = Classifier(mlp(), optimizer=lambda p, lr=lr: torch.optim.Adam(p, lr=lr))
        trainer = fast_trainer(tmp, max_epochs=1, limit_train_batches=15, limit_val_batches=0)
        trainer.fit(model, Digits(batch_size=32))
        if i == 1:
            paths.append(str(tmp / f"ing{i}.pt"))
            torch.save(model.backbone.state_dict(), paths[-1])
        else:
            paths.append(str(tmp / f"ing{i}.ckpt"))
            trainer.save_checkpoint(paths[-1])
    return paths


def validate(tmp_path, soup, logger=False):
    trainer = fast_trainer(tmp_path, logger=logger)
    return trainer.validate(soup, Digits(batch_size=64), verbose=False)[0]


def test_load_ingredient_both_formats(ingredients, tmp_path):
    a, b = load_ingredient(ingredients[0]), load_ingredient(ingredients[1])
    assert a.keys() == b.keys() == mlp().state_dict().keys()
    torch.save({"state_dict": {"other.w": torch.zeros(1)}}, tmp_path / "bad.ckpt")
    with pytest.raises(ValueError, match="no weights under 'backbone.'"):
        load_ingredient(str(tmp_path / "bad.ckpt"))


def test_soup_of_identical_models_equals_the_model(ingredients, tmp_path):
    for recipe in ("uniform", "greedy"):
        soup = ModelSoup(mlp(), [ingredients[1]] * 3, recipe=recipe, output_path=str(tmp_path / "soup.pt"))
        validate(tmp_path, soup)
        expected = load_ingredient(ingredients[1])
        for k, v in state_of(soup.backbone).items():
            torch.testing.assert_close(v, expected[k], rtol=1e-6, atol=1e-7, msg=k)
        assert soup.soup_score == soup.scores[0]


def test_greedy_never_worse_than_best_ingredient(ingredients, tmp_path):
    logger = TensorBoardLogger(tmp_path / "tb")
    soup = ModelSoup(mlp(), ingredients, recipe="greedy", output_path=str(tmp_path / "soup.pt"))
    metrics = validate(tmp_path, soup, logger)
    assert soup.soup_score >= max(soup.scores)
    assert metrics["val/acc"] == pytest.approx(soup.soup_score, abs=1e-6)  # the validation epoch ran on the soup
    saved = torch.load(tmp_path / "soup.pt")
    bare = mlp()
    bare.load_state_dict(saved)
    for k, v in state_of(bare).items():
        assert torch.equal(v, state_of(soup.backbone)[k])
    scalars = read_scalars(tmp_path / "tb")
    assert [v for _, v in scalars["soup/ingredient_acc"]] == pytest.approx(soup.scores)
    assert [v for _, v in scalars["soup/kept"]] == [float(i in soup.kept) for i in range(3)]
    # the loss metric is minimised and also never worse than the best ingredient
    soup = ModelSoup(mlp(), ingredients, recipe="greedy", metric="val/loss", output_path=None)
    validate(tmp_path, soup)
    assert soup.soup_score <= min(soup.scores)


def test_mismatched_checkpoints_fail(ingredients, tmp_path):
    torch.save(mlp(hidden=8).state_dict(), tmp_path / "narrow.pt")
    with pytest.raises(ValueError, match=r"narrow.pt: '1.0.weight' has shape \(8, 64\), expected \(16, 64\)"):
        ModelSoup(mlp(), [ingredients[0], str(tmp_path / "narrow.pt")])
    with pytest.raises(ValueError, match="`recipe`"):
        ModelSoup(mlp(), ingredients, recipe="best")


def test_digits_recipe_end_to_end(tmp_path, monkeypatch):
    from litplug.cli import LitplugCLI

    monkeypatch.chdir(tmp_path)
    tiny = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=10", "--trainer.limit_val_batches=1",
            "--trainer.enable_progress_bar=false", "--test_after_fit=false",
            "--model.init_args.backbone.init_args.hidden=[32]"]  # fmt: skip
    versions = {
        "lr_1e-3": [],
        "lr_3e-3": ["--model.init_args.optimizer.init_args.lr=0.003"],
        "wd_1e-2": ["--model.init_args.optimizer.init_args.weight_decay=0.01"],
    }
    for version, extra in versions.items():
        LitplugCLI(
            args=[
                "fit",
                "--config",
                str(ROOT / "configs/digits/soup_finetune.yaml"),
                f"--trainer.logger.init_args.version={version}",
                *tiny,
                *extra,
            ]
        )
    ckpts = [f"runs/soup/{v}/checkpoints/last.ckpt" for v in versions]
    assert all(Path(c).exists() for c in ckpts)
    cli = LitplugCLI(
        args=[
            "validate",
            "--config",
            str(ROOT / "configs/digits/soup.yaml"),
            "--model.init_args.backbone.init_args.hidden=[32]",
            f"--model.init_args.checkpoints={ckpts}",
            "--trainer.enable_progress_bar=false",
        ]  # fmt: skip
    )
    soup = cli.model
    assert soup.soup_score >= max(soup.scores) and len(soup.scores) == 3
    assert Path("runs/soup/soup_backbone.pt").exists()
    assert "soup/acc" in read_scalars(tmp_path / "runs/soup/soup")


def test_a_checkpoint_of_any_module_holding_the_backbone_is_an_ingredient(tmp_path):
    """A user's Lightning checkpoint whose keys start with ``model.`` (not ``backbone.``) is found
    by its prefix, for ModelSoup and ModelMerge alike."""
    from litplug.modules import ModelMerge

    torch.manual_seed(0)
    nets = [MLP(input_shape=[1, 8, 8], num_outputs=10, hidden=[8]) for _ in range(2)]
    paths = []
    for i, net in enumerate(nets):
        path = tmp_path / f"user_{i}.ckpt"
        torch.save({"state_dict": {f"model.{k}": v for k, v in net.state_dict().items()}}, path)
        paths.append(str(path))
    soup = ModelSoup(MLP(input_shape=[1, 8, 8], num_outputs=10, hidden=[8]), paths, recipe="uniform", output_path=None)
    for got, net in zip(soup.ingredients, nets):
        assert all(torch.equal(got[k], v) for k, v in net.state_dict().items())
    merge = ModelMerge(
        MLP(input_shape=[1, 8, 8], num_outputs=10, hidden=[8]), paths, recipe="uniform", output_path=None
    )
    assert all(torch.equal(merge.ingredients[1][k], v) for k, v in nets[1].state_dict().items())
    with pytest.raises(ValueError, match="no weights under 'backbone.'"):
        load_ingredient(paths[0])  # without the backbone's names there is nothing to find the prefix by
