"""Showing an :class:`~mask_monitor.audit.pipeline.AuditResult`: terminal (rich), JSON, one HTML page.

The verdict comes first, the numbers after. Tokens are coloured by what the loss does with them:

* ``masked``: label is ``ignore_index``, no loss;
* ``supervised``: trained on, and (when the chat template is known) part of an assistant answer or
  its end-of-turn;
* ``leakage``: trained on although it is a prompt token (system, user, text outside any turn);
  a supervised assistant *header* is counted apart (``supervised_header_tokens``) and shown as supervised;
* ``start``: the first token of a sequence, never a target of a causal LM.

Example:
    >>> token_status([5, 6, 7, 8], [-100, 6, 7, 8], roles=[2, 2, 3, 4])
    ['start', 'leakage', 'supervised', 'supervised']
    >>> piece_text("▁Paris"), piece_text("<0x0A>")
    (' Paris', '\\n')
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Sequence
from typing import IO, Any

from ..stats import ANSWER_ROLES, ROLE_NAMES, ROLE_UNKNOWN
from .counting import SequenceRecord
from .pipeline import AuditResult

__all__ = ["token_status", "piece_text", "render_terminal", "render_json", "render_html", "STATUS_STYLE"]

#: rich style of each token status (the HTML page uses the same colours)
STATUS_STYLE: dict[str, str] = {
    "masked": "grey50",
    "supervised": "bold green",
    "leakage": "bold white on red",
    "start": "dim italic",
}
_HTML_CLASS = {"masked": "m", "supervised": "s", "leakage": "l", "start": "n"}
_BYTE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def token_status(
    input_ids: Sequence[int], labels: Sequence[int], roles: Sequence[int] | None = None, ignore_index: int = -100
) -> list[str]:
    """Status of each token of one sequence: ``start`` / ``masked`` / ``supervised`` / ``leakage``."""
    out = []
    for i in range(len(input_ids)):
        if i == 0:
            out.append("start")
        elif labels[i] == ignore_index:
            out.append("masked")
        elif roles is not None and roles[i] not in ANSWER_ROLES and roles[i] != ROLE_UNKNOWN:
            out.append("leakage")
        else:
            out.append("supervised")
    return out


def piece_text(piece: str | None) -> str:
    """Readable text of one vocabulary piece (SentencePiece ``▁``, byte-level ``Ġ``/``Ċ``, byte tokens)."""
    if piece is None:
        return "\ufffd"
    m = _BYTE.match(piece)
    if m:
        b = int(m.group(1), 16)
        return chr(b) if b >= 0x20 or b in (0x09, 0x0A) else f"\\x{b:02x}"
    return piece.replace("▁", " ").replace("Ġ", " ").replace("Ċ", "\n").replace("ĉ", "\t")


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _n(x: float | int) -> str:
    return f"{int(x):,}"


def _settings_line(r: AuditResult) -> str:
    s = r.settings
    parts = [
        f"max_length={s.get('max_length')}" + (f" ({s.get('truncation_mode')})" if s.get("max_length") else ""),
        f"packing={'on (' + str(s.get('packing_strategy')) + ')' if s.get('packing') else 'off'}",
        f"padding_free={'on' if r.padding_free else 'off'}",
        f"assistant_only_loss={s.get('assistant_only_loss')}",
        f"completion_only_loss={r.completion_only_loss}"
        + (" (auto)" if s.get("completion_only_loss") is None else ""),
    ]
    return " · ".join(parts)


def _rows(r: AuditResult) -> list[tuple[str, str]]:
    t = r.totals
    d = r.distribution()
    rows = [
        ("examples", f"{_n(r.examples_in)}" + (f" sampled of {_n(r.examples_total)}" if r.sampled else "")
         + f" → {_n(t.sequences)} sequences reach training"
         + (f" ({_n(r.dropped)} dropped by TRL)" if r.dropped else "")),
        ("target tokens", _n(t.target_tokens)),
        ("supervised tokens", f"{_n(t.supervised_tokens)} ({_pct(t.supervised_ratio)})"),
    ]
    if d.get("count"):
        rows.append(("supervised ratio per example",
                     f"min {d['min']:.2f} · p5 {d['p5']:.2f} · median {d['median']:.2f} · p95 {d['p95']:.2f} · "
                     f"max {d['max']:.2f}"))
    fm_reason = ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in r.fully_masked_reasons.items() if v)
    rows.append(("fully masked examples", _n(t.fully_masked_sequences) + (f" ({fm_reason})" if fm_reason else "")))
    if r.dropped:
        dr = ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in r.dropped_reasons.items())
        rows.append(("dropped as fully masked", f"{_n(r.dropped)} ({dr})"))
    rows.append(("examples with no masking", _n(t.unmasked_sequences)))
    if r.role_audit:
        rows.append(("prompt leakage", f"{_n(t.prompt_leakage_tokens)} tokens ({_pct(r.leakage_ratio)} of supervised)"))
        if t.supervised_header_tokens:
            rows.append(("assistant header supervised",
                         f"{_n(t.supervised_header_tokens)} tokens (not counted as leakage)"))
        rows.append(("response coverage", f"{_pct(t.response_coverage_ratio)} of "
                     f"{_n(t.assistant_content_tokens)} assistant tokens supervised"))
        rows.append(("end-of-turn supervised", f"{_n(t.supervised_eot_turns)} of {_n(t.assistant_turns)} turns "
                     f"({_pct(t.eot_supervised_ratio)})"))
        if t.unterminated_responses or t.truncated_responses:
            rows.append(("responses without end of turn",
                         f"{_n(t.unterminated_responses)} of {_n(t.assistant_responses)} (not truncation); "
                         f"{_n(t.truncated_responses)} more cut by max_length"))
    else:
        rows.append(("prompt leakage", f"not audited ({r.template_note})"))
    if r.settings.get("max_length") is not None:
        rows.append(("longer than max_length", _n(r.truncated_examples)))
    if t.supervised_padding_tokens:
        rows.append(("supervised padding", _n(t.supervised_padding_tokens)))
    return rows


# ---------------------------------------------------------------------------------------------- terminal
def _example_text(rec: SequenceRecord, r: AuditResult, max_tokens: int) -> Any:
    from rich.text import Text

    text = Text()
    ids, labels = rec.input_ids, rec.labels
    roles = rec.roles if r.role_audit else None
    status = token_status(ids, labels, roles)
    pieces = r.decode(ids) if r.decode else [str(i) for i in ids]
    n = len(ids)
    keep = range(n) if n <= max_tokens else list(range(max_tokens // 2)) + list(range(n - max_tokens // 2, n))
    prev = -1
    for i in keep:
        if prev >= 0 and i != prev + 1:
            text.append(f" … {i - prev - 1} tokens … ", style="reverse")
        p = piece_text(pieces[i])
        p = p.replace("\n", "↵\n")
        text.append(p, style=STATUS_STYLE[status[i]])
        prev = i
    return text


def _title(rec: SequenceRecord) -> str:
    where = f"example #{rec.index}" if rec.index is not None else "packed document"
    extra = f" · {rec.reason}" if rec.reason else ""
    return (f"{where} · {rec.supervised_tokens}/{rec.target_tokens} supervised ({_pct(rec.supervised_ratio)})"
            f"{extra}")


def render_terminal(r: AuditResult, console: Any = None, show: int = 0, max_tokens: int = 400) -> None:
    """Print the report: verdict, findings, numbers, histogram, and ``show`` coloured examples."""
    from rich.console import Console, Group
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    console = console or Console()
    head = Text()
    if r.blocking:
        head.append(f"BLOCKED (exit {r.exit_code})", style="bold white on red")
    else:
        head.append("HEALTHY (exit 0)", style="bold black on green")
    head.append(f"  {_n(r.examples_in)} examples · {_n(r.totals.supervised_tokens)} supervised tokens")
    lines: list[Any] = [head]
    for f in r.blocking:
        lines.append(Text.assemble(("  ✗ ", "bold red"), (f"{f.check}: ", "bold"), f.message))
    for f in r.warnings:
        lines.append(Text.assemble(("  ! ", "bold yellow"), (f"{f.check}: ", "bold"), f.message))
    if not r.findings:
        lines.append(Text("  ✓ no finding", style="green"))
    for i, line in enumerate(r.fix):
        lines.append(Text.assemble(("  Fix: " if i == 0 else "   or: ", "bold green"), (line, "bold")))
    console.print(Panel(Group(*lines), title="mask-monitor audit", title_align="left",
                        border_style="red" if r.blocking else "green"))

    meta = Table.grid(padding=(0, 2))
    meta.add_column(style="bold cyan", no_wrap=True)
    meta.add_column()
    meta.add_row("data", f"{r.data} ({r.data_source}, {r.data_format})")
    tmpl = r.template_family or "none"
    meta.add_row("tokenizer", f"{r.tokenizer} · chat template: {tmpl}")
    swapped = " · training chat template swapped in" if r.training_chat_template else ""
    meta.add_row("TRL", _settings_line(r) + swapped)
    console.print(meta)

    table = Table(show_header=False, box=None, padding=(0, 2))
    table.add_column(style="bold", no_wrap=True)
    table.add_column()
    for k, v in _rows(r):
        table.add_row(k, v)
    console.print(table)

    d = r.distribution()
    if d.get("count"):
        counts = d["histogram"]["counts"]
        edges = d["histogram"]["edges"]
        top = max(counts) or 1
        hist = Table(title="supervised ratio per example", show_header=False, box=None, padding=(0, 1),
                     title_justify="left", title_style="bold")
        hist.add_column(no_wrap=True, style="cyan")
        hist.add_column(no_wrap=True)
        hist.add_column(justify="right")
        for i, c in enumerate(counts):
            if c == 0:
                continue
            bar = "█" * max(1, round(30 * c / top))
            hist.add_row(f"{edges[i]:.2f}–{edges[i + 1]:.2f}", Text(bar, style="green" if edges[i] > 0 else "red"),
                         _n(c))
        console.print(hist)
    for m in r.trl_messages:
        console.print(Text.assemble(("TRL: ", "bold yellow"), m.strip().splitlines()[0][:300]))

    if show > 0:
        legend = Text.assemble("tokens: ", ("masked", STATUS_STYLE["masked"]), " · ",
                               ("supervised", STATUS_STYLE["supervised"]), " · ",
                               ("prompt leakage", STATUS_STYLE["leakage"]), " · ",
                               ("not a target", STATUS_STYLE["start"]))
        console.print(legend)
        for rec in _pick_examples(r, show):
            console.print(Panel(_example_text(rec, r, max_tokens), title=_title(rec), title_align="left",
                                border_style="red" if rec.category in ("fully_masked", "leakage") else "blue"))


def _pick_examples(r: AuditResult, n: int) -> list[SequenceRecord]:
    """The worst ones first (up to half of ``n``, at least one), then the first examples of the data."""
    n_worst = max(1, n // 2) if r.worst else 0
    worst = [w for w in r.worst if w.category != "ok"][:n_worst] or r.worst[:n_worst]
    seen = {id(w) for w in worst}
    keys = {(w.index, tuple(w.input_ids)) for w in worst}
    rest = [s for s in r.shown if id(s) not in seen and (s.index, tuple(s.input_ids)) not in keys]
    return (worst + rest)[:n]


# ---------------------------------------------------------------------------------------------- json
def render_json(r: AuditResult, out: IO[str]) -> None:
    json.dump(r.as_dict(), out, indent=2, default=str)
    out.write("\n")


# ---------------------------------------------------------------------------------------------- html
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1100px;color:#222;
padding:0 1rem}
h1{font-size:1.4rem;margin-bottom:.3rem} h2{font-size:1.1rem;margin-top:2rem;border-bottom:1px solid #ddd}
.verdict{padding:.8rem 1rem;border-radius:6px;font-weight:600;font-size:1.1rem}
.blocked{background:#c62828;color:#fff} .healthy{background:#2e7d32;color:#fff}
ul.findings{list-style:none;padding-left:0} ul.findings li{margin:.3rem 0;padding:.3rem .6rem;border-radius:4px}
li.blocking{background:#fdecea;border-left:4px solid #c62828}
li.warning{background:#fff8e1;border-left:4px solid #f9a825}
table.kv td{padding:.2rem .8rem .2rem 0;vertical-align:top} table.kv td:first-child{font-weight:600;white-space:nowrap}
.ex{border:1px solid #ccc;border-radius:6px;margin:1rem 0;overflow:hidden}
.ex h3{margin:0;padding:.4rem .7rem;font-size:.95rem;background:#f3f3f3}
.ex.bad h3{background:#fdecea}
.toks{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:.85rem;white-space:pre-wrap;
word-break:break-all;padding:.6rem .7rem;line-height:1.6}
.tok{border-radius:2px}
.m{color:#8a8a8a;background:#f2f2f2} .s{color:#0b5d1e;background:#c8f7c5;font-weight:600}
.l{color:#fff;background:#d32f2f;font-weight:600} .n{color:#999;font-style:italic}
.legend span{padding:0 .4rem;margin-right:.5rem}
.gap{background:#333;color:#fff;padding:0 .3rem}
svg text{font-size:11px;fill:#444}
"""


