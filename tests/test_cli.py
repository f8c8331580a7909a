"""The `litplug` command: main job, fragment composition, saved-config round trip, bad input."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from harness import read_scalars

from litplug.cli import LitplugCLI, main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
# A complete run whose data or checkpoints come from elsewhere (MNIST/CIFAR files, soup
# ingredients, a trained original model) says so on a line starting with "# needs:"; it gets a
# parse round trip only. Every other complete config is run, then re-run from its saved config.
NEEDS_MARKER = "# needs:"
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
    """Configs that run on their own: a model with its class and data (the rest are fragments)."""
    configs = []
    for path in sorted(CONFIGS.rglob("*.yaml")):
        config = yaml.safe_load(path.read_text()) or {}
        if "class_path" in (config.get("model") or {}) and "data" in config:
            configs.append(path)
    return configs


def _subcommand(config: Path) -> str:
    return "validate" if "soup" in config.name else "fit"


def test_main_job_reaches_95_percent(tmp_path, monkeypatch):
    """The README's run command (the digits classifier with EMA, SAM and the sharpness monitor)."""
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(CONFIGS / "digits" / "main.yaml"), "--trainer.enable_progress_bar=false"])
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
    if any(line.startswith(NEEDS_MARKER) for line in config.read_text().splitlines()):
        with pytest.raises(SystemExit):
            main([sub, "--config", str(config), "--print_config"])
        printed = capsys.readouterr().out
        (tmp_path / "printed.yaml").write_text(printed)
        with pytest.raises(SystemExit):
            main([sub, "--config", str(tmp_path / "printed.yaml"), "--print_config"])
        assert capsys.readouterr().out == printed
        return
    first = _run_and_read_saved_config(tmp_path, [sub, "--config", str(config), *FAST])
    (tmp_path / "saved.yaml").write_text(first)
    second = _run_and_read_saved_config(tmp_path, [sub, "--config", str(tmp_path / "saved.yaml")])  # unchanged
    assert yaml.safe_load(second) == yaml.safe_load(first)


def _run_and_read_saved_config(root: Path, args: list[str]) -> str:
    main(args)
    # Wherever the config's logger writes (a fixed logger version overwrites the same file).
    newest = max((root / "runs").rglob("config.yaml"), key=lambda p: p.stat().st_mtime_ns)
    return newest.read_text()


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
def test_impossible_values_fail_at_construction(args, match, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(CONFIGS / "digits" / "classifier.yaml"), *args])
    assert exc.value.code == 2 and match in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # nothing started


def test_python_dash_m_entry_point():
    proc = subprocess.run([sys.executable, "-m", "litplug", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for sub in ("fit", "validate", "test", "predict"):
        assert sub in proc.stdout


def test_strategy_fragments_build_their_strategy(tmp_path, monkeypatch):
    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

    monkeypatch.chdir(tmp_path)
    for fragment, kind in (("ddp", DDPStrategy), ("fsdp2", ModelParallelStrategy), ("cpu", type(None))):
        args = [
            "--config",
            str(CONFIGS / "digits" / "classifier.yaml"),
            "--config",
            str(CONFIGS / "trainer" / f"{fragment}.yaml"),
        ]
        trainer = LitplugCLI(args=args, run=False).trainer
        if kind is type(None):
            assert trainer.num_devices == 1
        else:
            assert isinstance(trainer.strategy, kind) and trainer.num_devices == 2


def test_wrapped_datamodule_is_tested_after_fit(tmp_path, monkeypatch):
    """Indexed and NoisyLabels hand on the wrapped datamodule's test loader as an instance attribute."""
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", str(CONFIGS / "digits" / "noisy" / "elr.yaml"), *FAST[:-1]]
    cli = LitplugCLI(args=args)
    assert type(cli.datamodule).__name__ == "Indexed"
    assert "test/acc" in cli.trainer.callback_metrics
