"""A Griffe extension for the API reference: renders kvtools' Sphinx-flavoured docstrings as Markdown.

kvtools' docstrings are Google style (``Args:``) written with a few reStructuredText habits that Markdown
does not understand. This extension rewrites, in memory only, the docstring of every object Griffe loads
(the source files are not touched):

* cross-reference roles, ``:class:`~kvtools.cache.KVCache``` -> ``KVCache``, linked to its API entry when
  that object is documented on the site (an "optional" autorefs link: no warning when it is not);
* doctest blocks (``>>>`` lines and their output) -> fenced ``pycon`` code blocks, ``# doctest:`` directives
  dropped;
* a paragraph ending in ``::`` (a reST literal block follows) -> ``:`` (the indented block stays code);
* a bullet list right after a line of text gets the blank line Python-Markdown needs to see a list.

It is loaded by ``mkdocs.yml`` (``plugins: mkdocstrings: handlers: python: options: extensions``) and is
excluded from the built site (``exclude_docs``).
"""

from __future__ import annotations

import html
import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(class|func|meth|attr|mod|data|obj|exc|const):`(~?)([^`<>]+?)`")
_DOCTEST_DIRECTIVE = re.compile(r"\s*#\s*doctest:.*$")
_BULLET = re.compile(r"^\s*[*-] \S")


def _resolve(obj: griffe.Object, target: str) -> str | None:
    """The full path of ``target`` as seen from ``obj`` (its members, its module's names, its parents'), or
    ``None`` when Griffe cannot resolve it."""
    target = target.rstrip("()")
    if target.startswith("kvtools."):
        return target
    head, _, rest = target.partition(".")
    scope: Any = obj
    while scope is not None:
        try:
            path = scope.resolve(head)
        except Exception:  # noqa: BLE001 - an unresolvable name (alias cycles included) is shown unlinked
            path = None
        if path:
            return f"{path}.{rest}" if rest else path
        scope = scope.parent
    return None


def _roles(obj: griffe.Object, text: str) -> str:
    def repl(match: re.Match[str]) -> str:
        _, short, target = match.groups()
        shown = target.rsplit(".", 1)[-1] if short else target
        code = f"<code>{html.escape(shown)}</code>"
        path = _resolve(obj, target)
        if path is None:
            return code
        return f'<autoref identifier="{html.escape(path)}" optional>{code}</autoref>'

    return _ROLE.sub(repl, text)


def _doctests(lines: list[str]) -> list[str]:
    """Wrap each run of doctest lines (``>>>`` / ``...`` and the output up to a blank line) in a fence."""
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.lstrip()
        if not stripped.startswith(">>>"):
            out.append(line)
            i += 1
            continue
        indent = line[: len(line) - len(stripped)]
        if out and out[-1].strip():
            out.append("")
        out.append(f"{indent}```pycon")
        while i < len(lines) and lines[i].strip():
            out.append(_DOCTEST_DIRECTIVE.sub("", lines[i]))
            i += 1
        out.append(f"{indent}```")
        if i < len(lines):
            out.append("")
    return out


def _literal_blocks(lines: list[str]) -> list[str]:
    out = []
    for line in lines:
        if line.rstrip().endswith("::") and not line.lstrip().startswith((">>>", "...")):
            body = line.rstrip()[:-2].rstrip()
            line = f"{body}:" if body else ""
        out.append(line)
    return out


def _list_spacing(lines: list[str]) -> list[str]:
    out: list[str] = []
    fenced = False
    for line in lines:
        if line.lstrip().startswith("```"):
            fenced = not fenced
        # a paragraph line at the bullet's own indentation (a wrapped item's next line is indented further)
        if not fenced and _BULLET.match(line) and out and out[-1].strip() and not _BULLET.match(out[-1]) \
                and len(out[-1]) - len(out[-1].lstrip()) == len(line) - len(line.lstrip()):
            out.append("")
        out.append(line)
    return out


def markdown_docstring(obj: griffe.Object, text: str) -> str:
    """The Markdown form of one docstring (see the module docstring)."""
    lines = text.splitlines()
    lines = _doctests(lines)
    lines = _literal_blocks(lines)
    lines = _list_spacing(lines)
    return _roles(obj, "\n".join(lines))


class RstDocstrings(griffe.Extension):
    """Rewrite every loaded object's docstring with :func:`markdown_docstring`, once."""

    def __init__(self) -> None:
        super().__init__()
        self._done: set[int] = set()

    def _rewrite(self, obj: griffe.Object) -> None:
        if obj.is_alias or obj.docstring is None or id(obj.docstring) in self._done:
            return
        self._done.add(id(obj.docstring))
        obj.docstring.value = markdown_docstring(obj, obj.docstring.value)

    def on_object(self, *, obj: griffe.Object, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        self._rewrite(obj)

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        self._rewrite(pkg)  # the package module itself gets no on_object event
