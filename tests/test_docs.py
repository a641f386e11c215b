"""Every docstring example in the package runs, and so does the README's code."""

from __future__ import annotations

import doctest
import importlib
import pkgutil
import re
from pathlib import Path

import pytest

import moeflow

SUBMODULES = pkgutil.walk_packages(moeflow.__path__, prefix="moeflow.")
# `__main__` runs the CLI on import.
MODULES = [
    *sorted(m.name for m in SUBMODULES if not m.ispkg and not m.name.endswith("__main__")),
    "moeflow",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, extraglobs={"torch": importlib.import_module("torch")})
    assert result.failed == 0


def test_public_api_has_examples():
    for name in moeflow.__all__:
        obj = getattr(moeflow, name)
        if callable(obj):
            assert ">>>" in (obj.__doc__ or ""), f"{name} has no docstring example"


def test_readme_example_runs():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert blocks, "README has no python example"
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {})
