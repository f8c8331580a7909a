"""The `litplug` command reports errors in the user's input in a few lines, exit status 2."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from litplug.cli import main

ROOT = Path(__file__).resolve().parents[1]
CLASSIFIER = str(ROOT / "configs" / "digits" / "classifier.yaml")
HINT = "(add --debug or set LITPLUG_DEBUG=1 for the full traceback)"


def usage_error(capsys, *args: str) -> str:
    """stderr of ``litplug fit --config classifier.yaml *args``, which must exit with status 2."""
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", CLASSIFIER, *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[0].startswith("litplug: error: ") and lines[-1] == HINT and len(lines) <= 4, err
    return err


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LITPLUG_DEBUG", raising=False)


def test_bad_value_names_the_class_argument_and_range(capsys):
    err = usage_error(capsys, "--trainer.callbacks+=EMA", "--trainer.callbacks.decay=1.5")
    assert "EMA: `decay` must be in (0, 1), got 1.5" in err and "Traceback" not in err


def test_bad_type_names_the_argument(capsys):
    err = usage_error(capsys, "--trainer.callbacks+=EMA", "--trainer.callbacks.decay=abc")
    assert "EMA: `decay`: expected float, got 'abc'" in err


def test_unknown_class_suggests_the_closest_names(capsys):
    assert "unknown class 'EMAA'; did you mean EMA?" in usage_error(capsys, "--trainer.callbacks+=EMAA")
    assert "did you mean SWA" in usage_error(capsys, "--trainer.callbacks+=SWa")
    assert "did you mean Digits?" in usage_error(capsys, "--data=Digit")


def test_yaml_error_names_the_file_and_line(tmp_path, capsys):
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text("trainer:\n  max_epochs: 1\n")
    bad.write_text("trainer:\n  max_epochs: 1\n  callbacks: [\n    - EMA\n")
    err = usage_error(capsys, "--config", str(good), "--config", str(bad))
    assert f"--config {bad}, line 4, column 5: YAML syntax error" in err


def test_missing_config_file(capsys):
    assert "--config nowhere.yaml: no such file" in usage_error(capsys, "--config", "nowhere.yaml")
    err = usage_error(capsys, "--config", "configs/digits/clasifier.yaml")  # not here, not shipped: a typo
    assert "no such file" in err and "did you mean configs/digits/classifier.yaml?" in err


def test_missing_and_truncated_checkpoints_name_the_file(tmp_path, capsys):
    assert "--ckpt_path nowhere.ckpt: no such file" in usage_error(capsys, "--ckpt_path", "nowhere.ckpt")
    fast = [
        "--trainer.max_steps=2",
        "--trainer.limit_val_batches=0",
        "--trainer.enable_progress_bar=false",
        "--test_after_fit=false",
    ]
    main(["fit", "--config", CLASSIFIER, *fast])
    (ckpt,) = (tmp_path / "runs").rglob("*.ckpt")
    torch.load(ckpt, weights_only=False)  # a real, complete checkpoint
    capsys.readouterr()
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])
    err = usage_error(capsys, *fast, "--ckpt_path", str(ckpt))
    assert f"--ckpt_path {ckpt}: not a complete checkpoint" in err


def test_errors_inside_training_keep_their_traceback(capsys):
    # SWA checks `start` against max_epochs at setup, inside Trainer.fit: not an input error.
    with pytest.raises(ValueError, match="beyond the last epoch"):
        main(
            [
                "fit",
                "--config",
                CLASSIFIER,
                "--trainer.max_epochs=1",
                "--trainer.callbacks+=SWA",
                "--trainer.callbacks.start=3",
            ]
        )


def test_debug_flag_raises_the_original_error(monkeypatch):
    with pytest.raises(ValueError, match="`decay` must be in"):
        main(["fit", "--config", CLASSIFIER, "--debug", "--trainer.callbacks+=EMA", "--trainer.callbacks.decay=1.5"])
    monkeypatch.setenv("LITPLUG_DEBUG", "1")
    with pytest.raises(ValueError, match="`decay` must be in"):
        main(["fit", "--config", CLASSIFIER, "--trainer.callbacks+=EMA", "--trainer.callbacks.decay=1.5"])


def test_console_exit_status_and_stderr(tmp_path):
    args = [
        sys.executable,
        "-m",
        "litplug",
        "fit",
        "--config",
        CLASSIFIER,
        "--trainer.callbacks+=EMA",
        "--trainer.callbacks.decay=1.5",
    ]
    env = {k: v for k, v in os.environ.items() if k != "LITPLUG_DEBUG"}
    proc = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if not line.startswith("Seed set to")]  # Lightning's seed log
    assert lines == ["litplug: error: EMA: `decay` must be in (0, 1), got 1.5", HINT]
