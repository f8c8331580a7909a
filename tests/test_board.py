"""TensorBoard output: layout, figures and hparams, read back from the event files with
TensorBoard's own readers; ``litplug compare`` over a folder of real runs."""

from __future__ import annotations

import importlib
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard import context as tb_context
from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.plugins import base_plugin
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.hparams import api_pb2, backend_context, get_experiment, list_session_groups, metadata

from litplug import board
from litplug.board import flatten_config
from litplug.callbacks import SharpnessMonitor
from litplug.cli import main
from litplug.compare import compare, format_table, read_run
from litplug.datamodules import Digits
from litplug.figures import bar_chart, greedy_chart, histograms, line_chart, to_image
from litplug.modules import MLP, Classifier

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = [
    "--trainer.max_epochs=2",
    "--trainer.limit_train_batches=3",
    "--trainer.limit_val_batches=2",
    "--trainer.limit_test_batches=2",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--model.backbone.init_args.hidden=[32]",
]


def fit(*configs: str, extra: tuple[str, ...] = ()) -> None:
    args = ["fit"]
    for c in configs:
        args += ["--config", str(CONFIGS / c)]
    main([*args, *TINY, *extra])


def accumulator(path: Path) -> EventAccumulator:
    acc = EventAccumulator(str(path))
    acc.Reload()
    return acc


