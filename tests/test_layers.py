"""The layers of the package (docs/architecture.md), read from the source's imports: imports point
down only, the cores export public names only, the wrappers import only public core names, and
private names of other libraries appear only in plumbing/third_party_private.py."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import litplug.callbacks
import litplug.functional

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ("bounds", "callbacks", "datamodules", "functional", "merging", "modules", "plumbing")
LOWER = ("functional", "bounds", "merging", "plumbing", "protocols", "validation", "loading", "figures", "board")
UPPER = ("callbacks", "modules", "datamodules", "cli", "compare", "oracle")
ENTRY = ("__init__", "__main__", "cli", "compare", "oracle")


def _files() -> list[Path]:
    files = [p for d in LIBRARY for p in sorted((ROOT / d).rglob("*.py"))]
    return files + sorted(ROOT.glob("*.py"))


def _layer(path: Path) -> str:
    return path.relative_to(ROOT).parts[0].removesuffix(".py")


def _imports(path: Path) -> list[tuple[str, list[str], bool]]:
    """``(absolute module inside litplug, imported names, relative)`` of every import in ``path``."""
    package = ["litplug", *path.relative_to(ROOT).parent.parts]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            out.append((module, [a.name for a in node.names], bool(node.level)))
        elif isinstance(node, ast.Import):
            out += [(a.name, [], False) for a in node.names]
    return [(m, names, rel) for m, names, rel in out if m == "litplug" or m.startswith("litplug.")]


def _target(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


@pytest.mark.parametrize("path", _files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_down_and_name_public_things(path):
    layer = _layer(path)
    for module, names, relative in _imports(path):
        target = _target(module)
        if layer in LOWER:
            assert target not in UPPER, f"{path.relative_to(ROOT)} imports {module} (a lower layer importing upward)"
        if target != layer:  # across files of different packages: public names only
            private = [n for n in names if n.startswith("_") and n != "__version__"]
            assert not private, f"{path.relative_to(ROOT)} imports private {private} from {module}"
        assert relative or path.parent == ROOT, (
            f"{path.relative_to(ROOT)} imports {module} absolutely; the package uses relative imports"
        )


def test_cores_export_public_names_only_and_one_name_per_class():
    assert all(not n.startswith("_") for n in litplug.functional.__all__)
    for name in ("eps_schedule", "ibp_init_", "gradient_ascent", "starting_designs", "pgd_attack", "npo_loss"):
        assert callable(getattr(litplug.functional, name))
    for name in ("mia_efficacy", "uniform_soup", "greedy_soup"):
        assert callable(getattr(litplug.functional, name))
    classes = [getattr(litplug.callbacks, n) for n in litplug.callbacks.__all__]
    assert len(set(classes)) == len(classes)
    assert not (ROOT / "callbacks" / "averaging.py").exists() and not (ROOT / "callbacks" / "sharpness.py").exists()


def test_tests_mirror_the_source_tree():
    """tests/<package>/test_<module>.py tests <package>/<module>.py; tests over several files (the
    registry, the bad-input matrix, schedules, ...) sit at the top of tests/."""
    strays = [
        str(test.relative_to(ROOT))
        for package in LIBRARY
        for test in sorted((ROOT / "tests" / package).glob("test_*.py"))
        if not (ROOT / package / f"{test.stem.removeprefix('test_')}.py").exists()
    ]
    assert not strays, f"test files named after no source file of their package: {strays}"


# Public despite the underscore: documented in the standard library.
PUBLIC_UNDERSCORED = {"os._exit"}


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _foreign_private(path: Path) -> list[str]:
    """Private names of other libraries that ``path`` imports or reads through an imported name
    (``torch.nn.modules.utils._pair``, ``from torch.utils import _pytree``)."""
    tree = ast.parse(path.read_text())
    roots: dict[str, str] = {}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "litplug":
                    continue
                if any(_private(part) for part in a.name.split(".")):
                    found.append(a.name)
                roots[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module not in (None, "__future__"):
            if node.module.split(".")[0] == "litplug":
                continue
            found += [f"{node.module}.{a.name}" for a in node.names if _private(a.name)]
            found += [node.module] if any(_private(part) for part in node.module.split(".")) else []
            roots.update({a.asname or a.name: f"{node.module}.{a.name}" for a in node.names})
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            chain, base = [node.attr], node.value
            while isinstance(base, ast.Attribute):
                chain.append(base.attr)
                base = base.value
            if isinstance(base, ast.Name) and base.id in roots:
                found.append(".".join([roots[base.id], *reversed(chain)]))
    return sorted(set(found) - PUBLIC_UNDERSCORED)


def test_private_names_of_other_libraries_only_in_their_adapter():
    adapter = ROOT / "plumbing" / "third_party_private.py"
    found = {str(p.relative_to(ROOT)): _foreign_private(p) for p in _files() if p != adapter}
    found = {path: names for path, names in found.items() if names}
    assert not found, f"private names of other libraries outside plumbing/third_party_private.py: {found}"
    assert "torch.ops.aten._adaptive_avg_pool2d_backward" in _foreign_private(adapter)  # the check sees them


def test_every_root_file_has_a_layer_named_in_the_architecture_page():
    page = (ROOT / "docs" / "architecture.md").read_text()
    for path in sorted(ROOT.glob("*.py")):
        assert path.stem in LOWER + UPPER + ENTRY, f"{path.name} is in no layer of tests/test_layers.py"
        assert path.stem == "__init__" or path.name in page, f"{path.name} is not in docs/architecture.md"
