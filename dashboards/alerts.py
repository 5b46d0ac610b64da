"""mask-monitor's Prometheus recording and alerting rules, as data, and their three renderings.

One definition (:data:`RECORDING_RULES`, :data:`ALERTS`) renders to:

* a Prometheus rule file (``prometheus/mask_monitor.rules.yml``, for ``rule_files:``);
* a kube-prometheus ``PrometheusRule`` (``kubernetes/prometheusrule.yaml``);
* Grafana-managed alert rules in Grafana's file-provisioning format
  (``grafana/alerting/mask_monitor.yaml``), built with ``grafana-foundation-sdk``.

Event alerts (aborts, all-masked batches, zero or non-finite loss) use the pattern
``increase(x[w]) > 0 or (max_over_time(x[w]) > 0 unless x offset w)``: the second branch catches a
counter whose first sample is already non-zero (a run that dies in its first step, before
Prometheus ever scraped a zero), and both branches read stored samples, so the alert still fires
for ``w`` after the exporter is gone.

Run ``python -m dashboards.generate`` from the repository root to write the files.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

__all__ = [
    "Alert",
    "RecordingRule",
    "RECORDING_RULES",
    "ALERTS",
    "prometheus_rules",
    "prometheus_rule_crd",
    "grafana_alert_provisioning",
    "GRAFANA_DATASOURCE_UID",
]

#: The Prometheus datasource UID the Grafana-managed rules query (edit to match your Grafana).
GRAFANA_DATASOURCE_UID = "prometheus"
GRAFANA_FOLDER = "mask-monitor"


@dataclass(frozen=True)
class RecordingRule:
    record: str
    expr: str


@dataclass(frozen=True)
class Alert:
    name: str
    expr: str
    severity: str
    summary: str
    description: str
    for_: str = "0m"


def _events(metric: str, window: str) -> str:
    """Series of ``metric`` (a counter) that increased within ``window``, new series included."""
    return (
        f"(increase({metric}[{window}]) > 0)\n"
        f"or\n(max_over_time({metric}[{window}]) > 0 unless {metric} offset {window})"
    )


def _job_ratio(num: str, den: str) -> str:
    return f"sum by (job) (rate(mask_monitor_{num}_total[5m]))\n/\nsum by (job) (rate(mask_monitor_{den}_total[5m]))"


RECORDING_RULES: tuple[RecordingRule, ...] = (
    RecordingRule("job:mask_monitor_masked_ratio:rate5m", _job_ratio("masked_tokens", "target_tokens")),
    RecordingRule(
        "job_rank:mask_monitor_masked_ratio:rate5m",
        "sum by (job, rank) (rate(mask_monitor_masked_tokens_total[5m]))\n"
        "/\nsum by (job, rank) (rate(mask_monitor_target_tokens_total[5m]))",
    ),
    RecordingRule(
        "job:mask_monitor_fully_masked_sequence_ratio:rate5m",
        _job_ratio("fully_masked_sequences", "sequences"),
    ),
    RecordingRule(
        "job:mask_monitor_prompt_leakage_ratio:rate5m",
        _job_ratio("prompt_leakage_tokens", "audited_supervised_tokens"),
    ),
    RecordingRule(
        "job:mask_monitor_response_coverage_ratio:rate5m",
        _job_ratio("supervised_assistant_content_tokens", "assistant_content_tokens"),
    ),
    RecordingRule(
        "job:mask_monitor_supervised_tokens:rate5m",
        "sum by (job) (rate(mask_monitor_supervised_tokens_total[5m]))",
    ),
)

_WHERE = "job {{ $labels.job }}, rank {{ $labels.rank }}"
COUNT = '{{ printf "%.0f" $value }}'  # increase() extrapolates: show whole batches

ALERTS: tuple[Alert, ...] = (
    Alert(
        name="MaskMonitorTrainingAborted",
        expr=_events("mask_monitor_aborts_total", "15m"),
        severity="critical",
        summary="mask-monitor aborted training ({{ $labels.reason }}) in " + _WHERE,
        description=(
            "mask-monitor stopped the run with MaskMonitorAbort, reason {{ $labels.reason }} "
            '({{ printf "%.0f" $value }} abort(s) in 15m). The training process has exited or is about to. '
            "Check the exception message in the job's log and the evidence JSON file it names: it "
            "lists the step, the counts and the decoded rows of the dead batch. "
            "Then run `mask-monitor audit` on the dataset with the same tokenizer and trainer settings."
        ),
    ),
    Alert(
        name="MaskMonitorAllMaskedBatches",
        expr=_events("mask_monitor_all_masked_batches_total", "10m"),
        severity="warning",
        summary=COUNT + " micro-batch(es) with every label masked in " + _WHERE + " (10m)",
        description=(
            "Micro-batches whose labels are all -100 produce a zero gradient: compute spent learning nothing "
            "(TRL reports loss 0.0, the Trainer hides a NaN). Check that the response/assistant marker is "
            "found in the tokenized text, that max_length does not truncate the responses away, and the "
            "dataset's completion_mask / assistant_masks; `mask-monitor audit` lists the fully masked "
            "examples."
        ),
    ),
    Alert(
        name="MaskMonitorZeroLoss",
        expr=_events("mask_monitor_zero_loss_batches_total", "10m"),
        severity="critical",
        summary=COUNT + " micro-batch(es) with supervised targets but loss exactly 0 in " + _WHERE + " (10m)",
        description=(
            "A language model never reaches an exact zero loss on real targets; a broken loss or label "
            "pipeline does. Check a custom compute_loss / loss function, the labels' ignore_index and "
            "dtype, and compute the loss of one batch by hand."
        ),
    ),
    Alert(
        name="MaskMonitorNonFiniteLoss",
        expr=_events("mask_monitor_non_finite_loss_batches_total", "10m"),
        severity="critical",
        summary=COUNT + " micro-batch(es) with a NaN or infinite loss in " + _WHERE + " (10m)",
        description=(
            "A NaN/inf loss poisons the update on every rank, and the Trainer's logging_nan_inf_filter "
            "hides it from the logged loss. Check the learning rate and gradient clipping (max_grad_norm), "
            "fp16 loss scaling (prefer bf16), and whether the weights are already NaN (resume from the "
            "last good checkpoint)."
        ),
    ),
    Alert(
        name="MaskMonitorPromptLeakage",
        expr="job:mask_monitor_prompt_leakage_ratio:rate5m > 0.05",
        for_="5m",
        severity="warning",
        summary="{{ $value | humanizePercentage }} of supervised tokens in job {{ $labels.job }} are prompt "
        "tokens (5m)",
        description=(
            "The loss is training the model to write the prompts (system, user turns, role headers). "
            "Masking is off or misplaced: TRL trains on the whole conversation by default. Check the "
            "trainer's masking settings: set assistant_only_loss=True with a template that has "
            "{% generation %} spans, or "
            "completion_only_loss=True with prompt/completion data; `mask-monitor audit --show 3` shows "
            "the tokens coloured by label."
        ),
    ),
    Alert(
        name="MaskMonitorHighMaskedRatio",
        expr="job:mask_monitor_masked_ratio:rate5m > 0.98",
        for_="15m",
        severity="warning",
        summary="{{ $value | humanizePercentage }} of target tokens in job {{ $labels.job }} are masked (5m, for 15m)",
        description=(
            "Almost no token of the batches is trained on: the run is burning compute on padding and "
            "prompts. Check max_length against prompt + response length (truncation may cut responses), "
            "the response marker, and packing settings. Raise the threshold if your task really has "
            "very long prompts and very short answers."
        ),
    ),
    Alert(
        name="MaskMonitorFullyMaskedSequences",
        expr="job:mask_monitor_fully_masked_sequence_ratio:rate5m > 0.05",
        for_="10m",
        severity="warning",
        summary="{{ $value | humanizePercentage }} of sequences in job {{ $labels.job }} have no supervised "
        "target (5m)",
        description=(
            "A rising share of sequences (rows or packed documents) contributes nothing to the loss. "
            "Check max_length (truncate the prompt, not the response), examples whose response marker is "
            "missing, and packing of pre-tokenized data (TRL drops fully masked examples only without "
            "packing and with max_length set); `mask-monitor audit` lists them."
        ),
    ),
    Alert(
        name="MaskMonitorResponseCoverageLow",
        expr="job:mask_monitor_response_coverage_ratio:rate5m < 0.9",
        for_="15m",
        severity="warning",
        summary="only {{ $value | humanizePercentage }} of assistant tokens in job {{ $labels.job }} are "
        "supervised (5m)",
        description=(
            "Part of the assistant responses is masked out, so the model never learns it (often the end "
            "of long answers cut by truncation, or a response marker found too late). Check max_length "
            "and the response marker with `mask-monitor audit --show 3`."
        ),
    ),
    Alert(
        name="MaskMonitorStalled",
        expr=(
            "(\n  time() - max by (job, rank) (max_over_time(mask_monitor_heartbeat_timestamp_seconds[1h]))"
            " > 900\n)\nunless on (job, rank)\n(\n"
            "  max by (job, rank) (max_over_time(mask_monitor_train_end_timestamp_seconds[1h]))\n"
            "  >= on (job, rank)\n"
            "  max by (job, rank) (max_over_time(mask_monitor_heartbeat_timestamp_seconds[1h]))\n)"
        ),
        severity="warning",
        summary="no optimizer step audited for {{ $value | humanizeDuration }} in " + _WHERE,
        description=(
            "The monitor's heartbeat stopped without a train end or an abort: the training process hangs "
            "(a collective waiting on a dead rank, a stuck data loader), was killed (OOM, preemption), or "
            "its exporter cannot be scraped. It keeps firing for up to 1h after the exporter is gone. "
            "Check the job's pods/processes and logs, and the Prometheus target's health. A long "
            "evaluation or checkpoint save without optimizer steps can also trip it."
        ),
    ),
)


# ----------------------------------------------------------------------------- Prometheus


def _alert_rule(a: Alert) -> dict[str, Any]:
    rule: dict[str, Any] = {"alert": a.name, "expr": a.expr}
    if a.for_ != "0m":
        rule["for"] = a.for_
    rule["labels"] = {"severity": a.severity}
    rule["annotations"] = {
        "summary": a.summary,
        "description": a.description,
    }
    return rule


def prometheus_rules() -> dict[str, Any]:
    """The rule file: one recording group, one alerting group."""
    return {
        "groups": [
            {
                "name": "mask_monitor.recording",
                "rules": [{"record": r.record, "expr": r.expr} for r in RECORDING_RULES],
            },
            {"name": "mask_monitor.alerts", "rules": [_alert_rule(a) for a in ALERTS]},
        ]
    }


def prometheus_rule_crd(name: str = "mask-monitor", namespace: str | None = None) -> dict[str, Any]:
    """The same rules as a kube-prometheus / prometheus-operator ``PrometheusRule`` object."""
    # kube-prometheus selects rules labelled prometheus=k8s, role=alert-rules; for the kube-prometheus-stack
    # Helm chart add `release: <your release>` (its default ruleSelector).
    labels = {"app.kubernetes.io/name": "mask-monitor", "prometheus": "k8s", "role": "alert-rules"}
    metadata: dict[str, Any] = {"name": name, "labels": labels}
    if namespace:
        metadata["namespace"] = namespace
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": metadata,
        "spec": copy.deepcopy(prometheus_rules()),
    }


# ----------------------------------------------------------------------------- Grafana


def _grafana_text(text: str) -> str:
    """Grafana alert templates expose the query value as $values.A.Value, not $value."""
    return text.replace("$value ", "$values.A.Value ")


def grafana_alert_provisioning(datasource_uid: str = GRAFANA_DATASOURCE_UID) -> dict[str, Any]:
    """Grafana-managed alert rules in Grafana's file-provisioning format (``provisioning/alerting/``).

    Each rule runs the Prometheus alert expression as an instant query (A) and fires when a series
    comes back with a value above 0 (threshold C), with the same ``for``, labels and annotations.
    """
    import json

    from grafana_foundation_sdk.builders import alerting, expr, prometheus
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models.alerting import RelativeTimeRange
    from grafana_foundation_sdk.models.dashboard import DataSourceRef

    rules = []
    for a in ALERTS:
        query_a = (
            alerting.Query("A")
            .datasource_uid(datasource_uid)
            .relative_time_range(RelativeTimeRange(from_val=3600, to=0))
            .model(
                prometheus.Dataquery()
                .expr(a.expr)
                .instant()
                .ref_id("A")
                .datasource(DataSourceRef(type_val="prometheus", uid=datasource_uid))
            )
        )
        threshold = (
            expr.TypeThreshold()
            .ref_id("C")
            .expression("A")
            .conditions(
                [
                    expr.ExprTypeThresholdConditions().evaluator(
                        expr.ExprTypeThresholdConditionsEvaluator().type("gt").params([0])
                    )
                ]
            )
        )
        query_c = (
            alerting.Query("C")
            .datasource_uid("__expr__")
            .relative_time_range(RelativeTimeRange(from_val=0, to=0))
            .model(threshold)
        )
        rule = (
            alerting.Rule(a.name)
            .uid("mask-monitor-" + a.name.removeprefix("MaskMonitor").lower())
            .condition("C")
            .queries([query_a, query_c])
            .no_data_state("OK")
            .exec_err_state("Error")
            .for_val(a.for_)
            .labels({"severity": a.severity})
            .annotations(
                {
                    "summary": _grafana_text(a.summary),
                    "description": _grafana_text(a.description),
                }
            )
            .is_paused(False)
        )
        built = json.loads(JSONEncoder(sort_keys=False).encode(rule.build()))
        for key in ("folderUID", "orgID", "ruleGroup"):  # group-level in the provisioning format
            built.pop(key, None)
        rules.append(built)
    return {
        "apiVersion": 1,
        "groups": [{"orgId": 1, "name": "mask-monitor", "folder": GRAFANA_FOLDER, "interval": "1m", "rules": rules}],
    }
