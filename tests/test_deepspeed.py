"""DeepSpeed ZeRO-2 and ZeRO-3 with two CPU ranks (``DS_ACCELERATOR=cpu``, gloo) under the real ``Trainer``.

DeepSpeed applies its optimizer step inside ``accelerator.backward()`` (``engine.step()``), before the
Trainer's ``on_pre_optimizer_step``. The monitor judges each optimizer step when its last micro-batch's
loss is known, before that micro-batch's backward; these tests prove, with the real engine, that a dead
step never reaches ``engine.step()``:

* all -100 at step 1, a NaN loss on rank 1 only at step 2, a zero loss on rank 0 only at step 2, and a
  NaN in the *first* micro-batch of step 2 under gradient accumulation 2 (its backward runs; the step is
  still stopped at its last micro-batch): every rank aborts in the same step, ``engine.global_steps`` is
  the last healthy step, and each rank's parameter partition and the ZeRO optimizer's whole
  ``state_dict()`` (fp32 master partition, Adam moments and step) equal their snapshot taken when the
  dead step began; each rank returns from the abort within seconds (no hang);
* the control, the monitor judging only at ``on_pre_optimizer_step`` (as before the fix): the engine has
  stepped and the snapshots differ, so the comparison above can fail;
* a healthy run: the counts equal the one-process run on the same data and an independent count of it.

All scenarios of both stages run in one ``torchrun`` launch (one process start, one DeepSpeed import; the
first launch on a machine also builds DeepSpeed's small shared-memory comm op with the C++ compiler).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from trainer_utils import expected_counts, launch, rows

pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install deepspeed; it is in the test extra)")
pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).parent / "scripts" / "train_deepspeed.py"
TIMEOUT = 900  # the whole launch, the first-use op build included; a hang fails the test here
SCENARIOS = ("all_masked", "nan_rank1", "zero_loss", "nan_rank1_ga2", "healthy", "zero_loss_late")
DEAD = {"all_masked": ("all_masked", 1), "nan_rank1": ("non_finite_loss", 2), "zero_loss": ("zero_loss", 2),
        "nan_rank1_ga2": ("non_finite_loss", 2)}
COUNT_KEYS = ("sequences", "target_tokens", "supervised_tokens", "masked_tokens", "fully_masked_sequences",
              "unmasked_sequences", "supervised_padding_tokens", "all_masked_batches", "steps")
ENV = {"DS_ACCELERATOR": "cpu"}


@pytest.fixture(scope="module")
def results(tmp_path_factory, fixtures_dir) -> dict:
    out = tmp_path_factory.mktemp("deepspeed")
    specs = [f"z{stage}:{s}" for stage in (2, 3) for s in SCENARIOS]
    proc, elapsed = launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            str(SCRIPT), str(out), *specs], TIMEOUT, ENV)
    found = {r: json.loads((out / f"result-rank{r}.json").read_text())
             for r in (0, 1) if (out / f"result-rank{r}.json").exists()}
    assert proc.returncode == 0 and set(found) == {0, 1}, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert all(len(found[r]) == len(specs) for r in (0, 1)), proc.stderr[-4000:]
    single_out = out / "single"
    single_out.mkdir()
    proc1, _ = launch([sys.executable, str(SCRIPT), str(single_out), "--single"], TIMEOUT)
    assert proc1.returncode == 0, proc1.stderr[-3000:]
    found["single"] = json.loads((single_out / "result-rank0.json").read_text())["single:healthy"]
    found["elapsed"] = elapsed
    return found


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("scenario", list(DEAD))
def test_dead_step_aborts_every_rank_before_the_engine_steps(results, stage, scenario):
    reason, dead = DEAD[scenario]
    for r in (0, 1):
        res = results[r][f"z{stage}:{scenario}"]
        assert res["engine"] == "DeepSpeedEngine" and res["zero_stage"] == stage
        assert res["outcome"] == "aborted", res
        assert (res["reason"], res["step"], res["abort_rank"]) == (reason, dead, r)
        assert res["global_step"] == dead - 1  # the Trainer's count
        assert res["global_steps_at_dead_step_begin"] == res["engine_global_steps"] == dead - 1  # the engine's
        assert res["params_compared"] == 12 and res["param_elements"] > 0
        assert res["param_diff"] == [], res["param_diff"]
        # fp32 master partition; after a first step also Adam's exp_avg, exp_avg_sq and step
        assert res["optimizer_tensors_compared"] == (1 if dead == 1 else 4)
        assert res["optimizer_diff"] == [], res["optimizer_diff"]
        assert res["seconds"] < 120  # the rank came back from the abort: no rank waited for another


@pytest.mark.parametrize("stage", [2, 3])
def test_control_judged_after_backward_lets_the_engine_step(results, stage):
    for r in (0, 1):
        res = results[r][f"z{stage}:zero_loss_late"]
        assert res["outcome"] == "aborted" and res["reason"] == "zero_loss" and res["step"] == 2
        assert res["global_steps_at_dead_step_begin"] == 1 and res["engine_global_steps"] == 2  # it stepped
        assert res["param_diff"] and res["optimizer_diff"]  # Adam moved the weights on a zero gradient


@pytest.mark.parametrize("stage", [2, 3])
def test_healthy_counts_equal_single_process(results, stage, zephyr_tokenizer):
    exp = expected_counts(rows(zephyr_tokenizer, "assistant"))
    ref = results["single"]
    assert ref["outcome"] == "completed" and ref["summary"]["steps"] == 4
    for r in (0, 1):
        res = results[r][f"z{stage}:healthy"]
        assert res["outcome"] == "completed" and res["global_step"] == res["engine_global_steps"] == 4
        s = res["summary"]
        assert {k: s[k] for k in COUNT_KEYS} == {k: ref["summary"][k] for k in COUNT_KEYS}
        assert {k: s[k] for k in exp} == exp
        assert s["micro_batches"] == 8 and ref["summary"]["micro_batches"] == 4  # 2 ranks x batch 1 vs batch 2
        assert s["aborted"] is None and s["loss_batches"] == 8
        assert [p["sequences"] for p in res["per_rank"]] == [4, 4]
    assert results[0]["z2:healthy"]["per_rank"] == results[1]["z2:healthy"]["per_rank"]


def test_evidence_names_rank1_when_rank1_holds_the_nan(results):
    for stage in (2, 3):
        evs = [json.loads(Path(results[r][f"z{stage}:nan_rank1"]["evidence"]).read_text()) for r in (0, 1)]
        for ev in evs:
            assert ev["offending_rank"] == 1 and ev["offending_micro_batch"]["micro_batch_index"] == 0
        assert evs[0]["offending_micro_batch"]["rows_in"] == "abort-rank1.json"
        assert "labels" not in evs[0]["offending_micro_batch"] and "labels" in evs[1]["offending_micro_batch"]
