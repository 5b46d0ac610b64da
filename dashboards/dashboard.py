"""The mask-monitor Grafana dashboard, built with ``grafana-foundation-sdk`` (Grafana 11.6 line).

:func:`build` returns the dashboard as a JSON-ready dict; ``python -m dashboards.generate`` writes
it to ``grafana/mask_monitor.json``. Variables: ``datasource`` (a Prometheus), ``job`` and ``rank``
(multi-select, "All" by default). Job-wide panels sum counters over every rank of the selected jobs
(``sum by (job)``); per-rank panels break the same series down by ``rank``. Ratios are computed
from counters (``rate(a) / rate(b)``), so a single bad batch between two scrapes is never missed.
An annotation marks aborts.

:data:`PANELS` lists every panel's title and PromQL expressions (for tests and docs).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from mask_monitor.counters import COUNTERS

#: The chat-template counters exported to Prometheus, in declaration order (read, never relisted).
TEMPLATE_COUNTERS: tuple[str, ...] = tuple(c.name for c in COUNTERS if c.template and c.prometheus)

__all__ = ["build", "PANELS", "ANNOTATION_EXPR", "Panel", "UID"]

UID = "mask-monitor"
DS = "${datasource}"
#: job-wide selector (every rank of the selected jobs) and per-rank selector
J = '{job=~"$job"}'
R = '{job=~"$job", rank=~"$rank"}'
RI = "[$__rate_interval]"


def _counters(unit: str) -> tuple[str, ...]:
    """The exported counters of one unit, in declaration order (mask_monitor.counters is the one list)."""
    return tuple(c.name for c in COUNTERS if c.prometheus and c.unit == unit)


def _ratio(num: str, den: str, by: str, sel: str = J) -> str:
    return (
        f"sum by ({by}) (rate(mask_monitor_{num}_total{sel}{RI}))\n"
        f"/\nsum by ({by}) (rate(mask_monitor_{den}_total{sel}{RI}))"
    )


@dataclass(frozen=True)
class Panel:
    kind: str  # timeseries | stat | heatmap | table
    title: str
    description: str
    unit: str
    targets: tuple[tuple[str, str], ...]  # (expr, legend)
    width: int = 12
    height: int = 8
    row: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


ANNOTATION_EXPR = f"max by (job, rank, reason) (mask_monitor_aborts_total{J}) > 0"

_ROWS: list[tuple[str, list[Panel]]] = [
    (
        "Overview (job-wide)",
        [
            Panel(
                "stat",
                "Optimizer step",
                "The last optimizer step audited (highest over the selected ranks).",
                "none",
                ((f"max by (job) (mask_monitor_optimizer_step{R})", "{{job}}"),),
                width=4,
                height=5,
            ),
            Panel(
                "stat",
                "Masked share of targets",
                "Share of target tokens whose label is -100, over all ranks (rate of masked / target).",
                "percentunit",
                ((_ratio("masked_tokens", "target_tokens", "job"), "{{job}}"),),
                width=4,
                height=5,
                extra={"thresholds": [(None, "green"), (0.9, "orange"), (0.98, "red")]},
            ),
            Panel(
                "stat",
                "Supervised tokens / s",
                "Tokens the loss really trains on per second, summed over ranks.",
                "short",
                ((f"sum by (job) (rate(mask_monitor_supervised_tokens_total{J}{RI}))", "{{job}}"),),
                width=4,
                height=5,
            ),
            Panel(
                "stat",
                "Aborts",
                "MaskMonitorAbort raised in the time range, by reason (every rank raises in the same step).",
                "none",
                (
                    (
                        f"max by (job, reason) (max_over_time(mask_monitor_aborts_total{J}[$__range])) > 0",
                        "{{reason}}",
                    ),
                ),
                width=4,
                height=5,
                extra={"thresholds": [(None, "green"), (1, "red")], "no_value": "0"},
            ),
            Panel(
                "stat",
                "Ranks reporting / world size",
                "Ranks whose exporter is scraped now, and the job's world size.",
                "none",
                (
                    (f"count by (job) (mask_monitor_heartbeat_timestamp_seconds{J})", "reporting"),
                    (f"max by (job) (mask_monitor_world_size{J})", "world size"),
                ),
                width=4,
                height=5,
            ),
            Panel(
                "stat",
                "Heartbeat age",
                "Seconds since the monitor's last sign of life (a step, a log, the end). "
                "MaskMonitorStalled fires above 15 minutes.",
                "s",
                ((f"time() - max by (job) (mask_monitor_heartbeat_timestamp_seconds{J})", "{{job}}"),),
                width=4,
                height=5,
                extra={"thresholds": [(None, "green"), (300, "orange"), (900, "red")]},
            ),
        ],
    ),
    (
        "Masking",
        [
            Panel(
                "timeseries",
                "Masked share of target tokens",
                "rate(masked tokens) / rate(target tokens): job-wide, and per rank for the selected ranks.",
                "percentunit",
                (
                    (_ratio("masked_tokens", "target_tokens", "job"), "{{job}} (all ranks)"),
                    (_ratio("masked_tokens", "target_tokens", "job, rank", R), "rank {{rank}}"),
                ),
            ),
            Panel(
                "heatmap",
                "Per-micro-batch masked ratio",
                "Distribution of the masked share of each micro-batch's target tokens (buckets dense near "
                "1). A band at 1.0 means micro-batches with nothing to learn.",
                "percentunit",
                (
                    (
                        f"sum by (le) (increase(mask_monitor_micro_batch_masked_ratio_bucket{R}{RI}))",
                        "{{le}}",
                    ),
                ),
                extra={"format": "heatmap"},
            ),
            Panel(
                "timeseries",
                "Tokens / s",
                "Target, supervised and masked tokens per second, summed over the selected ranks.",
                "short",
                tuple(
                    (f"sum by (job) (rate(mask_monitor_{m}_tokens_total{R}{RI}))", f"{m} {{{{job}}}}")
                    for m in ("target", "supervised", "masked", "supervised_padding")
                ),
            ),
            Panel(
                "timeseries",
                "Sequences without / with full supervision",
                "Share of sequences (rows or packed documents) with no supervised target, and with no masked "
                "target at all.",
                "percentunit",
                (
                    (_ratio("fully_masked_sequences", "sequences", "job", R), "fully masked {{job}}"),
                    (_ratio("unmasked_sequences", "sequences", "job", R), "unmasked {{job}}"),
                ),
            ),
            Panel(
                "timeseries",
                "Micro-batch events",
                "Every micro-batch counter (mask_monitor.counters): audited, labels unreadable, with a loss, every "
                "label masked, no label masked, loss exactly 0, a NaN/inf loss, per rate interval and rank.",
                "short",
                tuple(
                    (f"sum by (rank) (increase(mask_monitor_{m}_total{R}{RI}))", f"{m} rank {{{{rank}}}}")
                    for m in _counters("micro-batches")
                ),
            ),
            Panel(
                "timeseries",
                "Sequences / s",
                "Every sequence counter (mask_monitor.counters) per second, per rank.",
                "short",
                tuple(
                    (f"sum by (rank) (rate(mask_monitor_{m}_total{R}{RI}))", f"{m} rank {{{{rank}}}}")
                    for m in _counters("sequences")
                ),
            ),
        ],
    ),
    (
        "Last optimizer step (per rank)",
        [
            Panel(
                "timeseries",
                "Last step: masked share",
                "Masked share of the last step's targets and of its worst micro-batch (sampled at scrape "
                "time: use the counters above to see every batch).",
                "percentunit",
                (
                    (f"mask_monitor_last_step_masked_ratio{R}", "step rank {{rank}}"),
                    (f"mask_monitor_last_step_max_masked_ratio{R}", "worst micro-batch rank {{rank}}"),
                ),
            ),
            Panel(
                "timeseries",
                "Last step: tokens and sequences",
                "Target and supervised tokens and fully masked sequences in the last step.",
                "short",
                (
                    (f"mask_monitor_last_step_target_tokens{R}", "target rank {{rank}}"),
                    (f"mask_monitor_last_step_supervised_tokens{R}", "supervised rank {{rank}}"),
                    (f"mask_monitor_last_step_fully_masked_sequences{R}", "fully masked seq rank {{rank}}"),
                ),
            ),
            Panel(
                "timeseries",
                "Last step: loss",
                "Mean micro-batch loss of the last step (gaps where it was NaN or not reported).",
                "none",
                ((f"mask_monitor_last_step_loss{R}", "rank {{rank}}"),),
            ),
            Panel(
                "timeseries",
                "Optimizer step and steps / s",
                "The last optimizer step per rank, and optimizer steps audited per second.",
                "none",
                (
                    (f"mask_monitor_optimizer_step{R}", "step rank {{rank}}"),
                    (f"rate(mask_monitor_optimizer_steps_total{R}{RI})", "steps/s rank {{rank}}"),
                ),
            ),
        ],
    ),
    (
        "Chat template audit",
        [
            Panel(
                "timeseries",
                "Prompt leakage, response coverage, end-of-turn supervision",
                "Share of supervised targets that are prompt tokens (should be ~0), of assistant content "
                "that is supervised and of assistant end-of-turn tokens supervised (should be ~1). Needs a "
                "recognised chat template.",
                "percentunit",
                (
                    (
                        _ratio("prompt_leakage_tokens", "audited_supervised_tokens", "job", R),
                        "prompt leakage {{job}}",
                    ),
                    (
                        _ratio("supervised_assistant_content_tokens", "assistant_content_tokens", "job", R),
                        "response coverage {{job}}",
                    ),
                    (_ratio("supervised_eot_turns", "assistant_turns", "job", R), "end-of-turn {{job}}"),
                ),
            ),
            Panel(
                "timeseries",
                "Last step: prompt leakage and response coverage",
                "The same ratios for the last step only, per rank.",
                "percentunit",
                (
                    (f"mask_monitor_last_step_prompt_leakage_ratio{R}", "prompt leakage rank {{rank}}"),
                    (f"mask_monitor_last_step_response_coverage_ratio{R}", "response coverage rank {{rank}}"),
                ),
            ),
            Panel(
                "timeseries",
                "Template audit tokens / s",
                "Audited supervised tokens, prompt tokens supervised, assistant headers supervised, assistant content "
                "tokens (all and "
                "supervised), assistant turns and supervised end-of-turn tokens, responses (all, unterminated, "
                "truncated), per second.",
                "short",
                tuple(
                    (f"sum by (job) (rate(mask_monitor_{m}_total{R}{RI}))", f"{m} {{{{job}}}}")
                    for m in TEMPLATE_COUNTERS
                ),
                width=24,
            ),
        ],
    ),
    (
        "Events and health",
        [
            Panel(
                "timeseries",
                "Aborts and check warnings (cumulative)",
                "Aborts by reason (every rank raises in the same step) and steps on which a check fired with "
                "action 'warn', by check: running totals of the selected ranks (only non-zero ones).",
                "none",
                (
                    (
                        f"sum by (reason) (max_over_time(mask_monitor_aborts_total{R}{RI})) > 0",
                        "abort {{reason}}",
                    ),
                    (
                        f"sum by (reason) (max_over_time(mask_monitor_check_warnings_total{R}{RI})) > 0",
                        "warn {{reason}}",
                    ),
                ),
            ),
            Panel(
                "timeseries",
                "Heartbeat age per rank",
                "Seconds since each rank's last step/log; a rank that stops while others go on is stuck.",
                "s",
                ((f"time() - mask_monitor_heartbeat_timestamp_seconds{R}", "rank {{rank}}"),),
            ),
            Panel(
                "table",
                "Runs",
                "One row per rank and run seen in the time range: run name, W&B run id, chat template family, "
                "mask-monitor version, start and end (end empty while running).",
                "none",
                (
                    (f"last_over_time(mask_monitor_run_info{R}[$__range])", "info"),
                    (f"last_over_time(mask_monitor_train_start_timestamp_seconds{R}[$__range]) * 1000", "start"),
                    (f"last_over_time(mask_monitor_train_end_timestamp_seconds{R}[$__range]) * 1000", "end"),
                ),
                width=24,
                extra={"format": "table"},
            ),
        ],
    ),
]

PANELS: tuple[Panel, ...] = tuple(p for _, panels in _ROWS for p in panels)


def _ds() -> Any:
    from grafana_foundation_sdk.models.dashboard import DataSourceRef

    return DataSourceRef(type_val="prometheus", uid=DS)


def _thresholds(steps: list[tuple[float | None, str]]) -> Any:
    from grafana_foundation_sdk.builders import dashboard as db
    from grafana_foundation_sdk.models.dashboard import Threshold, ThresholdsMode

    return db.ThresholdsConfig().mode(ThresholdsMode.ABSOLUTE).steps([Threshold(value=v, color=c) for v, c in steps])


def _panel(p: Panel, panel_id: int) -> Any:
    from grafana_foundation_sdk.builders import heatmap, prometheus, stat, table, timeseries
    from grafana_foundation_sdk.models.prometheus import PromQueryFormat

    builder: Any = {
        "timeseries": timeseries.Panel,
        "stat": stat.Panel,
        "heatmap": heatmap.Panel,
        "table": table.Panel,
    }[p.kind]()
    builder = (
        builder.id(panel_id).title(p.title).description(p.description).datasource(_ds()).span(p.width).height(p.height)
    )
    if p.kind != "heatmap":
        builder = builder.unit(p.unit)
    for i, (expr, legend) in enumerate(p.targets):
        q = prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(chr(ord("A") + i)).datasource(_ds())
        fmt = p.extra.get("format")
        if fmt == "heatmap":
            q = q.format(PromQueryFormat.HEATMAP)
        elif fmt == "table":
            q = q.format(PromQueryFormat.TABLE).instant()
        builder = builder.with_target(q)
    if "thresholds" in p.extra:
        builder = builder.thresholds(_thresholds(p.extra["thresholds"]))
    if "no_value" in p.extra:
        builder = builder.no_value(p.extra["no_value"])
    if p.kind == "timeseries":
        from grafana_foundation_sdk.models.common import GraphDrawStyle

        builder = builder.fill_opacity(10).line_width(1)
        if p.extra.get("draw_style") == "bars":
            builder = builder.draw_style(GraphDrawStyle.BARS)
        if p.unit == "percentunit":
            builder = builder.min(0).max(1)
    if p.kind == "heatmap":
        from grafana_foundation_sdk.builders import heatmap as hm
        from grafana_foundation_sdk.models.common import HeatmapCellLayout

        builder = builder.calculate(False).y_axis(hm.YAxisConfig().unit(p.unit)).cell_gap(1)
        builder = builder.rows_frame(hm.RowsHeatmapOptions().layout(HeatmapCellLayout.LE))
    if p.kind == "table":
        from grafana_foundation_sdk.models.dashboard import DataTransformerConfig, DynamicConfigValue

        rename = {"Value #B": "start", "Value #C": "end"}
        hidden = {"Time": True, "__name__": True, "Value #A": True}
        builder = builder.with_transformation(DataTransformerConfig(id_val="merge", options={}))
        builder = builder.with_transformation(
            DataTransformerConfig(id_val="organize", options={"excludeByName": hidden, "renameByName": rename})
        )
        for name in rename.values():
            builder = builder.override_by_name(name, [DynamicConfigValue(id_val="unit", value="dateTimeAsIso")])
    return builder


def build() -> dict[str, Any]:
    """The dashboard as a JSON-ready dict (deterministic: same code, same output)."""
    from grafana_foundation_sdk.builders import dashboard as db
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models.dashboard import DashboardCursorSync, VariableRefresh, VariableSort

    d = (
        db.Dashboard("mask-monitor: what the loss really sees")
        .uid(UID)
        .description(
            "Label masking audit of transformers/TRL training runs exported by mask-monitor: masked share, "
            "dead (all-masked) batches, zero/NaN loss, prompt leakage, aborts, per job and per rank."
        )
        .tags(["mask-monitor", "training", "sft"])
        .editable()
        .tooltip(DashboardCursorSync.CROSSHAIR)
        .refresh("30s")
        .time("now-6h", "now")
        .timezone("browser")
        .with_variable(db.DatasourceVariable("datasource").label("Prometheus").type("prometheus"))
        .with_variable(
            db.QueryVariable("job")
            .label("Job")
            .description("Prometheus job label of the training job(s)")
            .datasource(_ds())
            .query("label_values(mask_monitor_optimizer_step, job)")
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(VariableSort.ALPHABETICAL_ASC)
            .multi(True)
            .include_all(True)
            .all_value(".*")
        )
        .with_variable(
            db.QueryVariable("rank")
            .label("Rank")
            .description('Global rank ("all" when a large job exports aggregated totals from rank 0)')
            .datasource(_ds())
            .query('label_values(mask_monitor_optimizer_step{job=~"$job"}, rank)')
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(VariableSort.NUMERICAL_ASC)
            .multi(True)
            .include_all(True)
            .all_value(".*")
        )
        .annotation(
            db.AnnotationQuery()
            .name("mask-monitor aborts")
            .datasource(_ds())
            .enable(True)
            .icon_color("red")
            .expr(ANNOTATION_EXPR)
        )
    )
    panel_id = 0
    for title, panels in _ROWS:
        panel_id += 1
        d = d.with_row(db.Row(title).id(panel_id))
        for p in panels:
            panel_id += 1
            d = d.with_panel(_panel(p, panel_id))
    out = json.loads(JSONEncoder(sort_keys=True).encode(d.build()))
    # Prometheus annotation options Grafana reads next to `expr`.
    for ann in out.get("annotations", {}).get("list", []):
        if ann.get("expr") == ANNOTATION_EXPR:
            ann["titleFormat"] = "mask-monitor abort: {{reason}}"
            ann["textFormat"] = "job {{job}}, rank {{rank}}"
            ann["tagKeys"] = "job,rank,reason"
            ann["step"] = "15s"
    return out