def _html_tokens(rec: SequenceRecord, r: AuditResult, max_tokens: int) -> str:
    ids, labels = rec.input_ids, rec.labels
    status = token_status(ids, labels, rec.roles if r.role_audit else None)
    pieces = r.decode(ids) if r.decode else [str(i) for i in ids]
    n = len(ids)
    keep = list(range(n)) if n <= max_tokens else list(range(max_tokens // 2)) + list(range(n - max_tokens // 2, n))
    out = []
    prev = -1
    for i in keep:
        if prev >= 0 and i != prev + 1:
            out.append(f'<span class="gap">… {i - prev - 1} tokens …</span>')
        text = piece_text(pieces[i]).replace("\n", "↵\n")
        role = ROLE_NAMES[rec.roles[i]] if rec.roles is not None and 0 <= rec.roles[i] < len(ROLE_NAMES) else "-"
        title = f"#{i} id {ids[i]} label {labels[i]} role {role}: {status[i]}"
        out.append(f'<span class="tok {_HTML_CLASS[status[i]]}" data-status="{status[i]}" '
                   f'title="{html.escape(title)}">{html.escape(text)}</span>')
        prev = i
    return "".join(out)


def _svg_histogram(r: AuditResult) -> str:
    d = r.distribution()
    if not d.get("count"):
        return "<p>No sequence reaches training.</p>"
    counts = d["histogram"]["counts"]
    edges = d["histogram"]["edges"]
    w, h, pad = 720, 220, 36
    bw = (w - 2 * pad) / len(counts)
    top = max(counts) or 1
    bars = []
    for i, c in enumerate(counts):
        bh = (h - 2 * pad) * c / top
        x = pad + i * bw
        y = h - pad - bh
        color = "#c62828" if i == 0 else "#2e7d32"
        bars.append(f'<rect x="{x + 1:.1f}" y="{y:.1f}" width="{bw - 2:.1f}" height="{bh:.1f}" fill="{color}">'
                    f"<title>{edges[i]:.2f}–{edges[i + 1]:.2f}: {c} examples</title></rect>")
        if c:
            bars.append(f'<text x="{x + bw / 2:.1f}" y="{y - 3:.1f}" text-anchor="middle">{c}</text>')
    for i in range(0, len(edges), 4):
        x = pad + i * bw
        bars.append(f'<text x="{x:.1f}" y="{h - pad + 14}" text-anchor="middle">{edges[i]:.1f}</text>')
    axis = (f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="#444"/>'
            f'<text x="{w / 2}" y="{h - 4}" text-anchor="middle">supervised ratio per example</text>')
    return (f'<svg id="histogram" xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
            f'viewBox="0 0 {w} {h}" role="img" aria-label="histogram of per-example supervised ratio">'
            + "".join(bars) + axis + "</svg>")


def render_html(r: AuditResult, show: int = 10, max_tokens: int = 600) -> str:
    """One self-contained page (inline CSS and SVG, no script, no external resource)."""
    e = html.escape
    verdict_cls = "blocked" if r.blocking else "healthy"
    verdict = f"BLOCKED (exit {r.exit_code})" if r.blocking else "HEALTHY (exit 0)"
    findings = "".join(f'<li class="{f.severity}"><b>{e(f.check)}</b>: {e(f.message)}</li>' for f in r.findings)
    if not findings:
        findings = '<li class="ok">No finding.</li>'
    meta = [
        ("data", f"{r.data} ({r.data_source}, {r.data_format})"),
        ("tokenizer", f"{r.tokenizer} · chat template: {r.template_family or 'none'}"),
        ("TRL settings", _settings_line(r)),
    ]
    kv = "".join(f"<tr><td>{e(k)}</td><td>{e(v)}</td></tr>" for k, v in meta + _rows(r))
    examples = []
    for rec in _pick_examples(r, max(show, 1)):
        bad = " bad" if rec.category in ("fully_masked", "leakage") else ""
        examples.append(f'<div class="ex{bad}"><h3>{e(_title(rec))}</h3>'
                        f'<div class="toks">{_html_tokens(rec, r, max_tokens)}</div></div>')
    legend = ('<p class="legend"><span class="tok n">not a target</span><span class="tok m">masked</span>'
              '<span class="tok s">supervised</span><span class="tok l">prompt leakage</span></p>')
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>mask-monitor audit: {e(r.verdict)}</title>
<style>{_CSS}</style></head>
<body>
<h1>mask-monitor audit</h1>
<div class="verdict {verdict_cls}" id="verdict">{e(verdict)}</div>
<ul class="findings">{findings}</ul>
{"".join(f'<p class="fix"><b>Fix:</b> <code>{e(line)}</code></p>' for line in r.fix)}
<h2>Summary</h2>
<table class="kv" id="summary">{kv}</table>
<h2>Supervised ratio per example</h2>
{_svg_histogram(r)}
<h2>Worst examples</h2>
{legend}
{"".join(examples)}
</body></html>
"""
