"""Griffe extension: read the package's Sphinx-flavoured docstrings as the Google style mkdocstrings renders.

The code's docstrings are Google style with a few Sphinx habits that Markdown would otherwise print
literally; this extension translates them when the API reference is built (the code is not changed):

* ``:class:`~a.b.C```, ``:func:``, ``:meth:``, ``:data:``, ``:attr:``, ``:exc:``, ``:mod:`` roles become
  code spans, linked to the object's API entry when it has one (an optional cross-reference: an object the
  reference does not render stays plain code instead of failing the strict build);
* an ``Example:`` section is read as ``Examples:`` (its ``>>>`` lines are rendered as code, not as text);
* a module attribute documented by ``#:`` comment lines above it gets them as its docstring.
"""

from __future__ import annotations

import re
from typing import Any

from griffe import Docstring, Extension, Object

ROLE = re.compile(r":(?:py:)?(?:class|func|meth|data|attr|exc|mod|obj):`(~?)([\w.]+)(?:\(\))?`")
EXAMPLE = re.compile(r"^(\s*)Example:[ \t]*$", re.MULTILINE)


def _role(m: re.Match[str]) -> str:
    short, path = m.group(1) == "~", m.group(2)
    title = path.rsplit(".", 1)[-1] if short else path
    if "." not in path:  # a bare name: its module is unknown here
        return f"`{title}`"
    return f'<autoref identifier="{path}" optional><code>{title}</code></autoref>'


def translate(text: str) -> str:
    return EXAMPLE.sub(r"\1Examples:", ROLE.sub(_role, text))


class SphinxToMarkdown(Extension):
    def on_instance(self, *, obj: Object, **kwargs: Any) -> None:
        if obj.docstring is None and obj.is_attribute:
            comment = _comment_above(obj)
            if comment:
                obj.docstring = Docstring(comment, lineno=obj.lineno, parent=obj)
        if obj.docstring is not None:
            obj.docstring.value = translate(obj.docstring.value)


def _comment_above(obj: Object) -> str | None:
    """The ``#:`` lines right above an attribute's assignment, joined."""
    try:
        lines = obj.lines_collection[obj.filepath]  # type: ignore[index]
    except (KeyError, AttributeError, TypeError):
        return None
    if not obj.lineno:
        return None
    found: list[str] = []
    i = obj.lineno - 2  # the line above the assignment (lineno is 1-based)
    while i >= 0 and lines[i].lstrip().startswith("#:"):
        found.append(lines[i].lstrip()[2:].strip())
        i -= 1
    return " ".join(reversed(found)) or None
