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


def test_bad_type_names_the_class_the_argument_and_the_value(capsys):
    err = usage_error(capsys, "--trainer.callbacks+=EMA", "--trainer.callbacks.decay=abc")
    assert "--trainer.callbacks.decay: EMA: `decay` cannot be 'abc' (expected float)" in err
    err = usage_error(capsys, "--trainer.callbacks+=EMA", "--trainer.callbacks.decai=0.9")
    assert "EMA has no argument `decai`; did you mean decay?" in err


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
    # SWA checks `start_epoch` against max_epochs at setup, inside Trainer.fit: not an input error.
    with pytest.raises(ValueError, match="beyond the last epoch"):
        main(
            [
                "fit",
                "--config",
                CLASSIFIER,
                "--trainer.max_epochs=1",
                "--trainer.callbacks+=SWA",
                "--trainer.callbacks.start_epoch=3",
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


def test_class_path_typo_in_a_config_file_gets_did_you_mean(tmp_path, capsys):
    config = tmp_path / "mine.yaml"
    config.write_text("trainer:\n  callbacks:\n    - class_path: SharpnesMonitor\n")
    err = usage_error(capsys, "--config", str(config))
    assert f"--config {config}: trainer.callbacks[0].class_path: unknown class 'SharpnesMonitor'" in err
    assert "did you mean SharpnessMonitor?" in err


def test_help_says_what_litplug_is(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "research training methods" in out and "PyTorch Lightning plugins" in out
    assert "the working directory is on the import path" in out


def test_callback_help_shows_whole_sentences(capsys):
    """``--trainer.callbacks.help X`` prints the first line of X's docstring: a whole sentence."""
    import inspect

    import litplug.callbacks
    import litplug.datamodules
    import litplug.modules

    for package in (litplug.callbacks, litplug.modules, litplug.datamodules):
        for name in package.__all__:
            obj = getattr(package, name)
            if inspect.isclass(obj):
                first = (inspect.getdoc(obj) or "").splitlines()[0]
                assert first.endswith("."), f"{name}: {first!r}"
    with pytest.raises(SystemExit):
        main(["fit", "--trainer.callbacks.help", "SAM"])
    assert "Sharpness-aware minimization as a callback (SAM, adaptive SAM, gradient-norm penalty)" in (
        capsys.readouterr().out
    )


USER_MODULES = """
import torch
from lightning.pytorch import LightningModule


class Net(LightningModule):
    def __init__(self, hidden: int = 4):
        super().__init__()
        self.save_hyperparameters()
        self.layer = torch.nn.Linear(64, 10)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.layer(x.flatten(1)), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Other(Net):
    def __init__(self, width: int = 3):
        super().__init__()
"""


def _without_working_directory(monkeypatch, tmp_path):
    """sys.path as the console script sees it: no entry for the working directory."""
    here = {"", ".", str(tmp_path), os.getcwd()}
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in here])


def test_working_directory_is_on_the_import_path_and_import_errors_say_where(tmp_path, monkeypatch, capsys):
    (tmp_path / "mymods.py").write_text(USER_MODULES)
    _without_working_directory(monkeypatch, tmp_path)
    fast = ["--trainer.max_steps=1", "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false"]
    main(["fit", "--model=mymods.Net", "--data=Digits", *fast, "--trainer.logger=false", "--test_after_fit=false"])
    capsys.readouterr()
    err = usage_error(capsys, "--model=nowhere.Net")
    assert "cannot import 'nowhere.Net': no module named 'nowhere'" in err
    assert f"looked in the working directory {tmp_path}" in err


def test_checkpoint_of_another_class_names_both_classes(tmp_path, monkeypatch, capsys):
    (tmp_path / "mymods.py").write_text(USER_MODULES)
    _without_working_directory(monkeypatch, tmp_path)
    fast = ["--trainer.max_steps=1", "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false"]
    main(["fit", "--model=mymods.Net", "--data=Digits", *fast, "--test_after_fit=false"])
    (ckpt,) = (tmp_path / "runs").rglob("*.ckpt")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--model=mymods.Other", "--data=Digits", *fast, "--ckpt_path", str(ckpt)])
    assert exc.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    want = f"--ckpt_path {ckpt}: this checkpoint belongs to class mymods.Net, the config builds mymods.Other"
    assert lines[0] == f"litplug: error: {want}"


ERROR_CASES = """
import contextlib, io, sys
from litplug.cli import main

config, bad_yaml, typo = sys.argv[1:4]
cases = [
    (["--trainer.callbacks+=EMA", "--trainer.callbacks.decay=1.5"], ["EMA: `decay` must be in (0, 1), got 1.5"]),
    (["--trainer.callbacks+=EMA", "--trainer.callbacks.decay=abc"], ["EMA: `decay` cannot be 'abc' (expected float)"]),
    (["--trainer.callbacks+=EMAA"], ["unknown class 'EMAA'; did you mean EMA?"]),
    (["--config", bad_yaml], ["line 4, column 5: YAML syntax error"]),
    (["--config", typo], ["unknown class 'SharpnesMonitor'; did you mean SharpnessMonitor?"]),
    (["--nope=1"], ["--nope=1"]),
]
for args, wanted in cases:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            main(["fit", "--config", config, *args])
        except SystemExit as exit:
            assert exit.code == 2, (args, exit.code)
    text = err.getvalue()
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("Seed set")]
    assert lines[0].startswith("litplug: error: ") and len(lines) <= 5, text
    assert all(w in text for w in wanted), (args, text)
print("ok")
"""


def test_error_cases_under_the_oldest_jsonargparse_allowed(tmp_path):
    """The messages above come from structured data, so they hold under every jsonargparse that
    pyproject.toml allows: the oldest is installed beside the newest (the test environment's)."""
    import re

    spec = re.search(r'"jsonargparse\[signatures\]>=([\d.]+)', (ROOT / "pyproject.toml").read_text())
    oldest = spec.group(1)
    target = tmp_path / "oldest"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target)]
    proc = subprocess.run([*pip, f"jsonargparse=={oldest}"], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        pytest.skip(f"no package index to install jsonargparse=={oldest}: {proc.stderr[-300:]}")
    bad, typo = tmp_path / "bad.yaml", tmp_path / "typo.yaml"
    bad.write_text("trainer:\n  max_epochs: 1\n  callbacks: [\n    - EMA\n")
    typo.write_text("trainer:\n  callbacks:\n    - class_path: SharpnesMonitor\n")
    env = {k: v for k, v in os.environ.items() if k != "LITPLUG_DEBUG"}
    env["PYTHONPATH"] = os.pathsep.join([str(target), env.get("PYTHONPATH", "")])
    script = f"import jsonargparse; assert jsonargparse.__version__ == {oldest!r}, jsonargparse.__version__\n"
    args = [sys.executable, "-c", script + ERROR_CASES, CLASSIFIER, str(bad), str(typo)]
    proc = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout[-2000:] + proc.stderr[-4000:]
