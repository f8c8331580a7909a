"""Every docstring example in the library runs: doctest over each module of the installed package.

The same examples pass under ``python -m pytest --doctest-modules functional bounds ...`` from the
repository root; collecting them here, by module name, keeps them in the README's test command
without importing the package a second time under the folder's name.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import litplug

MODULES = sorted(
    info.name
    for info in pkgutil.walk_packages(litplug.__path__, prefix="litplug.")
    if not info.name.startswith(("litplug.tests", "litplug.benchmarks"))
)


@pytest.mark.parametrize("name", ["litplug", *MODULES])
def test_docstring_examples_run(name: str) -> None:
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report: list[str] = []
    for test in finder.find(module, name):
        runner.run(test, out=report.append)
    assert runner.failures == 0, "".join(report)


def test_every_package_module_is_collected() -> None:
    assert {"litplug.functional", "litplug.callbacks.ema", "litplug.bounds", "litplug.merging"} <= set(MODULES)