def count_tag(folder: Path, tag: str) -> int:
    return sum(
        1
        for f in folder.glob("*tfevents*")
        for e in EventFileLoader(str(f)).Load()
        if e.HasField("summary") and any(v.tag == tag for v in e.summary.value)
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three real `litplug fit` runs with different configs in one folder (the first with EMA,
    SAM, the sharpness monitor and early stopping), then the first resumed into its own folder."""
    work = tmp_path_factory.mktemp("board")
    mp = pytest.MonkeyPatch()
    mp.chdir(work)
    try:
        notebook = ("callbacks/ema.yaml", "callbacks/sam.yaml", "callbacks/sharpness_monitor.yaml")
        fit("digits/classifier.yaml", *notebook, "callbacks/early_stopping.yaml")
        fit("digits/classifier.yaml", extra=("--model.optimizer.init_args.lr=0.01",))
        fit("digits/classifier.yaml", "callbacks/swa.yaml")
        first = work / "runs" / "litplug" / "version_0"
        ckpt = next((first / "checkpoints").glob("*.ckpt"))
        fit(
            "digits/classifier.yaml",
            *notebook,
            "callbacks/early_stopping.yaml",
            extra=("--trainer.max_epochs=3", "--trainer.logger.init_args.version=0", f"--ckpt_path={ckpt}"),
        )
    finally:
        mp.undo()
    return work / "runs" / "litplug"


def test_ema_sam_monitor_run_writes_layout_image_and_hparams(runs):
    acc = accumulator(runs / "version_0")
    layout = layout_pb2.Layout()
    layout.ParseFromString(acc.Tensors(board.LAYOUT_TAG)[-1].tensor_proto.string_val[0])
    sections = {c.title: [ch.title for ch in c.chart] for c in layout.category}
    assert list(sections) == ["training", "averaging", "sam", "sharpness"]
    sam_chart = next(ch for c in layout.category if c.title == "sam" for ch in c.chart)
    assert list(sam_chart.multiline.tag) == ["^train/loss$", "^sam/loss_increase$"]

    assert acc.Tags()["images"] == ["sharpness/layers"]
    image = acc.Images("sharpness/layers")[0]
    assert image.width > 100 and image.height > 100 and image.encoded_image_string[:4] == b"\x89PNG"

    start = metadata.parse_session_start_info_plugin_data(
        acc.PluginTagToContent(metadata.PLUGIN_NAME)[metadata.SESSION_START_INFO_TAG]
    )
    hparams = {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()}
    assert hparams["trainer.callbacks"] == "EMA+SAM+SharpnessMonitor+EarlyStopping"
    assert hparams["trainer.callbacks.EMA.warmup"] is True  # a bool stays a bool
    assert hparams["model.backbone.hidden"] == "[32]"
    assert "model.optimizer.lr" not in hparams  # 0.001 is Adam's default
    # metric values: the best monitored value (EarlyStopping's val/loss) and the final test metrics
    assert {"best/val/loss", "test/acc", "val/acc"} <= set(acc.Tags()["scalars"])
    best = min(e.value for e in acc.Scalars("val/loss"))
    assert acc.Scalars("best/val/loss")[-1].value == pytest.approx(best)


def test_resumed_run_writes_layout_and_hparams_once(runs):
    folder = runs / "version_0"
    assert len(list(folder.glob("*tfevents*"))) >= 2  # the resumed run appended to the same folder
    assert count_tag(folder, board.LAYOUT_TAG) == 1
    assert count_tag(folder, metadata.SESSION_START_INFO_TAG) == 1
    assert count_tag(folder, "sharpness/layers") == 2  # one figure per fit


def test_compare_prints_the_differing_keys(runs, capsys):
    columns, rows = compare(runs.parent)
    assert [r[0] for r in rows] == ["litplug/version_0", "litplug/version_1", "litplug/version_2"]
    keys = columns[1 : columns.index("test/acc")]
    assert "model.optimizer.lr" in keys and "trainer.callbacks" in keys
    assert "model.backbone.hidden" not in keys  # the same in every run
    table = dict(zip(columns, zip(*rows)))
    assert table["trainer.callbacks"] == ("EMA+SAM+SharpnessMonitor+EarlyStopping", "", "SWA")
    assert table["model.optimizer.lr"] == ("", 0.01, "")
    assert table["test/acc"][1] == pytest.approx(read_run(runs / "version_1").metrics["test/acc"])

    with pytest.raises(SystemExit) as done:
        main(["compare", str(runs.parent), "--markdown", str(runs / "t.md"), "--csv", str(runs / "t.csv")])
    assert done.value.code == 0
    printed = capsys.readouterr().out
    assert printed.strip() == format_table(columns, rows)
    assert (runs / "t.md").read_text().splitlines()[0].startswith("| run | ")
    assert (runs / "t.csv").read_text().splitlines()[2].startswith("litplug/version_1,0.01,")


def test_compare_refuses_a_folder_without_runs(tmp_path, capsys):
    with pytest.raises(SystemExit) as done:
        main(["compare", str(tmp_path)])
    assert done.value.code == 2
    assert "no TensorBoard event files" in capsys.readouterr().err


def _monitor_fit(logger, tmp_path, hparams=None) -> Trainer:
    model = Classifier(MLP(input_shape=[1, 8, 8], num_outputs=10, hidden=[16]), num_classes=10)
    trainer = Trainer(
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=1,
        logger=logger,
        callbacks=[SharpnessMonitor()],
        enable_progress_bar=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    if hparams is not None:
        board.write_hparams(trainer, hparams)
    trainer.fit(model, Digits(batch_size=16))
    return trainer


@pytest.mark.parametrize("logger", ["none", "csv"])
def test_without_tensorboard_figures_are_skipped_with_one_line(logger, tmp_path, caplog):
    chosen = False if logger == "none" else CSVLogger(tmp_path)
    with caplog.at_level(logging.INFO):
        trainer = _monitor_fit(chosen, tmp_path)
        drawn = []
        assert not board.log_figure(trainer, "another/figure", lambda: drawn.append(1))  # a second figure
    assert drawn == []  # nothing rendered without a writer
    lines = [r.getMessage() for r in caplog.records if "figures skipped" in r.getMessage()]
    expected = "logger=False" if logger == "none" else "CSVLogger"
    assert len(lines) == 1 and expected in lines[0]


def test_python_api_run_writes_the_layout_once_and_hparams_when_asked(tmp_path):
    trainer = _monitor_fit(TensorBoardLogger(tmp_path, name="", version=0), tmp_path, {"lr": 1e-3, "sam": True})
    folder = Path(trainer.logger.log_dir)
    assert count_tag(folder, board.LAYOUT_TAG) == 1
    assert count_tag(folder, "sharpness/layers") == 1
    assert session_hparams(accumulator(folder)) == {"lr": 1e-3, "sam": True}


def test_flatten_config_lists_callbacks_and_drops_defaults():
    config = {
        "config": ["a.yaml"],
        "seed_everything": 0,
        "trainer": {
            "max_epochs": 5,
            "callbacks": [
                {"class_path": "litplug.callbacks.EMA", "init_args": {"decay": 0.99, "warmup": False}},
                {"class_path": "litplug.callbacks.EMA", "init_args": {"decay": 0.9, "warmup": False}},
            ],
            "logger": {"class_path": "a.b.Logger", "init_args": {"save_dir": "runs"}},
        },
        "model": {"class_path": "torch.nn.Linear", "init_args": {"in_features": 3, "out_features": 1, "bias": False}},
    }
    defaults = {
        "seed_everything": True,
        "trainer": {"max_epochs": None, "callbacks": None, "logger": {"class_path": "a.b.Logger", "init_args": {}}},
    }
    assert flatten_config(config, defaults) == {
        "seed_everything": 0,
        "trainer.max_epochs": 5,
        "trainer.callbacks": "EMA+EMA",
        "trainer.callbacks.EMA.decay": 0.99,
        "trainer.callbacks.EMA#2.decay": 0.9,
        "trainer.logger.save_dir": "runs",
        "model": "Linear",
        "model.in_features": 3,
        "model.out_features": 1,
        "model.bias": False,
    }


def test_figures_render_off_screen():
    bars = to_image(bar_chart({"a": {"fc1": 0.1, "fc2": float("nan")}, "b": {"fc1": -0.2}}, "t", "y"))
    lines = to_image(line_chart([0.0, 0.5, 1.0], {"naive": [1, 2, 1]}, "t", "alpha", "loss", marks={"m": (0.5, 2)}))
    hist = to_image(histograms({"forget": np.random.rand(50), "test": []}, "t", "loss"))
    marked = to_image(histograms({"dataset": np.random.rand(50)}, "t", "score", lines={"best found": 0.9}))
    trials = to_image(greedy_chart([("a", 0.9, 0.9, True), ("b", 0.8, 0.95, True), ("c", 0.5, 0.7, False)], "t", "acc"))
    for image in (bars, lines, hist, marked, trials):
        assert image.dtype == np.uint8 and image.shape == (256, 440, 3)
        assert image.std() > 0  # something drawn
    with pytest.raises(ValueError, match="series 'naive' has 2 values for 3 x positions"):
        line_chart([0.0, 0.5, 1.0], {"naive": [1, 2]}, "t", "alpha", "loss")


QUICK = [
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=1",
    "--trainer.limit_test_batches=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


def test_certified_config_writes_its_figures(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    small = ["--model.backbone.init_args.channels=[4, 8]", "--model.backbone.init_args.hidden=16"]
    main(["fit", "--config", str(CONFIGS / "digits" / "ibp.yaml"), *QUICK, "--trainer.max_epochs=2", *small])
    acc = accumulator(tmp_path / "runs" / "litplug" / "version_0")
    expected = ["certified/layer_bound_width", "certified/layer_unstable_relu", "certified/verified_vs_eps"]
    assert sorted(acc.Tags()["images"]) == expected
    layout = layout_pb2.Layout()
    layout.ParseFromString(acc.Tensors(board.LAYOUT_TAG)[-1].tensor_proto.string_val[0])
    assert [c.title for c in layout.category] == ["training", "certified"]
    charts = [ch.title for c in layout.category for ch in c.chart]
    assert "warmup regularizer weight and eps" in charts  # IBPWarmup's chart joins the module's section


def test_certified_bound_profile_values():
    from litplug.modules import CertifiedClassifier

    model = CertifiedClassifier(MLP(input_shape=[1, 8, 8], num_outputs=10, hidden=[16, 16]), eps=0.1)
    model.normalization = {"mean": (0.0,), "std": (1.0,), "pixel_range": (0.0, 1.0)}
    Trainer(logger=False, enable_progress_bar=False).strategy.connect(model)
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    model.trainer = Trainer(logger=False, enable_progress_bar=False, max_epochs=0)
    profile = model.bound_profile(x, y)
    assert list(profile["bound_width"]) == ["relu 1", "relu 2"]
    assert profile["verified_acc"][0] == pytest.approx(float((model(x).argmax(1) == y).float().mean()))  # eps 0
    assert all(a >= b for a, b in zip(profile["verified_acc"], profile["verified_acc"][1:]))  # nested boxes
    assert all(0.0 <= f <= 1.0 for f in profile["unstable_relu"].values())


def test_unlearning_configs_write_their_figures(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    unlearning = CONFIGS / "digits" / "unlearning"
    main(["fit", "--config", str(unlearning / "original.yaml"), *QUICK, "--test_after_fit=false"])
    method = [
        "--config",
        str(unlearning / "class.yaml"),
        "--config",
        str(unlearning / "methods/random_label_saliency.yaml"),
    ]
    main(["fit", *method, *QUICK, "--test_after_fit=false"])
    acc = accumulator(tmp_path / "runs" / "litplug" / "version_1")
    assert sorted(acc.Tags()["images"]) == ["unlearn/mask_layers", "unlearn/sample_loss"]
    layout = layout_pb2.Layout()
    layout.ParseFromString(acc.Tensors(board.LAYOUT_TAG)[-1].tensor_proto.string_val[0])
    assert [c.title for c in layout.category] == ["unlearning"]


def ddp_monitor_worker(strategy, tmp_dir):
    model = Classifier(MLP(input_shape=[1, 8, 8], num_outputs=10, hidden=[16]), num_classes=10)
    monitor = SharpnessMonitor()
    trainer = Trainer(
        strategy=strategy,
        accelerator="cpu",
        devices=2,
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=1,
        logger=TensorBoardLogger(tmp_dir, name="", version=0),
        callbacks=[monitor],
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(model, Digits(batch_size=16))
    local = {k: float(v) for k, v in monitor.measure(model).items()}  # this rank's own held batch
    reduced = {k[len("sharpness/") :]: float(v) for k, v in trainer.callback_metrics.items() if "sharpness/" in k}
    return {"local": local, "reduced": reduced, "writer": board.summary_writer(trainer) is not None}


def test_ddp_rank_zero_writes_the_reduced_values_once(tmp_path):
    from harness import run_distributed

    r0, r1 = run_distributed(ddp_monitor_worker, "ddp", tmp_path)
    assert (r0["writer"], r1["writer"]) == (True, False)
    folder = next(p.parent for p in tmp_path.rglob("*tfevents*"))
    assert len(list(tmp_path.rglob("*tfevents*"))) == 1  # rank 1 wrote no event file
    assert count_tag(folder, board.LAYOUT_TAG) == 1 and count_tag(folder, "sharpness/layers") == 1
    # the bars are the logged values: the mean of the ranks' own measurements
    for key, value in r0["reduced"].items():
        assert value == pytest.approx((r0["local"][key] + r1["local"][key]) / 2, rel=1e-4, abs=1e-6)


def session_hparams(acc: EventAccumulator) -> dict:
    start = metadata.parse_session_start_info_plugin_data(
        acc.PluginTagToContent(metadata.PLUGIN_NAME)[metadata.SESSION_START_INFO_TAG]
    )
    return {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()}


@pytest.mark.parametrize("subcommand", ["validate", "test", "predict"])
def test_every_subcommand_writes_hparams(subcommand, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    limits = ["--trainer.limit_val_batches=1", "--trainer.limit_test_batches=1", "--trainer.limit_predict_batches=1"]
    quiet = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
    args = ["--config", str(CONFIGS / "digits" / "classifier.yaml"), "--model.backbone.init_args.hidden=[8]"]
    main([subcommand, *args, *limits, *quiet])
    acc = accumulator(tmp_path / "runs" / "litplug" / "version_0")
    hparams = session_hparams(acc)
    assert hparams["subcommand"] == subcommand
    assert hparams["model.backbone.hidden"] == "[8]"
    assert count_tag(tmp_path / "runs" / "litplug" / "version_0", metadata.SESSION_START_INFO_TAG) == 1


def layout_of(acc: EventAccumulator) -> dict[str, list[str]]:
    layout = layout_pb2.Layout()
    layout.ParseFromString(acc.Tensors(board.LAYOUT_TAG)[-1].tensor_proto.string_val[0])
    return {c.title: [ch.title for ch in c.chart] for c in layout.category}


def tensorboard(tmp_path: Path) -> TensorBoardLogger:
    return TensorBoardLogger(tmp_path, name="", version=0)


def test_offline_search_writes_the_designs_figure_and_section(tmp_path):
    from harness import fast_trainer

    from litplug.callbacks import GradientAscentSearch
    from litplug.datamodules import OfflineDesigns
    from litplug.modules import Regressor

    search = GradientAscentSearch(num_designs=16, steps=3)
    trainer = fast_trainer(tmp_path, limit_train_batches=2, limit_val_batches=1, logger=tensorboard(tmp_path))
    trainer.callbacks.append(search)
    dm = OfflineDesigns("sphere", dim=4, num_samples=200, batch_size=32)
    trainer.fit(Regressor(MLP(input_shape=[4], num_outputs=1, hidden=[8])), dm)
    acc = accumulator(Path(trainer.logger.log_dir))
    assert acc.Tags()["images"] == ["offline/designs"]
    assert acc.Images("offline/designs")[0].step == trainer.global_step
    assert "search: normalised true scores of the designs" in layout_of(acc)["offline"]


def _ingredients(tmp_path: Path, n: int = 3) -> list[str]:
    paths = []
    for seed in range(n):
        torch.manual_seed(seed)
        paths.append(str(tmp_path / f"seed_{seed}" / "last.pt"))
        Path(paths[-1]).parent.mkdir()
        torch.save(MLP(input_shape=[1, 8, 8], num_outputs=10, hidden=[8]).state_dict(), paths[-1])
    return paths


@pytest.mark.parametrize("module", ["ModelSoup", "ModelMerge"])
def test_greedy_soups_write_their_trials_figure(module, tmp_path):
    from harness import fast_trainer

    from litplug.modules import ModelMerge, ModelSoup

    cls, tag, section = {
        "ModelSoup": (ModelSoup, "soup/greedy", "averaging"),
        "ModelMerge": (ModelMerge, "merge/greedy", "merging"),
    }[module]
    paths = _ingredients(tmp_path)
    model = cls(MLP(input_shape=[1, 8, 8], num_outputs=10, hidden=[8]), paths, recipe="greedy", output_path=None)
    trainer = fast_trainer(tmp_path, limit_val_batches=2, logger=tensorboard(tmp_path))
    trainer.validate(model, Digits(batch_size=64))
    # one trial per ingredient, best first; the kept ones are the soup's
    assert sorted(i for i, _, _ in model.trials) == [0, 1, 2] and model.trials[0][2]
    assert [i for i, _, kept in model.trials if kept] == model.kept
    acc = accumulator(Path(trainer.logger.log_dir))
    assert tag in acc.Tags()["images"]
    assert list(layout_of(acc)) == [section]


def test_checkpoint_soup_writes_its_trials_figure_and_nothing_breaks_with_csv(tmp_path):
    from harness import fast_trainer

    from litplug.callbacks import CheckpointSoup, WiSEFT

    for logger in (tensorboard(tmp_path), CSVLogger(tmp_path)):
        model = Classifier(MLP(input_shape=[1, 8, 8], num_outputs=10, hidden=[8]), num_classes=10)
        trainer = fast_trainer(
            tmp_path, max_epochs=3, limit_train_batches=2, limit_val_batches=1, logger=logger,
            callbacks=[CheckpointSoup(k=3), WiSEFT(alpha=[0.5, 1.0])],
        )  # fmt: skip
        trainer.fit(model, Digits(batch_size=32))
    acc = accumulator(tmp_path / "version_0")
    assert acc.Tags()["images"] == ["soup/greedy"]
    charts = layout_of(acc)["merging"]
    assert charts == [
        "checkpoint soup: validation loss of the snapshots and the soups",
        "WiSE-FT: validation loss against 1000 alpha",
    ]


# ----------------------------------------------------------------------------- a module's own hparams
USER_MODULES = """
import torch
from lightning.pytorch import LightningDataModule, LightningModule
from torch.utils.data import DataLoader, TensorDataset


class Net(LightningModule):
    def __init__(self, hidden: int = 4, lr: float = 0.1, sizes: list = [1, 2], tag: str = "x"):
        super().__init__()
        self.save_hyperparameters()
        self.save_hyperparameters({**self.hparams, "width": 2 * hidden})  # one not in the signature
        self.layer = torch.nn.Linear(8, 3)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.layer(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", torch.nn.functional.cross_entropy(self.layer(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


class Data(LightningDataModule):
    def __init__(self, size: int = 16, batch_size: int = 8, logged: bool = True):
        super().__init__()
        self.save_hyperparameters(logger=logged)
        g = torch.Generator().manual_seed(0)
        self.data = TensorDataset(torch.randn(size, 8, generator=g), torch.randint(0, 3, (size,), generator=g))

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=self.hparams.batch_size)

    def val_dataloader(self):
        return DataLoader(self.data, batch_size=self.hparams.batch_size)
"""
SHORT = dict(max_epochs=1, limit_train_batches=2, limit_val_batches=1, enable_progress_bar=False)


def user_modules(folder: Path, monkeypatch) -> object:
    (folder / "hparams_user.py").write_text(USER_MODULES)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delitem(sys.modules, "hparams_user", raising=False)
    return importlib.import_module("hparams_user")


def hparams_table(logdir: Path) -> tuple[list[str], list[str], dict[str, dict]]:
    """What TensorBoard's HPARAMS dashboard shows for ``logdir``, by the hparams plugin's own
    request handlers: ``(hparam columns, metric columns, {session: {column: value}})``."""
    mux = plugin_event_multiplexer.EventMultiplexer()
    mux.AddRunsFromDirectory(str(logdir))
    mux.Reload()
    provider = data_provider.MultiplexerDataProvider(mux, str(logdir))
    backend = backend_context.Context(base_plugin.TBContext(logdir=str(logdir), data_provider=provider))
    request = tb_context.RequestContext()
    experiment = get_experiment.Handler(request, backend, "", api_pb2.GetExperimentRequest()).run()
    columns = [h.name for h in experiment.hparam_infos]
    query = api_pb2.ListSessionGroupsRequest(slice_size=100, allowed_statuses=list(api_pb2.Status.values()))
    for name in columns:
        query.col_params.add(hparam=name)
    for metric in experiment.metric_infos:
        query.col_params.add(metric=metric.name)
    groups = list_session_groups.Handler(request, backend, "", query).run().session_groups
    rows = {
        g.name: {
            **{k: getattr(v, v.WhichOneof("kind")) for k, v in g.hparams.items()},
            **{m.name.tag: m.value for m in g.metric_values},
        }
        for g in groups
    }
    return columns, [m.name.tag for m in experiment.metric_infos], rows


def test_cli_run_of_a_module_saving_hparams_has_one_session(tmp_path, monkeypatch):
    """The module and datamodule call save_hyperparameters(): TensorBoard's HPARAMS table shows
    litplug's config keys and their saved hyper-parameters in one row per run, the metrics as
    columns; hparams.yaml and the checkpoint keep Lightning's full hparams."""
    user = user_modules(tmp_path, monkeypatch)
    monkeypatch.chdir(tmp_path)
    short = [f"--trainer.{k}={v}" for k, v in SHORT.items()]
    for hidden in (7, 4):
        main(["fit", "--model=hparams_user.Net", f"--model.hidden={hidden}", "--data=hparams_user.Data", *short])
    runs = tmp_path / "runs" / "litplug"
    for folder in runs.iterdir():
        assert count_tag(folder, metadata.SESSION_START_INFO_TAG) == 1
        assert count_tag(folder, metadata.EXPERIMENT_TAG) == 0
        assert "hp_metric" not in accumulator(folder).Tags()["scalars"]

    columns, metrics, rows = hparams_table(runs)
    assert {"model", "model.hidden", "model.width", "data", "trainer.max_epochs"} <= set(columns)
    assert "val/loss" in metrics and "hp_metric" not in metrics
    first, second = rows["version_0"], rows["version_1"]
    assert (first["model.hidden"], first["model.width"], first["model"]) == (7, 14, "Net")
    assert "model.hidden" not in second and second["model.width"] == 8  # hidden=4 is the default, width is not
    assert first["val/loss"] == pytest.approx(accumulator(runs / "version_0").Scalars("val/loss")[-1].value)

    keys, table = compare(runs)
    assert keys == ["run", "model.hidden", "model.width", "val/loss"]
    assert [row[:3] for row in table] == [["version_0", 7, 14], ["version_1", "", 8]]

    saved = yaml.safe_load((runs / "version_0" / "hparams.yaml").read_text())
    assert {k: saved[k] for k in ("hidden", "width", "lr", "sizes", "size", "batch_size")} == {
        "hidden": 7,
        "width": 14,
        "lr": 0.1,
        "sizes": [1, 2],
        "size": 16,
        "batch_size": 8,
    }
    ckpt = next((runs / "version_0" / "checkpoints").glob("*.ckpt"))
    assert user.Net.load_from_checkpoint(ckpt).hparams.width == 14


def test_python_api_session_holds_the_saved_hparams_once(tmp_path, monkeypatch):
    """write_hparams with the model and datamodule: one session per folder, resumed runs included;
    a datamodule's save_hyperparameters(logger=False) stays out of it."""
    user = user_modules(tmp_path, monkeypatch)
    for _ in range(2):  # the second run logs into the same folder (a new event file)
        trainer = Trainer(logger=TensorBoardLogger(tmp_path, name="", version=0), enable_checkpointing=False, **SHORT)
        model, data = user.Net(hidden=5, tag="y"), user.Data(size=8, logged=False)
        board.write_hparams(trainer, {"lr": 1e-3, "model.hidden": 0}, model, data)
        trainer.fit(model, data)
    folder = Path(trainer.logger.log_dir)
    assert len(list(folder.glob("*tfevents*"))) == 2 and len(accumulator(folder).Scalars("val/loss")) == 2
    assert count_tag(folder, metadata.SESSION_START_INFO_TAG) == 1
    assert count_tag(folder, metadata.EXPERIMENT_TAG) == 0
    hparams = session_hparams(accumulator(folder))
    assert hparams == {"lr": 1e-3, "model.hidden": 5, "model.width": 10, "model.tag": "y"}
    assert yaml.safe_load((folder / "hparams.yaml").read_text())["width"] == 10
