"""ModelMerge: every recipe from its shipped YAML (tiny ingredients), equal to the functional core;
argument validation."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from harness import read_scalars
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from litplug.cli import LitplugCLI
from litplug.datamodules import Digits, DigitsTasks
from litplug.functional import uniform_soup
from litplug.merging import align, breadcrumbs, dare, model_stock, task_arithmetic, ties_merge
from litplug.modules import MLP, ModelMerge

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs" / "digits" / "merge").glob("*.yaml"))
HIDDEN = [16]


def mlp(seed: int) -> MLP:
    torch.manual_seed(seed)
    return MLP(input_shape=[1, 8, 8], num_outputs=10, hidden=HIDDEN, batch_norm=True)


def train(model: MLP, seed: int, steps: int = 15) -> MLP:
    dm = Digits(batch_size=32, seed=seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _, (x, y) in zip(range(steps), dm.train_dataloader()):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A base, three fine-tunes of it (one as a Lightning-style checkpoint), and three models from
    different seeds."""
    tmp = tmp_path_factory.mktemp("merge")
    base = train(mlp(0), 0)
    out = {"base": str(tmp / "base.pt")}
    torch.save(base.state_dict(), out["base"])
    out["finetunes"] = []
    for s in (1, 2, 3):
        model = mlp(0)
        model.load_state_dict(base.state_dict())
        state = train(model, s, steps=8).state_dict()
        path = tmp / f"ft{s}.{'ckpt' if s == 1 else 'pt'}"
        torch.save({"state_dict": {f"backbone.{k}": v for k, v in state.items()}} if s == 1 else state, path)
        out["finetunes"].append(str(path))
    out["seeds"] = []
    for s in (10, 11, 12):
        path = tmp / f"seed{s}.pt"
        torch.save(train(mlp(s), s).state_dict(), path)
        out["seeds"].append(str(path))
    return out


