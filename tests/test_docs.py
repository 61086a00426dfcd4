"""The documentation site builds offline under ``mkdocs build --strict`` and stays in step with the code.

- the build passes with ``--strict`` (broken links and anchors, pages left out of the nav and Griffe's
  docstring warnings all fail it);
- the API reference documents every name in ``kvtools.__all__`` with the first line of its docstring, so a
  public name without a docstring fails;
- every page under ``docs/`` is in the nav, and the presets page shows every ``configs/*.yaml`` file's description (filled at build time)
  and its table names each preset's stages;
- every registered method's page lists each of its parameters with the default the code gives it (and the
  quantisation page the ``quant`` section's).
"""

from __future__ import annotations

import html
import importlib.util
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
DOCS_TOOLS = ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python")


def _missing_tools() -> list[str]:
    missing = []
    for name in DOCS_TOOLS:
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:  # a parent package is missing
            found = False
        if not found:
            missing.append(name)
    return missing


pytestmark = pytest.mark.skipif(
    bool(_missing_tools()),
    reason=f"the docs toolchain is not installed ({', '.join(_missing_tools())} not importable); "
           "pip install mkdocs mkdocs-material mkdocstrings-python",
)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site built once for this module with ``mkdocs build --strict``."""
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"), "-d", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{log[-6000:]}"
    return out


def test_mkdocs_build_strict_passes(site: Path) -> None:
    assert (site / "index.html").is_file()
    assert (site / "api" / "index.html").is_file()


# ---------------------------------------------------------------- the API reference
_ROLE = re.compile(r":(?:py:)?\w+:`(~?)([^`]+)`")


def _plain_docstring_line(text: str) -> str:
    """A docstring line as the site shows it: reST roles as their (short, with ``~``) target, no backticks."""
    text = _ROLE.sub(lambda m: m.group(2).rsplit(".", 1)[-1] if m.group(1) else m.group(2), text)
    return " ".join(text.replace("`", "").split())


def _page_text(fragment: str) -> str:
    """The text of an HTML fragment: tags dropped (inline ones join their neighbours), entities decoded."""
    return " ".join(html.unescape(re.sub(r"<[^>]+>", "", fragment)).split())


def test_api_reference_documents_every_public_name(site: Path) -> None:
    import kvtools

    page = (site / "api" / "index.html").read_text(encoding="utf-8")
    starts = {}
    for name in kvtools.__all__:
        match = re.search(rf'id="kvtools\.{re.escape(name)}"', page)
        assert match, f"kvtools.{name} has no entry in the API reference (docs/api/index.md; a docstring?)"
        starts[name] = match.start()
    ordered = sorted(starts.values()) + [len(page)]
    for name, start in starts.items():
        doc = inspect.getdoc(getattr(kvtools, name))
        assert doc, f"kvtools.{name} has no docstring"
        first = _plain_docstring_line(doc.splitlines()[0])
        section = page[start:ordered[ordered.index(start) + 1]]
        assert first in _page_text(section), (
            f"kvtools.{name}: the API reference does not show the first line of its docstring: {first!r}")


# ---------------------------------------------------------------- nav and presets
def _nav_pages(nav: object) -> list[str]:
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, list):
        return [p for item in nav for p in _nav_pages(item)]
    if isinstance(nav, dict):
        return [p for value in nav.values() for p in _nav_pages(value)]
    return []


def test_every_page_is_in_the_nav() -> None:
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    nav = _nav_pages(config["nav"])
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    assert len(nav) == len(set(nav)), f"pages listed twice in the nav: {sorted(p for p in nav if nav.count(p) > 1)}"
    assert pages - set(nav) == set(), f"pages missing from the nav in mkdocs.yml: {sorted(pages - set(nav))}"
    assert set(nav) - pages == set(), f"nav entries without a page: {sorted(set(nav) - pages)}"


def test_presets_page_shows_every_preset_file(site: Path) -> None:
    """The page holds a marker per preset, which the build fills from the file (docs/_ext/presets_hook.py):
    the built page shows each preset's own description."""
    text = (DOCS / "methods" / "presets.md").read_text(encoding="utf-8")
    presets = sorted(p.stem for p in (ROOT / "configs").glob("*.yaml"))
    assert presets
    missing = [p for p in presets if f"<!-- preset: {p} -->" not in text]
    assert not missing, f"presets without a marker on docs/methods/presets.md: {missing}"
    built = _page_text((site / "methods" / "presets" / "index.html").read_text(encoding="utf-8"))
    for p in presets:
        description = yaml.safe_load((ROOT / "configs" / f"{p}.yaml").read_text())["description"]
        assert " ".join(description.split()) in built, f"the built presets page lacks {p}'s description"


def test_presets_table_names_every_preset_and_its_stages() -> None:
    """The presets page's table has a row per preset file, and its "stages set" column names exactly the
    stages (and ``quant``) the file sets."""
    text = (DOCS / "methods" / "presets.md").read_text(encoding="utf-8")
    rows = dict(re.findall(r"^\| \[`([^`]+)`\]\(#[^)]+\) \| ([a-z, ]+) \|$", text, flags=re.M))
    presets = sorted(p.stem for p in (ROOT / "configs").glob("*.yaml"))
    assert sorted(rows) == presets, (f"table rows without a file: {sorted(set(rows) - set(presets))}; "
                                     f"files without a row: {sorted(set(presets) - set(rows))}")
    for p in presets:
        config = yaml.safe_load((ROOT / "configs" / f"{p}.yaml").read_text(encoding="utf-8"))
        stages = [s for s in ("prefill", "cache", "decode", "quant") if s in config]
        assert rows[p].split(", ") == stages, f"{p}: the table says {rows[p]!r}, the file sets {stages}"


# ---------------------------------------------------------------- parameter tables
def _yaml_default(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _missing_rows(page: Path, model: type) -> list[str]:
    text = page.read_text(encoding="utf-8")
    missing = []
    for key, field in model.model_fields.items():
        if key == "method":
            continue
        row = f"| `{key}` | `{_yaml_default(field.default)}` |"
        if row not in text:
            missing.append(row)
    return missing


def test_method_pages_list_every_parameter_with_its_default() -> None:
    from kvtools.methods import STAGE_MODELS
    from kvtools.quant import QuantParams

    problems = []
    for stage, models in STAGE_MODELS.items():
        for method, model in models.items():
            page = DOCS / "methods" / f"{method}.md"
            if not page.is_file():
                problems.append(f"{stage} method '{method}' has no page {page.relative_to(ROOT)}")
                continue
            problems += [f"{page.relative_to(ROOT)} ({stage}): no row {row}" for row in _missing_rows(page, model)]
    page = DOCS / "methods" / "quantisation.md"
    problems += [f"{page.relative_to(ROOT)}: no row {row}" for row in _missing_rows(page, QuantParams)]
    assert not problems, "\n".join(problems)
