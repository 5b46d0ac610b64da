"""Process groups on the plain-loop API: two gloo ranks under torchrun, every scenario in one launch.

What each scenario proves (the script, ``tests/scripts/plain_groups.py``, says how it is built):

* a (dp=2, tp=1) mesh: counts over the data-parallel group equal the one-process run on both ranks' data
  and an independent count of it;
* a tensor-parallel pair (the same batch on both ranks): counted once over the data-parallel group, equal
  to the one-process run (the default group would count it twice: also checked, as the contrast);
* a context-parallel pair (each row split in two shards, rank 0's shard holding prompt tokens only):
  counts equal the unsharded one-process count, the strict policy finds exactly what it finds unsharded
  (no all-masked finding; judged shard by shard, rank 0 alone would abort a healthy step), and a step
  that really is all masked is found on both ranks;
* a rank that fails while closing the step (injected, with and without a sequence group): both ranks
  raise ``RankFailure`` naming rank 1 and its error, in well under a second, and the next step closes
  on both with both ranks' counts (the exchange stayed aligned);
* ranks with different monitor settings: both raise ``RankFailure`` saying so.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from trainer_utils import launch

from mask_monitor import FIELDS

pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).parent / "scripts" / "plain_groups.py"
TIMEOUT = 180
COUNT_KEYS = ("sequences", "target_tokens", "supervised_tokens", "masked_tokens", "fully_masked_sequences")


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[int, dict]:
    out = tmp_path_factory.mktemp("groups")
    proc, elapsed = launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            str(SCRIPT), str(out)], TIMEOUT)
    found = {r: json.loads((out / f"result-rank{r}.json").read_text())
             for r in (0, 1) if (out / f"result-rank{r}.json").exists()}
    assert proc.returncode == 0 and set(found) == {0, 1}, proc.stdout[-3000:] + proc.stderr[-3000:]
    for r in (0, 1):
        for name, res in found[r].items():
            assert "error" not in res, f"rank {r} {name}:\n{res['error']}"
    found[-1] = {"elapsed": elapsed}
    return found


def test_data_parallel_mesh_counts_equal_single_process(results):
    for r in (0, 1):
        res = results[r]["dp_2x1"]
        assert res["total"] == res["single"]
        assert {k: res["total"][k] for k in COUNT_KEYS} == res["independent"]
        assert res["world_size"] == 2 and res["ranks"] == [0, 1] and res["rank_index"] == r
        assert res["duplicate"] is False
        assert res["total"]["micro_batches"] == 2 and res["independent"]["sequences"] == 6
    assert results[0]["dp_2x1"]["per_rank"] == results[1]["dp_2x1"]["per_rank"]


def test_tensor_parallel_pair_counted_once(results):
    for r in (0, 1):
        res = results[r]["tp_pair"]
        assert res["world_size"] == 1
        assert res["duplicate"] is (r == 1)  # rank 1's counts repeat rank 0's: per-rank exporters skip them
        assert res["total"] == res["single"]
        assert {k: res["total"][k] for k in COUNT_KEYS} == res["independent"]
        # the contrast: over the default group the pair's one batch is counted twice
        assert res["world_total"]["supervised_tokens"] == 2 * res["single"]["supervised_tokens"]


def test_context_parallel_shards_count_each_sequence_once(results):
    for r in (0, 1):
        healthy, dead = results[r]["cp_pair"]["healthy"], results[r]["cp_pair"]["dead"]
        assert healthy["total"] == healthy["single"]
        assert {k: healthy["total"][k] for k in COUNT_KEYS} == healthy["independent"]
        assert healthy["total"]["all_masked_batches"] == 0 and healthy["total"]["micro_batches"] == 1
        assert healthy["findings"] == healthy["single_findings"] == ["fully_masked_sequences:warn"]
        assert dead["total"] == dead["single"]
        assert dead["findings"] == dead["single_findings"] == ["all_masked:abort"]
    assert results[0]["cp_pair"]["healthy"]["shard_supervised"] == 0  # rank 0's shard: prompt tokens only
    assert results[1]["cp_pair"]["healthy"]["shard_supervised"] == 7
    # the contrast: judged by itself, rank 0's prompt-only shard kills a healthy step, on rank 0 only
    assert results[0]["cp_pair"]["healthy"]["alone_findings"] == ["all_masked:abort"]
    assert "all_masked:abort" not in results[1]["cp_pair"]["healthy"]["alone_findings"]


@pytest.mark.parametrize("scenario", ["fail_rank1", "fail_cp"])
def test_failure_on_one_rank_stops_both_with_its_error(results, scenario):
    error = (f"RuntimeError: stack expects each tensor to be equal size, but got [{len(FIELDS)}] at entry 0 "
             "and [3] at entry 1")
    for r in (0, 1):
        res = results[r][scenario]
        assert res["outcome"] == "RankFailure", res
        assert res["failures"] == [[1, error]] and res["step"] == 1
        assert f"rank 1: {error}" in res["message"]
        assert res["seconds"] < 5
        nxt = res["next_step"]
        assert nxt["step"] == 1 and nxt["total"] == nxt["single"]
    assert results[-1]["elapsed"] < TIMEOUT


def test_different_settings_stop_both(results):
    for r in (0, 1):
        res = results[r]["settings"]
        assert res["outcome"] == "RankFailure"
        assert "the ranks run different monitor settings (digests rank 0: 12345, rank 1: 54321)" in res["message"]
