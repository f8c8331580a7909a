"""The `litplug` command: main job, fragment composition, saved-config round trip, bad input."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from harness import read_scalars

from litplug.cli import LitplugCLI, main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
# Complete runs whose data or checkpoints must come from elsewhere (MNIST/CIFAR files, soup
# ingredients, a trained original model): parse round trip only. Every other complete config is run.
NEEDS_FILES = ("mnist", "cifar", "soup", "from_checkpoint")
# Complete runs whose task needs an optional extra (BoTorch: `litplug[offline]`): parse round trip
# only where it is not installed.
NEEDS_BOTORCH = tuple(f"offline/{task}.yaml" for task in ("ackley", "rosenbrock", "levy", "hartmann"))
FAST = [
    "--trainer.max_epochs=1",
    "--trainer.max_steps=2",
    "--trainer.limit_val_batches=1",
    "--trainer.limit_test_batches=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--test_after_fit=false",
]


def complete_configs() -> list[Path]:
    return sorted(p for p in CONFIGS.rglob("*.yaml") if "model" in (yaml.safe_load(p.read_text()) or {}))


def _subcommand(config: Path) -> str:
    return "validate" if "soup" in config.name else "fit"


def test_main_job_reaches_95_percent(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(CONFIGS / "digits" / "classifier.yaml"), "--trainer.enable_progress_bar=false"])
    scalars = read_scalars(tmp_path / "runs")
    assert scalars["test/acc"][-1][1] >= 0.95
    assert (tmp_path / "runs" / "litplug" / "version_0" / "config.yaml").exists()


def test_three_fragments_compose(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = [
        "--config", str(CONFIGS / "digits" / "classifier.yaml"),
        "--config", str(CONFIGS / "trainer" / "cpu.yaml"),
        "--config", str(CONFIGS / "callbacks" / "lr_monitor.yaml"),
        "--config", str(CONFIGS / "callbacks" / "early_stopping.yaml"),
    ]  # fmt: skip
    cli = LitplugCLI(args=args, run=False)
    names = [type(c).__name__ for c in cli.trainer.callbacks]
    assert names.index("LearningRateMonitor") < names.index("EarlyStopping")
    assert type(cli.model).__name__ == "Classifier" and type(cli.datamodule).__name__ == "Digits"
    assert cli.trainer.logger.save_dir == "runs"


@pytest.mark.parametrize("config", complete_configs(), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_shipped_config_round_trip(config, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    sub = _subcommand(config)
    name = str(config.relative_to(CONFIGS))
    if any(tag in name for tag in NEEDS_FILES) or (name in NEEDS_BOTORCH and importlib.util.find_spec("botorch") is None):
        with pytest.raises(SystemExit):
            main([sub, "--config", str(config), "--print_config"])
        printed = capsys.readouterr().out
        (tmp_path / "printed.yaml").write_text(printed)
        with pytest.raises(SystemExit):
            main([sub, "--config", str(tmp_path / "printed.yaml"), "--print_config"])
        assert capsys.readouterr().out == printed
        return
    main([sub, "--config", str(config), *FAST])
    saved = tmp_path / "runs" / "litplug" / "version_0" / "config.yaml"
    main([sub, "--config", str(saved)])  # the saved config re-runs unchanged
    resaved = tmp_path / "runs" / "litplug" / "version_1" / "config.yaml"
    assert yaml.safe_load(resaved.read_text()) == yaml.safe_load(saved.read_text())


def _cli_error(capsys, *args):
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(CONFIGS / "digits" / "classifier.yaml"), *args])
    assert exc.value.code != 0
    return capsys.readouterr().err


def test_unknown_class_name(capsys):
    err = _cli_error(capsys, "--data=NoSuchData")
    assert "NoSuchData" in err


def test_wrong_argument_type(capsys):
    err = _cli_error(capsys, "--model.init_args.num_classes=ten")
    assert "num_classes" in err


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--model.init_args.optimizer.init_args.lr=-1"], "lr"),
        (["--model.init_args.num_classes=1"], "num_classes"),
        (["--data.init_args.label_noise=1.0"], "label_noise"),
        (["--data.init_args.label_noise=-0.1"], "label_noise"),
    ],
)
def test_impossible_values_fail_at_construction(args, match, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=match):
        main(["fit", "--config", str(CONFIGS / "digits" / "classifier.yaml"), *args])
    assert not (tmp_path / "runs").exists()  # nothing started


def test_python_dash_m_entry_point():
    proc = subprocess.run([sys.executable, "-m", "litplug", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for sub in ("fit", "validate", "test", "predict"):
        assert sub in proc.stdout
