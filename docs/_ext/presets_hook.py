"""MkDocs hook: fill each ``<!-- preset: NAME -->`` marker of the presets page from ``configs/NAME.yaml``
(its ``description`` as a paragraph, the rest of the file as a YAML block), so the page always shows the
shipped files. A marker without a file fails the build."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

_MARKER = re.compile(r"<!-- preset: ([A-Za-z0-9._-]+) -->")
_CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def render(name: str) -> str:
    path = _CONFIGS / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"docs: preset marker for {name!r}, but {path} does not exist")
    text = path.read_text(encoding="utf-8")
    description = yaml.safe_load(text).get("description", "")
    body = "\n".join(
        line for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith("#") and not line.startswith("description:")
    )
    return f"{description}\n\n```yaml\n{body}\n```"


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ANN001 - mkdocs' hook signature
    if page.file.src_uri != "methods/presets.md":
        return markdown
    return _MARKER.sub(lambda m: render(m.group(1)), markdown)
