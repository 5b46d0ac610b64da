"""What a user sees with NO logging configured: real runs in a subprocess, stderr read back.

The template line, the window lines, every warning and the end-of-run summary reach stderr through the
``mask_monitor`` library logger's own default handler (INFO by default, ``MASK_MONITOR_VERBOSITY`` to change
it, like ``TRANSFORMERS_VERBOSITY``); an abort is said as an abort (never "warnings: none" before it); TRL
dropping every row is said as such; micro-batches whose labels cannot be read are said to be NOT audited.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from trainer_utils import expected_counts, rows

pytestmark = pytest.mark.slow
trl = pytest.importorskip("trl")
TRL_1 = int(trl.__version__.split(".")[0]) >= 1
SCRIPT = Path(__file__).parent / "scripts" / "user_view.py"


def run(scenario: str, tok_path: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MASK_MONITOR_", "TRANSFORMERS_VERBOSITY"))}
    proc = subprocess.run([sys.executable, str(SCRIPT), scenario, tok_path, str(tmp_path / scenario)],
                          capture_output=True, text=True, timeout=600, env={**clean, **env})
    return proc


def mm_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "mask-monitor" in line]


def test_healthy_run_shows_template_windows_and_summary(tok_path, zephyr_tokenizer, tmp_path):
    proc = run("healthy", tok_path, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = mm_lines(proc.stderr)
    exp = expected_counts(rows(zephyr_tokenizer, "assistant"))
    assert lines[0] == ("mask-monitor: chat template: zephyr (registry): assistant '<|assistant|>\\n', end of turn "
                        "'</s>', user '<|user|>\\n', system '<|system|>\\n'")
    assert sum(line.startswith("mask-monitor steps ") for line in lines) == 2  # logging_steps=2, 4 steps
    assert lines[-1] == (f"mask-monitor summary: 4 steps, 4 micro-batches, {exp['supervised_tokens']}/"
                         f"{exp['target_tokens']} target tokens supervised (masked "
                         f"{exp['masked_tokens'] / exp['target_tokens']:.1%}); warnings: none")


def test_verbosity_follows_mask_monitor_verbosity(tok_path, tmp_path):
    proc = run("healthy", tok_path, tmp_path, MASK_MONITOR_VERBOSITY="warning")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert mm_lines(proc.stderr) == []  # template, windows and summary are INFO records


@pytest.mark.skipif(not TRL_1, reason="TRL < 1 does not drop fully masked rows while preparing data")
def test_trl_dropping_every_row_is_said_as_such(tok_path, tmp_path):
    proc = run("dropped", tok_path, tmp_path)
    assert proc.returncode == 3 and "ABORT reason=all_masked step=0" in proc.stdout, proc.stderr[-3000:]
    assert ("mask-monitor [all_masked]: no example reaches training: all 8 examples were dropped as fully masked "
            "(8 with no supervised label at all) when the dataset was prepared") in proc.stderr
    assert "Evidence: " in proc.stderr and "markers not found" not in proc.stderr
    assert "warnings: none" not in proc.stderr and "num_samples should be" not in proc.stderr


def test_abort_is_said_instead_of_warnings_none(tok_path, tmp_path):
    proc = run("dead", tok_path, tmp_path)
    assert proc.returncode == 3 and "ABORT reason=all_masked step=1" in proc.stdout, proc.stderr[-3000:]
    lines = mm_lines(proc.stderr)
    error = next(i for i, line in enumerate(lines) if "[all_masked]: no label in optimizer step 1" in line)
    summary = [line for line in lines if line.startswith("mask-monitor summary:")]
    assert len(summary) == 1 and summary[0].endswith("; ABORTED by [all_masked] at step 1")
    assert lines.index(summary[0]) > error
    assert "warnings: none" not in proc.stderr


def test_abort_under_an_application_logging_setup_is_printed_once(tok_path, tmp_path):
    proc = run("dead", tok_path, tmp_path, USER_VIEW_BASICCONFIG="1")
    assert proc.returncode == 3, proc.stderr[-3000:]
    # basicConfig's handler prints "LEVEL:logger:message"; the default handler stays quiet (no bare copies)
    assert proc.stderr.count("[all_masked]: no label in optimizer step 1") == 1
    assert "ERROR:mask_monitor:rank 0: mask-monitor [all_masked]" in proc.stderr
    assert "INFO:mask_monitor:mask-monitor summary:" in proc.stderr


def test_plain_text_says_leakage_not_audited(tok_path, tmp_path):
    proc = run("plain", tok_path, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = mm_lines(proc.stderr)
    assert sum("prompt leakage NOT audited: the zephyr chat template's markers occur in none" in line
               for line in lines) == 1
    assert lines[-1].endswith("; warnings: none; prompt leakage not audited: the zephyr chat template's markers "
                              "occur in none of the 8 sequences (plain text or pre-packed ids, not a chat render)")
    assert "[prompt_leakage]" not in proc.stderr


def test_unreadable_labels_are_said_not_audited(tok_path, tmp_path):
    proc = run("unreadable", tok_path, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = mm_lines(proc.stderr)
    assert sum("its masking is NOT audited" in line for line in lines) == 1
    assert "4 of 4 micro-batches NOT audited: their labels could not be read" in lines[-1]
    assert "warnings: none" not in lines[-1]
