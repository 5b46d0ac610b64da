"""torchrun --nproc_per_node=2 (gloo, CPU): only rank 1 sees a pathology; both ranks agree."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).parent / "scripts" / "train_ddp.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(scenario: str, tmp_path: Path, fixtures_dir: Path, timeout: float = 240) -> tuple[int, dict, float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(SCRIPT), scenario, str(tmp_path)]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    elapsed = time.monotonic() - t0
    results = {}
    for r in (0, 1):
        f = tmp_path / f"result-rank{r}.json"
        if f.exists():
            results[r] = json.loads(f.read_text())
    assert set(results) == {0, 1}, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.returncode, results, elapsed


def test_nan_on_rank1_both_ranks_abort_same_step(tmp_path, fixtures_dir):
    code, res, elapsed = torchrun("nan_rank1", tmp_path, fixtures_dir)
    assert code != 0
    assert elapsed < 120, f"the job took {elapsed:.0f}s to exit: a rank hung"
    for r in (0, 1):
        assert res[r]["outcome"] == "aborted", res[r]
        assert res[r]["reason"] == "non_finite_loss" and res[r]["step"] == 2 and res[r]["abort_rank"] == r
        assert res[r]["global_step"] == 1
        assert Path(res[r]["evidence"]).name == f"abort-rank{r}.json"
    ev0 = json.loads(Path(res[0]["evidence"]).read_text())
    assert ev0["step_total"]["non_finite_loss_batches"] == 1  # global: only rank 1's micro-batch
    assert ev0["this_rank"]["non_finite_loss_batches"] == 0
    # both files name rank 1's micro-batch 0 as the one at fault; only rank 1's holds its rows
    ev1 = json.loads(Path(res[1]["evidence"]).read_text())
    for ev in (ev0, ev1):
        assert ev["offending_rank"] == 1
        assert ev["offending_micro_batch"]["rank"] == 1 and ev["offending_micro_batch"]["micro_batch_index"] == 0
    assert "labels" not in ev0["offending_micro_batch"]
    assert ev0["offending_micro_batch"]["rows_in"] == "abort-rank1.json"
    assert len(ev1["offending_micro_batch"]["labels"]) == 1 and "rows_in" not in ev1["offending_micro_batch"]


def test_rank_failing_to_close_step_stops_both_with_its_error(tmp_path, fixtures_dir):
    code, res, elapsed = torchrun("fail_rank1", tmp_path, fixtures_dir)
    assert code != 0
    assert elapsed < 120, f"the job took {elapsed:.0f}s to exit: a rank hung"
    for r in (0, 1):
        assert res[r]["outcome"] == "rank_failure", res[r]
        assert res[r]["step"] == 2 and res[r]["global_step"] == 1  # stopped before step 2's update
        [(rank, error)] = res[r]["failures"]
        assert rank == 1 and error.startswith("RuntimeError: stack expects each tensor to be equal size")
        assert f"rank 1: {error}" in res[r]["message"]


def test_all_masked_on_rank1_strict_both_abort(tmp_path, fixtures_dir):
    code, res, _ = torchrun("masked_rank1_strict", tmp_path, fixtures_dir)
    assert code != 0
    assert [res[r]["outcome"] for r in (0, 1)] == ["aborted", "aborted"]
    assert {res[r]["reason"] for r in (0, 1)} == {"all_masked_micro_batch"}
    assert {res[r]["step"] for r in (0, 1)} == {2}


def test_all_masked_on_rank1_default_counts_and_trains(tmp_path, fixtures_dir):
    code, res, _ = torchrun("masked_rank1", tmp_path, fixtures_dir)
    assert code == 0
    for r in (0, 1):
        s = res[r]["summary"]
        assert res[r]["outcome"] == "completed" and res[r]["global_step"] == 4
        assert s["all_masked_batches"] == 1 and s["findings"]["all_masked_micro_batch"] == 1
        assert s["micro_batches"] == 8  # global: 4 steps x 2 ranks


def test_ranks_with_different_settings_stop_together(tmp_path, fixtures_dir):
    code, res, elapsed = torchrun("settings_rank1", tmp_path, fixtures_dir)
    assert code != 0 and elapsed < 120
    for r in (0, 1):
        assert res[r]["outcome"] == "rank_failure", res[r]
        assert res[r]["step"] == 1 and res[r]["global_step"] == 0
        assert "the ranks run different monitor settings" in res[r]["message"]
