"""The run's verdict in W&B: the ``mask_monitor/run/...`` summary, the abort alert, the evidence file saved
with the run, and the failed finish.

None of it carries training text, whatever ``decoded_text`` says, except the saved copy of the evidence
file with ``decoded_text="all"``: with ``"local"`` or ``"none"`` the copy sent to W&B has its decoded
rows removed (:func:`mask_monitor.evidence.without_decoded_text`); token ids and counts stay.
"""

from __future__ import annotations

import os
from typing import Any

from ...errors import MaskMonitorAbort
from ...evidence import without_decoded_text, write_json_private
from ...reports import StepReport

__all__ = ["SUMMARY_PREFIX", "run_summary", "abort_summary", "alert_text", "update_summary", "save_evidence"]

SUMMARY_PREFIX = "mask_monitor/run/"

#: Keys of the callback's summary that are written in another form (or not at all).
_RESHAPED = ("worst_batch", "findings", "first_step", "aborted", "evidence_path", "batches")


def run_summary(summary: dict[str, Any]) -> dict[str, Any]:
    """The callback's run summary flattened for ``run.summary`` (``None`` values left out).

    >>> run_summary({"steps": 4, "masked_ratio": None, "findings": {"zero_loss": 2}, "template_family": None})
    {'steps': 4, 'findings/zero_loss': 2, 'template_family': 'none'}
    """
    out: dict[str, Any] = {}
    for k, v in summary.items():
        if k in _RESHAPED:
            continue
        if isinstance(v, (int, float, str)) and not isinstance(v, bool):
            out[k] = v
    worst = summary.get("worst_batch") or {}
    if worst:
        out["worst_micro_batch_masked_ratio"] = float(worst.get("masked_ratio", 0.0))
        out["worst_micro_batch_step"] = int(worst.get("step", 0))
        out["worst_micro_batch_rank"] = int(worst.get("rank", 0))
    for check, step in (summary.get("first_step") or {}).items():
        out[f"first_step/{check}"] = int(step)
    for check, n in (summary.get("findings") or {}).items():
        out[f"findings/{check}"] = int(n)
    out["template_family"] = summary.get("template_family") or "none"
    return out


def abort_summary(error: MaskMonitorAbort) -> dict[str, Any]:
    """The summary values of an abort: status, reason, step, rank and evidence path."""
    return {
        "status": "aborted",
        "abort_reason": error.reason,
        "abort_step": error.step,
        "abort_rank": error.rank,
        "evidence_path": error.evidence_path or "",
    }


def update_summary(run: Any, values: dict[str, Any]) -> None:
    run.summary.update({SUMMARY_PREFIX + k: v for k, v in values.items()})


def alert_text(error: MaskMonitorAbort, report: StepReport) -> tuple[str, str]:
    """Title and text of the abort alert: the reason, where, and the numbers behind it (no training text)."""
    t = report.total
    masked = "n/a" if t.masked_ratio is None else f"{t.masked_ratio:.1%}"
    title = f"mask-monitor stopped training: {error.reason} at step {error.step}"
    lines = [
        f"reason: {error.reason}",
        f"step: {error.step} (rank {error.rank} of {report.world_size})",
        f"supervised tokens: {int(t.supervised_tokens)} of {int(t.target_tokens)} targets "
        f"(masked {masked}) in {int(t.micro_batches)} micro-batch(es)",
        f"fully masked sequences: {int(t.fully_masked_sequences)} of {int(t.sequences)}; "
        f"all-masked micro-batches: {int(t.all_masked_batches)}; zero-loss micro-batches: "
        f"{int(t.zero_loss_batches)}; non-finite-loss micro-batches: {int(t.non_finite_loss_batches)}",
    ]
    if t.template_audited and t.prompt_leakage_ratio is not None:
        lines.append(
            f"prompt leakage: {int(t.prompt_leakage_tokens)} of {int(t.audited_supervised_tokens)} "
            f"supervised ({t.prompt_leakage_ratio:.1%})"
        )
    lines.append(f"evidence: {error.evidence_path or 'not written'}")
    first = (error.message or "").splitlines()[0] if error.message else ""
    if first:
        lines += ["", first]
    return title, "\n".join(lines)[:2000]


def save_evidence(run: Any, path: str, doc: dict[str, Any], *, token_text: bool) -> None:
    """Save a copy of the evidence document with the run's files (``files/<name of path>``), its decoded
    rows removed unless ``token_text``. The copy is written into the run directory (never a link to the
    local file, which may hold decoded text) and uploaded now."""
    folder = run.dir
    dest = os.path.join(folder, os.path.basename(path))
    write_json_private(dest, doc if token_text else without_decoded_text(doc))
    run.save(dest, base_path=folder, policy="now")
