"""No extra replaces the user's torch: ``pip install --dry-run`` of litplug's dependencies and every
extra, in a fresh virtual environment holding only torch 2.13.0 (its installed metadata, which is
what pip's resolver reads), installs no other torch. Skipped when the package registry cannot be
reached. The resolution starts in a background thread when this file is collected."""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import urllib.parse
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
TORCH = "2.13.0"


def _registry_reachable() -> bool:
    """pypi.org or any http(s) index pip is configured with accepts a connection."""
    proc = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True)
    urls = [
        w.strip("'\" ")
        for line in proc.stdout.splitlines()
        if "index-url" in line
        for w in line.split("=", 1)[1].split()
    ]
    hosts = ["pypi.org"] + [urllib.parse.urlparse(u).hostname for u in urls if u.startswith("http")]
    for host in filter(None, hosts):
        try:
            socket.create_connection((host, 443), timeout=3).close()
            return True
        except OSError:
            continue
    return False


def _requirements() -> dict[str, list[str]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {"core": project["dependencies"], **project["optional-dependencies"]}


def _dry_run() -> dict:
    """Resolve litplug with every extra in a fresh venv holding only torch's metadata; return
    ``{"skip": reason}``, ``{"error": text}`` or ``{"install": [...], "groups": [...]}``."""
    torch_dist = importlib.metadata.distribution("torch")
    if not torch_dist.version.startswith(TORCH):
        return {"skip": f"needs torch {TORCH} installed (found {torch_dist.version})"}
    if not _registry_reachable():
        return {"skip": "the package registry is not reachable"}
    tmp = Path(tempfile.mkdtemp(prefix="litplug-extras-"))
    try:
        venv = tmp / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)
        python = venv / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")
        site = subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        metadata = Path(torch_dist.locate_file(next(f for f in torch_dist.files if f.name == "METADATA"))).parent
        shutil.copytree(metadata, Path(site) / metadata.name)  # torch as pip sees it: its installed metadata
        groups = _requirements()
        report = tmp / "report.json"
        requirements = sorted({r for reqs in groups.values() for r in reqs})
        proc = subprocess.run(
            [str(python), "-m", "pip", "install", "--dry-run", "--quiet", "--report", str(report), *requirements],
            capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        if proc.returncode != 0:
            return {"error": proc.stderr[-2000:]}
        return {"install": json.loads(report.read_text())["install"], "groups": list(groups)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# The resolution waits on the package registry far more than it computes, so it starts when pytest
# collects this file and runs beside the other tests; the test below collects its answer.
_answer: dict = {}


def _resolve() -> None:
    try:
        _answer.update(_dry_run())
    except Exception as err:  # reported by the test, not lost in the thread
        _answer["error"] = f"{type(err).__name__}: {err}"


_resolver = threading.Thread(target=_resolve, daemon=True)
_resolver.start()


def test_no_extra_replaces_torch():
    _resolver.join()
    if "skip" in _answer:
        pytest.skip(_answer["skip"])
    assert "error" not in _answer, _answer.get("error")
    install = _answer["install"]
    torch_version = importlib.metadata.version("torch")
    torches = [i["metadata"]["version"] for i in install if i["metadata"]["name"].lower() == "torch"]
    pulled_by = sorted(
        i["metadata"]["name"]
        for i in install
        if any(
            r.split(";")[0].replace(" ", "").lower().startswith("torch") for r in i["metadata"].get("requires_dist", [])
        )
        and i["metadata"]["name"].lower() != "torch"
    )
    assert not torches, (
        f"installing litplug with every extra ({', '.join(_answer['groups'])}) would replace torch {torch_version} "
        f"by {torches}; packages that require torch: {pulled_by}"
    )
