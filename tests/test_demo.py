"""The README's main command, ``mask-monitor demo``, end to end: a dead run stopped, a healthy run counted."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from mask_monitor.cli.demo import _examples, build_tokenizer

pytestmark = pytest.mark.slow
trl = pytest.importorskip("trl")


def test_demo_stops_the_dead_run_and_counts_the_healthy_one(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mask_monitor.cli.main", "demo", "--output-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]

    # run 1: every label -100; under TRL's defaults TRL (>= 1) drops all 8 examples while SFTTrainer is built:
    # the monitor stops there (step 0, before train()) with the real explanation and its evidence on disk.
    # TRL < 1 keeps them: the monitor stops train() at step 1.
    assert "8 of 8 examples have every label = -100" in out
    evidence = json.loads((tmp_path / "broken" / "mask_monitor" / "abort-rank0.json").read_text())
    if int(trl.__version__.split(".")[0]) >= 1:
        assert "MaskMonitorAbort raised out of SFTTrainer(...) (reason='all_masked', step=0)" in out
        assert ("all 8 examples were dropped as fully masked (8 with no supervised label at all) when the dataset "
                "was prepared") in out
        assert evidence["reason"] == "all_masked" and evidence["step"] == 0
        assert evidence["step_total"]["dropped_sequences"] == 8 and evidence["step_total"]["sequences"] == 0
    else:
        assert "MaskMonitorAbort raised out of trainer.train() (reason='all_masked', step=1)" in out
        assert evidence["reason"] == "all_masked" and evidence["step"] == 1
        assert evidence["step_total"]["supervised_tokens"] == 0 and evidence["step_total"]["sequences"] == 2
    broken = _examples(build_tokenizer(), "### answer :")
    assert evidence["offending_micro_batch"]["labels"][0] == broken[0]["labels"]

    # run 2: the summary equals a count made here from the demo's own examples (2 epochs, batch 2,
    # right padding excluded: every example contributes len - 1 targets)
    tok = build_tokenizer()
    examples = _examples(tok, "<|im_start|>assistant\n")
    targets = 2 * sum(len(e["input_ids"]) - 1 for e in examples)
    supervised = 2 * sum(sum(1 for x in e["labels"][1:] if x != -100) for e in examples)

    def row(name: str) -> str:
        m = re.search(rf"^   {name}\s+(\S+)$", out, re.M)
        assert m, f"no '{name}' line in the demo output:\n{out[-2000:]}"
        return m.group(1)

    assert "training completed: 8 optimizer steps" in out
    assert int(row("micro-batches audited")) == 8
    assert int(row("target tokens")) == targets
    assert int(row("supervised tokens")) == supervised
    assert row("masked ratio") == f"{1 - supervised / targets:.1%}"
    assert int(row("fully masked sequences")) == 0
    assert row("prompt leakage") == "0.0%" and row("response coverage") == "100.0%"
    assert row("aborted") == "no"
