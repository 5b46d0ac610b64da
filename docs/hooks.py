"""MkDocs hook: the reference tables are generated from the declarations at every docs build.

A page asks for a table with an HTML comment on a line of its own, e.g. ``<!-- generated: settings -->``;
the hook replaces it with Markdown built from :data:`mask_monitor.config.SETTINGS`,
:data:`mask_monitor.checks.CHECKS`, :data:`mask_monitor.counters.COUNTERS` / ``RATIOS`` and
:data:`mask_monitor.config.ENVIRONMENT`. The tables can therefore never disagree with the code: adding a
setting, a check or a counter adds its row. An unknown table name fails the build.

``render(name)`` is also what ``tests/test_docs.py`` calls to check the tables against the declarations.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the tree being documented wins over an installed copy
    sys.path.insert(0, str(ROOT))

MARKER = re.compile(r"^<!-- generated: ([a-z-]+) -->$", re.MULTILINE)


def _cell(value: object) -> str:
    """One table cell: pipes escaped, newlines folded."""
    return str(value).replace("|", "\\|").replace("\n", " ")


def _code(value: object) -> str:
    text = str(value)
    tick = "``" if "`" in text else "`"
    pad = " " if "`" in text else ""
    return f"{tick}{pad}{text}{pad}{tick}".replace("|", "\\|")


def _table(header: tuple[str, ...], rows: list[tuple[object, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _default(value: Any) -> str:
    if isinstance(value, bool):
        return _code("true" if value else "false")
    return _code(value)


def _values(setting: Any) -> str:
    if setting.kind in ("action", "choice"):
        return ", ".join(_code(c) for c in setting.choices)
    if setting.kind == "ratio":
        return "a number from 0 to 1"
    if setting.kind == "bool":
        return "true / false (1/0, yes/no, on/off)"
    if setting.minimum is not None:
        return f"a whole number >= {setting.minimum}"
    return "a whole number"


def settings_table() -> str:
    from mask_monitor.config import SETTINGS

    rows = [(_code(s.name), _default(s.default), _values(s), _code(s.env), s.doc) for s in SETTINGS.values()]
    return _table(("setting", "default", "values", "environment variable", "meaning"), rows)


def _scopes(check: Any) -> str:
    names = {"step": "training steps", "dataset": "datasets (audit)"}
    return ", ".join(names[s] for s in ("step", "dataset") if s in check.scopes)


def checks_table() -> str:
    from mask_monitor.checks import CHECKS

    rows = [(f"[{_code(c.name)}](#check-{c.name.replace('_', '-')})", f"**{c.default}**" if c.default == "abort"
             else c.default, _scopes(c), c.watches) for c in CHECKS.values()]
    return _table(("check", "default action", "runs on", "what it watches"), rows)


def check_details() -> str:
    from mask_monitor.checks import CHECKS

    out: list[str] = []
    for c in CHECKS.values():
        out.append(f"### `{c.name}` {{ #check-{c.name.replace('_', '-')} }}")
        out.append("")
        out.append(f"{c.watches[0].upper()}{c.watches[1:]}. Default: **{c.default}**; runs on {_scopes(c)}; "
                   f"set with `{c.name}=\"abort\" | \"warn\" | \"off\"` or `MASK_MONITOR_{c.name.upper()}`.")
        for title, items in (("Likely causes", c.causes), ("What to check", c.to_check), ("Fix", c.fix)):
            if items:
                out.append("")
                out.append(f"{title}:")
                out.append("")
                out += [f"- {i}".replace("\n", " ") for i in items]  # a list item: pipes need no escaping
        out.append("")
    return "\n".join(out).rstrip()


def counters_table() -> str:
    from mask_monitor.counters import COUNTERS

    def flags(c: Any) -> str:
        f = []
        if c.template:
            f.append("chat template known")
        if c.scope == "dataset":
            f.append("dataset preparation")
        if c.per_sequence:
            f.append("per sequence (audit)")
        return ", ".join(f)

    rows = [(_code(c.name), c.unit, c.reduce, _code(f"mask_monitor_{c.name}_total") if c.prometheus else "",
             flags(c), c.help) for c in COUNTERS]
    return _table(("counter", "unit", "combines by", "Prometheus", "only / also", "meaning"), rows)


def ratios_table() -> str:
    from mask_monitor.counters import RATIOS

    rows = [(_code(r.name), f"{_code(r.numerator)} / {_code(r.denominator)}",
             "chat template known" if r.template else "", r.help) for r in RATIOS]
    return _table(("ratio", "computed as", "only when", "meaning"), rows)


def environment_table() -> str:
    from mask_monitor.config import ENVIRONMENT

    return _table(("variable", "what it does"), [(_code(k), v) for k, v in ENVIRONMENT.items()])


TABLES: dict[str, Callable[[], str]] = {
    "settings": settings_table,
    "checks": checks_table,
    "check-details": check_details,
    "counters": counters_table,
    "ratios": ratios_table,
    "environment": environment_table,
}


def render(name: str) -> str:
    try:
        return TABLES[name]()
    except KeyError:
        raise ValueError(f"unknown generated table {name!r}; known: {', '.join(TABLES)}") from None


def expand(markdown: str, where: str = "<markdown>") -> str:
    """``markdown`` with every ``<!-- generated: NAME -->`` line replaced by its table."""

    def sub(m: re.Match[str]) -> str:
        try:
            return render(m.group(1))
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None

    return MARKER.sub(sub, markdown)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    from mkdocs.exceptions import PluginError

    try:
        return expand(markdown, page.file.src_path)
    except ValueError as exc:
        raise PluginError(str(exc)) from exc
