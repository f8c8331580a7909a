"""The package installs as `litplug` only, and CI installs exactly what the README says."""

import re
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_holds_only_the_litplug_package(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    (wheel,) = tmp_path.glob("litplug-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"litplug", next(t for t in tops if t.endswith(".dist-info"))}
    for module in ("litplug/__init__.py", "litplug/cli.py", "litplug/protocols.py", "litplug/callbacks/__init__.py", "litplug/modules/__init__.py", "litplug/datamodules/__init__.py", "litplug/configs/digits/classifier.yaml"):
        assert module in names
    assert not any(n.startswith("litplug/tests/") or n.startswith("litplug/benchmarks/") for n in names)


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
