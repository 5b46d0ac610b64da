"""``mask-monitor prepare`` (the offline cure) and ``mask-monitor audit --template`` as a user runs them.

The audit of leaking data prints the exact ``prepare`` line that fixes it; that line is run as printed,
its output is the independent reference token for token, its before/after numbers are the audit's, and
the prepared folder audits clean. Template settings: a family name and a description file are accepted
(as the callback's ``template=``), an unknown one and an unreadable template are one-line errors (exit 2).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from template_fixtures import FIXTURES, reference_mask, tokenizer_for

datasets = pytest.importorskip("datasets")
pytest.importorskip("trl")
pytestmark = pytest.mark.slow

PHI3 = "phi3__Phi-3-mini-4k-instruct"
CONVS = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a prime."},
     {"role": "assistant", "content": "Seven."}, {"role": "user", "content": "Another?"},
     {"role": "assistant", "content": "Eleven, and thirteen too."}],
    [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello there!"}],
    [{"role": "user", "content": "Count to three."}, {"role": "assistant", "content": "One, two, three."}],
]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "COLUMNS": "400"})  # no wrapped lines
    return env


def mm(*argv: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "mask_monitor.cli.main", *argv]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=400)


@pytest.fixture(scope="module")
def phi3_dir() -> str:
    if not FIXTURES.is_dir():
        pytest.skip(f"third-party fixtures not found at {FIXTURES}")
    return str(FIXTURES / "tokenizers" / "Phi-3-mini-4k-instruct")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "chats.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVS))
    return path


def test_the_audit_prints_the_line_that_fixes_the_run_and_that_line_fixes_it(phi3_dir, data, tmp_path):
    audit = mm("audit", "--no-progress", "--tokenizer", phi3_dir, "--data", str(data))
    assert audit.returncode == 0, audit.stderr[-2000:]
    assert "! prompt_leakage:" in audit.stdout
    assert "Fix: train_dataset = mask_monitor.assistant_only(train_dataset, tokenizer)" in audit.stdout
    (printed,) = [ln for ln in audit.stdout.splitlines() if "or: mask-monitor prepare" in ln]
    line = printed.split("or: ", 1)[1].split("  #")[0]
    assert line == f"mask-monitor prepare --tokenizer {phi3_dir} --data {data} --out chats_answers"
    argv = shlex.split(line)
    out = tmp_path / "answers"
    argv[argv.index("--out") + 1] = str(out)  # the printed line, written under tmp_path
    prepared = mm(*argv[1:], "--json")
    assert prepared.returncode == 0, prepared.stderr[-2000:]
    numbers = json.loads(prepared.stdout)
    before, after = numbers["before"], numbers["after"]
    # before: TRL's defaults train on everything; after: answers only
    assert before["prompt_leakage_ratio"] > 0.3 and "prompt_leakage" in before["findings"]
    assert after["prompt_leakage_ratio"] == 0.0 and after["response_coverage_ratio"] == 1.0
    assert after["eot_supervised_ratio"] == 1.0 and after["findings"] == []
    assert numbers["examples"] == len(CONVS) and numbers["template_family"] == "phi3"
    # the written rows are the independent reference, token for token
    rows = datasets.load_from_disk(str(out))
    tok = tokenizer_for(PHI3)
    for row, conv in zip(rows, CONVS, strict=True):
        ids, mask, _ = reference_mask(tok, conv, "<|end|>")
        assert row["input_ids"] == ids and row["assistant_masks"] == mask
    # and the prepared folder audits clean, with no fix line
    clean = json.loads(mm("audit", "--no-progress", "--tokenizer", phi3_dir, "--data", str(out), "--json").stdout)
    assert clean["totals"]["prompt_leakage_tokens"] == 0 and clean["fix"] == [] and clean["warnings"] == []
    assert clean["totals"]["supervised_tokens"] == sum(sum(r["assistant_masks"][1:]) for r in rows)


def test_template_settings_family_file_and_errors(phi3_dir, data, tmp_path):
    spec = tmp_path / "phi3_markers.yaml"
    spec.write_text("family: mine\nassistant: \"<|assistant|>\\n\"\nend_of_turn: \"<|end|>\"\nuser: \"<|user|>\\n\"\n")
    by_family = json.loads(mm("audit", "--no-progress", "--tokenizer", phi3_dir, "--data", str(data), "--json",
                              "--template", "phi3").stdout)
    by_file = json.loads(mm("audit", "--no-progress", "--tokenizer", phi3_dir, "--data", str(data), "--json",
                            "--template", str(spec)).stdout)
    assert (by_family["template_family"], by_file["template_family"]) == ("phi3", "mine")
    assert by_family["totals"]["prompt_leakage_tokens"] == by_file["totals"]["prompt_leakage_tokens"] > 0
    bad = mm("audit", "--no-progress", "--tokenizer", phi3_dir, "--data", str(data), "--template", "nosuch")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert "is no registered family and no file" in bad.stderr
    # a tokenizer whose template cannot be read: one line, the reason and what to pass
    no_template = str(FIXTURES / "tokenizers" / "phi-2")
    proc = mm("prepare", "--tokenizer", no_template, "--data", str(data), "--out", str(tmp_path / "x"))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "no chat template" in proc.stderr and "register_template" in proc.stderr
