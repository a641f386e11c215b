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


ROOT = Path(__file__).resolve().parents[1]
PAGES = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("page", PAGES)
def test_the_python_examples_of_the_readme_and_docs_run(page):
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / page).read_text(), flags=re.S)
    assert blocks or page != "README.md", "README has no python example"
    for code in blocks:
        exec(compile(code, page, "exec"), {})


@pytest.mark.parametrize("page", PAGES)
def test_the_links_of_the_readme_and_docs_resolve(page):
    text = re.sub(r"```.*?```", "", (ROOT / page).read_text(), flags=re.S)  # not in code
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if "://" not in target:
            assert (ROOT / page).parent.joinpath(target).exists(), f"{page} links to {target}"


def test_nothing_in_the_repo_names_a_file_outside_it():
    """A user's clone has only the repo: docs, docstrings and tests cite docs/, not notes kept
    elsewhere."""
    # Spelled in pieces, so that this file does not cite them itself.
    parts = (("PAPERS", ".md"), ("DESIGN", ".md"), ("STYLE", ".md"), ("..", "/shared"),
             ("shared", " folder"))  # fmt: skip
    names = tuple(a + b for a, b in parts)
    files = [p for p in ROOT.rglob("*") if p.is_file() and p.suffix in (".py", ".md", ".toml")]
    files = [p for p in files if ".venv" not in p.parts and ".git" not in p.parts]
    found = [
        f"{p.relative_to(ROOT)}: {name}"
        for p in files
        for name in names
        if name in p.read_text(encoding="utf-8", errors="replace")
    ]
    assert not found, found


def test_the_configuration_reference_is_current():
    from moeflow.train.config_reference import render

    on_disk = (ROOT / "docs" / "configuration.md").read_text()
    assert on_disk == render(), "docs/configuration.md is stale: run `make docs`"


def test_the_cli_reference_names_every_option():
    from moeflow.launch.cli import parsers

    text = (ROOT / "docs" / "cli.md").read_text()
    missing = [
        f"{name} {flag}"
        for name, parser in parsers().items()
        for action in parser._actions
        for flag in action.option_strings
        if flag not in ("-h", "--help") and f"`{flag}" not in text and f", `{flag}" not in text
    ]
    assert not missing, missing
    for name in parsers():
        assert f"## `moeflow {name}" in text, name