def states(paths):
    from litplug.modules.soup import load_ingredient

    return [load_ingredient(p) for p in paths]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_recipe_from_yaml_equals_the_functional_core(config, files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = config.stem
    ingredients = files["seeds"] if recipe.startswith("align") else files["finetunes"]
    base_file = files["base"]
    if recipe == "align_then_ties":  # independently trained models, merged relative to the first
        base_file, ingredients = ingredients[0], ingredients[1:]
    if recipe == "map":  # one fine-tune per task of the config's DigitsTasks
        ingredients = ingredients[:2]
    args = ["validate", "--config", str(config), f"--model.init_args.backbone.init_args.hidden={HIDDEN}",
            "--model.init_args.backbone.init_args.batch_norm=true", f"--model.init_args.checkpoints={ingredients}",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]  # fmt: skip
    if recipe not in ("uniform", "greedy", "align_then_average"):
        args.append(f"--model.init_args.base={base_file}")
    cli = LitplugCLI(args=args)
    merge = cli.model
    written = torch.load(tmp_path / "runs" / "merge" / f"{recipe}.pt")
    got = {k: v for k, v in merge.backbone.state_dict().items()}
    assert all(torch.equal(written[k], v) for k, v in got.items())
    parts = states(ingredients)
    if recipe == "uniform":
        expected = uniform_soup(parts)
    elif recipe == "greedy":
        assert merge.merged_score >= max(merge.scores)
        expected = uniform_soup([parts[i] for i in merge.kept])
    elif recipe == "align_then_average":
        x = next(iter(cli.datamodule.val_dataloader()))[0]
        ref, other = mlp(0), mlp(0)
        ref.load_state_dict(parts[0])
        aligned = [parts[0]]
        for p in parts[1:]:
            other.load_state_dict(p)
            aligned.append(align(ref, other, x).state_dict())
        expected = uniform_soup(aligned)
        assert any(not torch.equal(expected[k], v) for k, v in uniform_soup(parts).items())  # alignment moved units
    elif recipe == "model_stock":
        expected = model_stock(states([base_file])[0], parts)
    elif recipe == "map":
        expected = task_arithmetic(states([base_file])[0], parts, merge.map_coefficients)
    else:
        base = states([base_file])[0]
        if recipe == "align_then_ties":
            x = next(iter(cli.datamodule.val_dataloader()))[0]
            reference = mlp(0)
            reference.load_state_dict(base)
            aligned = [align(reference, p, x) for p in parts]
            assert any(not torch.equal(a[k], p[k]) for a, p in zip(aligned, parts) for k in p)
            parts = aligned
        scores = merge.scale_scores
        best = max(range(len(scores)), key=lambda i: (scores[i], -i))
        assert merge.chosen_scale == merge.scales[best] and len(scores) == 5
        s = merge.chosen_scale
        expected = {
            "task_arithmetic": lambda: task_arithmetic(base, parts, s),
            "ties": lambda: ties_merge(base, parts, density=0.2, scale=s),
            "align_then_ties": lambda: ties_merge(base, parts, density=0.2, scale=s),
            "dare": lambda: dare(base, parts, density=0.5, seed=0, scale=s),
            "breadcrumbs": lambda: breadcrumbs(base, parts, density=0.8, gamma=0.01, scale=s),
        }[recipe]()
    for k, v in expected.items():
        assert torch.equal(got[k], v), k
    scalars = read_scalars(tmp_path / "runs" / "merge" / recipe)
    assert scalars["merge/acc"][0][1] == pytest.approx(merge.merged_score)
    per_task = [f"val/acc/dataloader_idx_{t}" for t in range(2)] if recipe == "map" else ["val/acc"]
    measured = sum(scalars[tag][0][1] for tag in per_task) / len(per_task)
    assert measured == pytest.approx(merge.merged_score, abs=1e-6)  # validation ran on the merge
    events = EventAccumulator(str(tmp_path / "runs" / "merge" / recipe))
    events.Reload()
    figure = {"greedy": ["merge/greedy"], "map": ["merge/pareto"]}.get(recipe, [])
    assert events.Tags()["images"] == ["merge/interpolation", *figure]
    path = merge.interpolation_path(points=3)
    aligns = merge.align or recipe == "align_then_average"
    assert list(path) == (["naive", "aligned"] if aligns else ["naive"])
    ends = [merge.evaluate_loss_and_accuracy(s) for s in parts[:2]]
    assert [path["naive"]["loss"][i] for i in (0, 2)] == pytest.approx([e[0] for e in ends])
    if aligns:  # aligned end: the same function as the second ingredient
        assert path["aligned"]["accuracy"][2] == pytest.approx(ends[1][1])


def test_a_base_of_another_shape_is_named(files):
    backbone = mlp(0)
    with pytest.raises(ValueError, match=r"base .*: '1.0.weight' has shape \(8, 64\)"):
        torch.save(
            MLP(input_shape=[1, 8, 8], num_outputs=10, hidden=[8], batch_norm=True).state_dict(),
            Path(files["base"]).with_name("narrow.pt"),
        )
        ModelMerge(backbone, files["finetunes"], recipe="ties", base=str(Path(files["base"]).with_name("narrow.pt")))


def _merge_and_validate(strategy, tmp_dir, ingredients, base, recipe, devices):
    from harness import fast_trainer

    if recipe == "map":
        merge = ModelMerge(mlp(0), ingredients[:2], recipe="map", base=base, output_path=None)
        data = DigitsTasks(batch_size=32)
    else:
        merge = ModelMerge(mlp(0), ingredients, recipe=recipe, base=base, scale=[0.5, 1.0, 1.5], output_path=None)
        data = Digits(batch_size=32)
    fast_trainer(tmp_dir, strategy=strategy, devices=devices).validate(merge, data, verbose=False)
    state = {k: v.clone() for k, v in merge.backbone.state_dict().items()}
    if recipe == "map":
        return {"state": state, "scores": merge.map_result.evaluated_values.tolist(), "merged": merge.merged_score}
    return {"state": state, "scores": merge.scores, "scale_scores": merge.scale_scores, "merged": merge.merged_score}


def ddp_worker(strategy, tmp_dir, finetunes, seeds, base):
    from harness import make_strategy

    return {
        "ties": _merge_and_validate(strategy, tmp_dir, finetunes, base, "ties", 2),
        "align_then_average": _merge_and_validate(make_strategy("ddp"), tmp_dir, seeds, None, "align_then_average", 2),
        "map": _merge_and_validate(make_strategy("ddp"), tmp_dir, finetunes, base, "map", 2),
    }


def test_ddp_merges_equal_single_process(files, tmp_path):
    from harness import run_distributed

    r0, r1 = run_distributed(
        ddp_worker, "ddp", tmp_path, finetunes=files["finetunes"], seeds=files["seeds"], base=files["base"]
    )
    for recipe, base, ingredients in (
        ("ties", files["base"], files["finetunes"]),
        ("align_then_average", None, files["seeds"]),
        ("map", files["base"], files["finetunes"]),
    ):
        single = _merge_and_validate("auto", tmp_path, ingredients, base, recipe, 1)
        for rank in (r0, r1):
            got = rank[recipe]
            assert got["scores"] == single["scores"]  # counts summed over ranks
            assert got.get("scale_scores") == single.get("scale_scores")
            assert got["merged"] == single["merged"]
            for k, v in single["state"].items():
                assert torch.equal(got["state"][k], v), (recipe, k)


@pytest.mark.parametrize("logger", ["tensorboard", "csv", "none"])
def test_map_loads_the_best_mean_front_point_and_logs_the_pareto_figure(logger, files, tmp_path):
    from harness import fast_trainer
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    from litplug.merging import pareto_mask

    loggers = {
        "tensorboard": TensorBoardLogger(tmp_path, name="m", version="0"),
        "csv": CSVLogger(tmp_path, name="m", version="0"),
        "none": False,
    }
    fts = files["finetunes"][:2]
    merge = ModelMerge(mlp(0), fts, recipe="map", base=files["base"], output_path=None)
    metrics = fast_trainer(tmp_path, logger=loggers[logger]).validate(merge, DigitsTasks(batch_size=64), verbose=False)
    result = merge.map_result
    assert result.evaluations == 12 and result.evaluated_values.shape == (12, 2)
    chosen = result.values[merge.map_choice]
    # the chosen point is on the predicted front: no front point dominates it, and it has the best mean
    assert not ((result.values >= chosen).all(1) & (result.values > chosen).any(1)).any()
    assert pareto_mask(result.values).all() and len(result.values) > 1
    assert result.values.mean(1).argmax() == merge.map_choice
    # the loaded point: the front's choice unless an evaluated merge measured better on average
    coefficients = merge.map_coefficients
    best = int(result.evaluated_values.mean(1).argmax())
    assert sum(merge.map_scores) / 2 >= float(result.evaluated_values[best].mean())
    if merge.map_from_front:
        assert coefficients == result.coefficients[merge.map_choice].tolist()
    else:
        assert coefficients == result.evaluated[best].tolist()
        assert merge.map_scores == result.evaluated_values[best].tolist()
    expected = task_arithmetic(states([files["base"]])[0], states(fts), coefficients)
    for k, v in expected.items():
        assert torch.equal(merge.backbone.state_dict()[k], v), k
    for k in range(2):  # re-scored on each task's dataloader, as the validation epoch scores it
        assert merge.map_scores[k] == pytest.approx(metrics[k][f"val/acc/dataloader_idx_{k}"], abs=1e-6)
    assert merge.merged_score == pytest.approx(sum(merge.map_scores) / 2)
    # the interpolation path pools every validation dataloader: at t = 0 the first fine-tune
    sizes = [len(loader.dataset) for loader in merge.trainer.val_dataloaders]
    per_task = [merge.evaluate_loss_and_accuracy(merge.ingredients[0], k)[1] for k in range(2)]
    pooled = sum(a * n for a, n in zip(per_task, sizes)) / sum(sizes)
    assert merge.interpolation_path(points=2)["naive"]["accuracy"][0] == pytest.approx(pooled, abs=1e-12)
    if logger == "tensorboard":
        scalars = read_scalars(tmp_path / "m" / "0")
        assert [v for _, v in scalars["merge/map_coefficient"]] == pytest.approx(coefficients)
        assert [v for _, v in scalars["merge/map_acc"]] == pytest.approx(merge.map_scores)
        events = EventAccumulator(str(tmp_path / "m" / "0"))
        events.Reload()
        assert events.Tags()["images"] == ["merge/interpolation", "merge/pareto"]
        image = events.Images("merge/pareto")[0]
        assert image.width > 100 and image.height > 100
    if logger == "csv":
        assert "merge/map_coefficient" in (tmp_path / "m" / "0" / "metrics.csv").read_text()


def test_map_loads_the_best_evaluated_merge_when_the_predicted_front_measures_worse(files, tmp_path, monkeypatch):
    import dataclasses

    from harness import fast_trainer

    import litplug.modules.merge as merge_module

    real = merge_module.map_pareto_front

    def far_off(evaluate, num_tasks, **kwargs):  # surrogates that predict a far extrapolation as best
        result = real(evaluate, num_tasks, **kwargs)
        return dataclasses.replace(
            result, coefficients=torch.full((1, num_tasks), 25.0), values=torch.ones(1, num_tasks)
        )

    monkeypatch.setattr(merge_module, "map_pareto_front", far_off)
    fts = files["finetunes"][:2]
    merge = ModelMerge(mlp(0), fts, recipe="map", base=files["base"], output_path=None)
    fast_trainer(tmp_path).validate(merge, DigitsTasks(batch_size=64), verbose=False)
    result = merge.map_result
    best = int(result.evaluated_values.mean(1).argmax())
    assert not merge.map_from_front
    assert merge.map_coefficients == result.evaluated[best].tolist()
    assert merge.merged_score == pytest.approx(float(result.evaluated_values[best].mean()))
    expected = task_arithmetic(states([files["base"]])[0], states(fts), merge.map_coefficients)
    for k, v in expected.items():
        assert torch.equal(merge.backbone.state_dict()[k], v), k


def test_map_refuses_a_datamodule_without_one_validation_dataloader_per_fine_tune(files, tmp_path):
    from harness import fast_trainer

    merge = ModelMerge(mlp(0), files["finetunes"], recipe="map", base=files["base"], output_path=None)
    with pytest.raises(ValueError, match=r"`checkpoints` holds 3 fine-tunes but the datamodule has 2 validation"):
        fast_trainer(tmp_path).validate(merge, DigitsTasks(batch_size=64), verbose=False)
