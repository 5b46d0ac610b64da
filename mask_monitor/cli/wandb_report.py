"""``mask-monitor wandb-report``: a W&B Report of the monitor's metrics next to the loss.

Builds the report with ``wandb-workspaces`` (the ``report`` extra): the masked-label ratio on the
same chart as ``train/loss``, token counts, the worst micro-batch, dead-batch and broken-loss
counts, how often each check fired, the chat-template audit, the evidence table of worst sequences,
and a runs table of each run's verdict (status, abort reason and step, evidence path). Every chart
uses ``train/global_step`` as its x-axis, as the sink logs it.

Building the report is offline: ``--dry-run`` prints its sections, panels and metric keys
(``--json`` prints the full panel specs). Saving it needs a W&B login (``wandb login`` or
``WANDB_API_KEY``); without one the command says so and exits 2.

Example::

    mask-monitor wandb-report --entity my-team --project sft --run-ids 1a2b3c 4d5e6f --dry-run
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from typing import Any

from .._version import __version__
from ..sinks.wandb import HISTORY_KEYS, PREFIX, STEP_METRIC, SUMMARY_PREFIX, TABLE_KEY
from ._errors import EXIT_OK, UsageError

__all__ = ["register", "run", "build_report", "report_spec", "SECTIONS", "RUN_COLUMNS"]

LOSS_KEY = "train/loss"
_FINDING_KEYS = tuple(k for k in HISTORY_KEYS if k.startswith(PREFIX + "findings/"))

#: (heading, text, [(panel title, [y keys])]) of each section of the report, in order.
SECTIONS: tuple[tuple[str, str, tuple[tuple[str, tuple[str, ...]], ...]], ...] = (
    (
        "Masked labels next to the loss",
        "The share of target tokens whose label is -100 (token-weighted over all ranks, per Trainer logging "
        "window), on the same chart as the training loss: a loss that looks healthy while the masked ratio "
        "climbs to 1 is a run that learns nothing.",
        (
            ("Loss and masked-label ratio", (LOSS_KEY, PREFIX + "masked_ratio")),
            ("Target tokens: supervised and masked", (
                PREFIX + "target_tokens", PREFIX + "supervised_tokens", PREFIX + "masked_tokens")),
            ("Worst micro-batch masked ratio", (PREFIX + "worst_batch_masked_ratio",)),
            ("Supervised-token and fully masked sequence ratios", (
                PREFIX + "supervised_ratio", PREFIX + "fully_masked_sequence_ratio")),
        ),
    ),
    (
        "Dead batches and broken loss",
        "Micro-batches with no supervised label, an exactly zero loss on real targets, or a NaN/inf loss "
        "(the Trainer's NaN filter hides the latter from train/loss), and how often each check fired.",
        (
            ("Dead micro-batches and loss faults", (
                PREFIX + "all_masked_batches",
                PREFIX + "zero_loss_batches",
                PREFIX + "non_finite_loss_batches",
            )),
            ("Fully masked and unmasked sequences, supervised padding", (
                PREFIX + "fully_masked_sequences", PREFIX + "unmasked_sequences",
                PREFIX + "supervised_padding_tokens")),
            ("Checks fired per logging window", _FINDING_KEYS),
        ),
    ),
    (
        "Chat template audit",
        "Only for runs whose chat template was recognised: prompt tokens trained on (leakage), assistant "
        "tokens left unsupervised, and end-of-turn tokens supervised (the model learns to stop).",
        (
            ("Prompt leakage ratio", (PREFIX + "prompt_leakage_ratio",)),
            ("Response coverage and end-of-turn supervision", (
                PREFIX + "response_coverage_ratio", PREFIX + "eot_supervised_ratio")),
            ("Responses that end without their end-of-turn token (unterminated; truncated apart)", (
                PREFIX + "assistant_responses", PREFIX + "unterminated_responses",
                PREFIX + "truncated_responses")),
        ),
    ),
)

#: Summary columns pinned in the runs table: each run's verdict.
RUN_COLUMNS: tuple[str, ...] = tuple(
    f"summary:{SUMMARY_PREFIX}{k}"
    for k in (
        "status",
        "abort_reason",
        "abort_step",
        "masked_ratio",
        "worst_micro_batch_masked_ratio",
        "fully_masked_sequences",
        "template_family",
        "evidence_path",
    )
)

_RUN_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


def _workspaces() -> Any:
    try:
        import wandb_workspaces.reports.v2 as wr  # noqa: PLC0415 - optional extra
    except ImportError as exc:
        raise UsageError(
            "wandb-workspaces is not installed: pip install 'mask-monitor[report]'"
        ) from exc
    return wr


def build_report(
    entity: str,
    project: str,
    run_ids: Sequence[str] | None = None,
    title: str | None = None,
    description: str | None = None,
) -> Any:
    """The report as ``wandb_workspaces.reports.v2.Report`` objects (no network, no login).

    Example (needs the ``report`` extra)::

        report = build_report("my-team", "sft", run_ids=["1a2b3c"])
        report.save()   # needs a login
    """
    wr = _workspaces()
    ids = list(run_ids or [])
    bad = [r for r in ids if not _RUN_ID.match(r)]
    if bad:
        raise UsageError(f"not a W&B run id: {', '.join(map(repr, bad))} (letters, digits, '-' and '_' only)")
    filters = "Metric('ID') in [" + ", ".join(repr(r) for r in ids) + "]" if ids else ""

    def runset() -> Any:
        return wr.Runset(entity=entity, project=project, name="mask-monitor runs", filters=filters,
                         pinned_columns=list(RUN_COLUMNS))

    scope = f"runs {', '.join(ids)}" if ids else f"all runs of {entity}/{project}"
    blocks: list[Any] = [
        wr.P(
            f"What the loss really saw, per Trainer logging step, for {scope}: label masking audited on "
            f"every micro-batch by mask-monitor {__version__}. The x-axis of every chart is {STEP_METRIC}."
        ),
    ]
    for heading, text, panels in SECTIONS:
        blocks += [
            wr.H2(heading),
            wr.P(text),
            wr.PanelGrid(
                runsets=[runset()],
                panels=[wr.LinePlot(title=t, x=STEP_METRIC, y=list(ys)) for t, ys in panels],
            ),
        ]
    blocks += [
        wr.H2("Worst sequences"),
        wr.P(
            "The worst sequences each run logged, with their tokens coloured by label status: green "
            "trained on, grey masked (-100), red prompt tokens trained on."
        ),
        wr.PanelGrid(
            runsets=[runset()],
            panels=[wr.WeavePanelSummaryTable(table_name=TABLE_KEY, layout=wr.Layout(w=24, h=12))],
        ),
        wr.H2("Verdicts"),
        wr.P(
            "Each run's verdict from its summary: completed or aborted, the abort reason and step, run-wide "
            "masked ratio, the worst micro-batch, the template family and the evidence file."
        ),
        wr.PanelGrid(
            runsets=[runset()], panels=[wr.RunComparer(diff_only="split", layout=wr.Layout(w=24, h=10))]
        ),
    ]
    return wr.Report(
        entity=entity,
        project=project,
        title=title or f"mask-monitor: label masking in {project}",
        description=description or "Label masking, dead batches and prompt leakage, audited by mask-monitor.",
        blocks=blocks,
    )


def report_spec(report: Any) -> dict[str, Any]:
    """An offline, JSON-ready view of the report: sections, run sets, and each panel's W&B spec.

    Panels are serialised exactly as W&B stores them (their ``viewType`` and ``config``); run sets as
    their filter and pinned columns (their full spec needs the server's project id).
    """
    wr = _workspaces()
    sections: list[dict[str, Any]] = []
    current: dict[str, Any] = {"heading": None, "text": [], "panels": [], "runsets": []}
    for block in report.blocks:
        if isinstance(block, wr.H2):
            if current["heading"] is not None or current["panels"] or current["text"]:
                sections.append(current)
            current = {"heading": _text(block.text), "text": [], "panels": [], "runsets": []}
        elif isinstance(block, wr.P):
            current["text"].append(_text(block.text))
        elif isinstance(block, wr.PanelGrid):
            current["runsets"] += [
                {"entity": rs.entity, "project": rs.project, "filters": rs.filters,
                 "pinned_columns": list(rs.pinned_columns)}
                for rs in block.runsets
            ]
            current["panels"] += [p._to_model().model_dump(by_alias=True, exclude_none=True, mode="json")
                                  for p in block.panels]
    sections.append(current)
    return {
        "title": report.title,
        "description": report.description,
        "entity": report.entity,
        "project": report.project,
        "sections": sections,
    }


def spec_metric_keys(spec: dict[str, Any]) -> list[str]:
    """Every y-axis metric key of the line plots of a :func:`report_spec`, in order."""
    keys: list[str] = []
    for section in spec["sections"]:
        for panel in section["panels"]:
            keys += panel.get("config", {}).get("metrics", []) or []
    return keys


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "".join(_text(v) for v in value)
    return str(getattr(value, "text", value))


def _describe(spec: dict[str, Any]) -> str:
    lines = [f"W&B report {spec['title']!r} for {spec['entity']}/{spec['project']} (not saved: --dry-run)"]
    for section in spec["sections"]:
        if section["heading"]:
            lines.append(f"## {section['heading']}")
        for panel in section["panels"]:
            cfg = panel.get("config", {})
            metrics = cfg.get("metrics")
            if metrics:
                lines.append(f"  - {cfg.get('chartTitle')}: {', '.join(metrics)} vs {cfg.get('xAxis')}")
            elif panel.get("viewType") == "Weave":
                lines.append(f"  - table {TABLE_KEY} (per run)")
            else:
                lines.append(f"  - {panel.get('viewType')}: " + ", ".join(RUN_COLUMNS))
    runsets = [rs for s in spec["sections"] for rs in s["runsets"]]
    if runsets and runsets[0]["filters"]:
        lines.append(f"runs: {runsets[0]['filters']}")
    return "\n".join(lines)


def _require_login() -> None:
    try:
        import wandb  # noqa: PLC0415

        wandb.Api()
    except ImportError as exc:
        raise UsageError("wandb is not installed: pip install 'mask-monitor[report]'") from exc
    except Exception as exc:  # wandb.errors.UsageError when there is no API key
        raise UsageError(
            "saving a W&B report needs a login: run `wandb login` or set WANDB_API_KEY "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no API key'}); "
            "use --dry-run to build the report without saving"
        ) from exc


def run(args: argparse.Namespace) -> int:
    report = build_report(args.entity, args.project, run_ids=args.run_ids, title=args.title)
    spec = report_spec(report)
    if args.dry_run:
        print(json.dumps(spec, indent=2) if args.json else _describe(spec))
        return EXIT_OK
    _require_login()
    try:
        report.save()
    except Exception as exc:  # noqa: BLE001 - one line for the user, not a traceback
        raise UsageError(f"could not save the W&B report: {type(exc).__name__}: {exc}") from exc
    url = getattr(report, "url", None)
    if args.json:
        out = {"url": url, "title": spec["title"], "entity": args.entity, "project": args.project}
        print(json.dumps(out))
    else:
        print(f"saved W&B report {spec['title']!r}: {url}")
    return EXIT_OK


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "wandb-report",
        help="build (and save) a W&B Report of the monitor's metrics next to the loss",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    p.add_argument("--entity", required=True, help="W&B entity (user or team) owning the project")
    p.add_argument("--project", required=True, help="W&B project holding the runs")
    p.add_argument("--run-ids", nargs="+", default=None, metavar="ID",
                   help="only these runs (default: every run of the project)")
    p.add_argument("--title", default=None, help="report title")
    p.add_argument("--dry-run", action="store_true",
                   help="build the report offline and print it; do not save (no login needed)")
    p.add_argument("--json", action="store_true",
                   help="machine-readable output: the full report spec with --dry-run, else the saved URL")
    p.set_defaults(func=run)


if __name__ == "__main__":  # pragma: no cover
    from .main import main

    sys.exit(main(["wandb-report", *sys.argv[1:]]))
