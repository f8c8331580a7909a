"""The package installs as `litplug` only, and CI installs exactly what the README says."""

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Not part of the source tree: local environments, build outputs, run logs.
_NOT_SOURCE = shutil.ignore_patterns(
    ".git",
    ".venv",
    "venv",
    "build",
    "dist",
    "runs",
    "lightning_logs",
    "*.egg-info",
    "__pycache__",
    ".pytest_cache",
    "data",
)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built once from a clean copy of the source tree (no stale ``build/``), offline:
    ``--no-build-isolation`` uses the setuptools of this environment."""
    src, out = tmp_path_factory.mktemp("src") / "litplug", tmp_path_factory.mktemp("wheel")
    shutil.copytree(ROOT, src, ignore=_NOT_SOURCE)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    (built,) = out.glob("litplug-*.whl")
    return built


def test_wheel_holds_only_the_litplug_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"litplug", next(t for t in tops if t.endswith(".dist-info"))}
    for module in (
        "litplug/__init__.py", "litplug/cli.py", "litplug/validation.py", "litplug/protocols.py",
        "litplug/callbacks/__init__.py", "litplug/modules/__init__.py", "litplug/datamodules/__init__.py",
        "litplug/bounds/__init__.py", "litplug/merging/__init__.py", "litplug/configs/digits/classifier.yaml",
    ):  # fmt: skip
        assert module in names
    for package in (
        "bounds",
        "callbacks",
        "datamodules",
        "functional",
        "merging",
        "modules",
    ):  # every source file of each
        for path in (ROOT / package).glob("*.py"):
            assert f"litplug/{package}/{path.name}" in names
    assert not any(n.startswith("litplug/tests/") or n.startswith("litplug/benchmarks/") for n in names)


def test_wheel_ships_every_file_under_configs(wheel):
    shipped = {n[len("litplug/") :] for n in zipfile.ZipFile(wheel).namelist() if n.startswith("litplug/configs/")}
    in_tree = {p.relative_to(ROOT).as_posix() for p in (ROOT / "configs").rglob("*") if p.is_file()}
    assert shipped == in_tree, (
        f"missing from the wheel: {sorted(in_tree - shipped)}; extra: {sorted(shipped - in_tree)}"
    )
    assert "configs/digits/unlearning/methods/npo_rt.yaml" in shipped


MAIN_JOB = "configs/digits/main.yaml"


def test_main_job_runs_from_the_installed_wheel_outside_the_repository(wheel, tmp_path):
    """The README's command for a wheel install: ``litplug fit --config configs/...`` from any
    directory reads the config shipped in the package. The wheel is unpacked onto PYTHONPATH,
    ahead of this environment's editable install of the repository."""
    site, work = tmp_path / "site", tmp_path / "work"
    zipfile.ZipFile(wheel).extractall(site)
    work.mkdir()
    fast = [
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=1",
        "--trainer.limit_test_batches=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
    ]
    code = "import sys, litplug; print(litplug.__file__); from litplug.cli import main; main(sys.argv[1:])"
    env = {**os.environ, "PYTHONPATH": str(site)}
    # The README's run command is this one: the main job, with its plugins.
    assert (
        f"litplug fit --config {MAIN_JOB}"
        in re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)[0]
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, "fit", "--config", MAIN_JOB, *fast],
        cwd=work, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[0] == str(site / "litplug" / "__init__.py")
    assert "test/acc" in proc.stdout
    saved = (work / "runs" / "litplug" / "version_0" / "config.yaml").read_text()
    assert "class_path: litplug.modules.Classifier" in saved
    assert "class_path: litplug.callbacks.EMA" in saved and "class_path: litplug.callbacks.SAM" in saved


def test_imports_from_any_directory(tmp_path):
    code = "import litplug.callbacks, litplug.modules, litplug.datamodules, litplug.cli; print(litplug.__file__)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_ci_installs_and_tests_exactly_as_the_readme_says():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme, flags=re.S)
    setup, tests = blocks[0], blocks[1]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    for line in setup.splitlines():
        if line.startswith("pip install"):
            assert line in ci, f"README setup step missing from .ci/run: {line}"
    assert tests.strip() in ci


def test_console_script_when_installed():
    import shutil

    import pytest

    exe = shutil.which("litplug")
    if exe is None:
        pytest.skip("litplug is not pip-installed in this environment (CI installs it)")
    proc = subprocess.run([exe, "fit", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--config" in proc.stdout, proc.stderr
