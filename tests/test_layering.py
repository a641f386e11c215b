"""The packages import only downwards (`ALLOWED`: launch over train over data, integrations,
parallel and models over moe over comm; placement and utils alone), lazy imports inside
functions included: an import cycle between two packages (as train/config.py and
integrations/hf_run.py once had) fails here, naming the file and the import. And no two files
import each other when imported (a module- level circle, which works in one import order only),
whatever their packages.
"""

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
    "train": {"data", "models", "parallel", "placement", "moe", "comm", "integrations"},
    "launch": {"train", "data", "models", "parallel", "placement", "moe", "comm", "integrations"},
    "data": set(),  # corpora and batch streams: nothing of models or parallelism
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


def module_of(path: Path) -> str:
    """`moeflow.a.b` for moeflow/a/b.py (`moeflow.a` for moeflow/a/__init__.py)."""
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def runs_at_import(body: list[ast.stmt]) -> list[ast.stmt]:
    """The statements of `body` that run when the module is imported: the top level, class bodies
    and the branches of module-level `if`/`try`/`with`; not function bodies, nor `if
    TYPE_CHECKING:` blocks."""
    out = []
    for node in body:
        if isinstance(node, ast.If):
            if "TYPE_CHECKING" not in ast.unparse(node.test):
                out += runs_at_import(node.body) + runs_at_import(node.orelse)
            continue
        out.append(node)
        if isinstance(node, ast.Try):
            blocks = [node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)]
            out += [n for block in blocks for n in runs_at_import(block)]
        elif isinstance(node, (ast.With, ast.ClassDef)):
            out += runs_at_import(node.body)
    return out


def import_time_targets(path: Path, modules: set[str]) -> list[tuple[int, str]]:
    """(line, module) of every moeflow module the file imports when it is itself imported:
    `from moeflow.a import b` names `moeflow.a.b` where that is a module, else `moeflow.a`."""
    found = []
    for node in runs_at_import(ast.parse(path.read_text(encoding="utf-8")).body):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.append((node.lineno, sub if sub in modules else node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
    return [(line, name) for line, name in found if name in modules]


def test_no_two_files_import_each_other_at_import_time():
    """A module-level import circle between two files (as integrations/deepspeed.py and
    deepspeed_moe.py once had: a re-export at the bottom of one) works in one import order only;
    lazy imports inside functions are fine."""
    paths = {module_of(p): p for p in sorted(ROOT.rglob("*.py"))}
    edges = {name: import_time_targets(path, set(paths)) for name, path in paths.items()}
    circles = []
    for a, targets in edges.items():
        for line, b in targets:
            back = [n for n, t in edges[b] if t == a]
            if a < b and back:
                circles.append(
                    f"{paths[a].relative_to(ROOT.parent)}:{line} imports {b}, and "
                    f"{paths[b].relative_to(ROOT.parent)}:{back[0]} imports {a}"
                )
    assert not circles, "\n".join(circles)
