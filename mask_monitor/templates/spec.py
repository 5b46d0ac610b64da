"""Name a chat template the way users do: ``"auto"``, ``"none"``, a family name, a file, or a ChatTemplate.

:func:`resolve_template` is the one place a template *setting* becomes a :class:`ChatTemplate` (or
``None`` for no template audit, or ``"auto"`` for detection from the tokenizer): ``mask-monitor audit
--template``, ``mask-monitor prepare --template`` and ``template=`` of the callback and the cure accept
the same values. A description file is JSON or YAML with the :class:`ChatTemplate` fields::

    {"family": "acme", "assistant": "<bot>", "end_of_turn": "</bot>", "user": "<usr>", "system": "<sys>"}

Example:
    >>> resolve_template("auto"), resolve_template("none")
    ('auto', None)
    >>> resolve_template("chatml").assistant
    '<|im_start|>assistant\\n'
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Any, Literal

from mask_monitor.templates.chat_template import ChatTemplate
from mask_monitor.templates.registry import families, lookup

__all__ = ["resolve_template", "template_from_file", "TemplateSpecError"]

_FIELDS = {f.name for f in fields(ChatTemplate)}
_TUPLES = ("alt_end_of_turn", "requires", "models")


class TemplateSpecError(ValueError):
    """A template setting that names no template (one line: what was given, what is accepted)."""


def template_from_file(path: str | Path) -> ChatTemplate:
    """A :class:`ChatTemplate` from a JSON or YAML file of its fields (``source`` becomes ``"user"``)."""
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise TemplateSpecError(f"cannot read template file {path}: {exc.strerror or exc}") from None
    try:
        if p.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # noqa: BLE001 - any parse error is the user's file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TemplateSpecError(f"cannot parse template file {path}: {first}") from None
    if not isinstance(data, dict):
        raise TemplateSpecError(f"template file {path}: expected a mapping of ChatTemplate fields")
    unknown = sorted(set(data) - _FIELDS)
    if unknown:
        raise TemplateSpecError(f"template file {path}: unknown field(s) {unknown}; known: {sorted(_FIELDS)}")
    for key in _TUPLES:
        if isinstance(data.get(key), list | str):
            data[key] = (data[key],) if isinstance(data[key], str) else tuple(data[key])
    data.setdefault("family", p.stem)
    data["source"] = "user"
    missing = [k for k in ("assistant", "end_of_turn") if k not in data]
    if missing:
        raise TemplateSpecError(f"template file {path}: missing field(s) {missing} (assistant opener, end of turn)")
    try:
        return ChatTemplate(**data)
    except (TypeError, ValueError) as exc:
        raise TemplateSpecError(f"template file {path}: {exc}") from None


def resolve_template(spec: Any) -> ChatTemplate | None | Literal["auto"]:
    """``"auto"`` (detect from the tokenizer), ``None`` (``"none"``: no template audit), or a ChatTemplate
    from a ChatTemplate, a registered family name, or a JSON/YAML description file."""
    if spec is None or isinstance(spec, ChatTemplate):
        return spec
    if not isinstance(spec, str | Path):
        raise TemplateSpecError(f"template={spec!r}: expected 'auto', 'none', a family name, a file or a ChatTemplate")
    text = str(spec).strip()
    if text.lower() == "auto":
        return "auto"
    if text.lower() == "none":
        return None
    if text in families():
        return lookup(text)
    if Path(text).expanduser().is_file() or text.lower().endswith((".json", ".yaml", ".yml")):
        return template_from_file(text)
    raise TemplateSpecError(
        f"template {text!r} is no registered family and no file; expected auto, none, a family "
        f"({', '.join(families())}) or a JSON/YAML file of ChatTemplate fields"
    )
