"""The packages import only downwards (`ALLOWED`: launch over train over integrations over parallel
and models over moe over comm; placement and utils alone), lazy imports inside functions included:
an import cycle between two packages (as train/config.py and integrations/hf_run.py once had) fails
here, naming the file and the import."""

from __future__ import annotations

import ast
from pathlib import Path

import moeflow

ROOT = Path(moeflow.__file__).parent
# What each package may import of moeflow besides itself and `utils` (the architecture's arrows).
ALLOWED = {
    "comm": set(),
    "placement": set(),
    "moe": {"comm"},
    "models": {"moe", "comm"},
    "parallel": {"moe", "comm", "placement"},
    "integrations": {"models", "parallel", "moe", "comm", "placement"},
    "train": {"models", "parallel", "placement", "moe", "comm", "integrations"},
    "launch": {"train", "models", "parallel", "placement", "moe", "comm", "integrations"},
    "utils": set(),
}


def moeflow_imports(path: Path) -> list[tuple[int, str]]:
    """(line, package) of every `moeflow.<package>` import in the file, nested ones too."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "moeflow" and len(parts) > 1:
                found.append((node.lineno, parts[1]))
    return found


def test_packages_import_only_downwards():
    wrong = []
    for path in sorted(ROOT.rglob("*.py")):
        package = path.relative_to(ROOT).parts[0]
        if package not in ALLOWED:  # moeflow/__init__.py, __main__.py: the top
            continue
        for line, target in moeflow_imports(path):
            if target not in (package, "utils") and target not in ALLOWED[package]:
                wrong.append(f"{path.relative_to(ROOT.parent)}:{line} imports moeflow.{target}")
    assert not wrong, "\n".join(wrong)
