"""FSDP2 (torch ``fully_shard``) with two CPU ranks on gloo under the real SFTTrainer (torchrun).

Proves: the monitor's counts over a sharded two-rank run equal the single-process run on the same data
(and an independent count of that data), and an all -100 dataset makes both ranks raise
``MaskMonitorAbort`` in the same step, before any optimizer step, with a non-zero exit and no hang.

Why torch FSDP2 and not ``TrainingArguments(fsdp="full_shard")``: accelerate (1.15) turns the FSDP
plugin on only for multi-*accelerator* distributed types (``AcceleratorState``: the
``ACCELERATE_USE_FSDP``/``fsdp_plugin`` branch sits under ``MULTI_GPU``/``MULTI_NPU``/...); with
``use_cpu=True`` the state is ``MULTI_CPU`` and the plugin is dropped without a message, so the run is
plain DDP. The script therefore shards the model itself (each decoder layer, then the root) and marks it
as owning its placement, which transformers >= 5 honours by skipping the DDP wrap; each test checks the
parameters the callbacks saw really were this rank's half. On transformers 4.57 the Trainer wraps such a
model in DDP, which fails on its DTensor parameters: the tests skip there (see ``pytestmark``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import transformers
from trainer_utils import expected_counts, rows

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        int(transformers.__version__.split(".")[0]) < 5,
        reason="transformers < 5 wraps a model already sharded by fully_shard in DDP on CPU (accelerate "
        "prepare_model -> DistributedDataParallel: 'aten.cat.default got mixed torch.Tensor and DTensor'), "
        "and accelerate drops its FSDP plugin on CPU: no CPU FSDP run through the Trainer on this stack",
    ),
]
pytest.importorskip("trl")
SCRIPT = Path(__file__).parent / "scripts" / "train_fsdp.py"
COUNT_KEYS = ("sequences", "target_tokens", "supervised_tokens", "masked_tokens", "fully_masked_sequences",
              "unmasked_sequences", "supervised_padding_tokens", "all_masked_batches", "steps")
TIMEOUT = 240


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
            "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    """Run in a new session; on timeout kill the whole group (torchrun's workers too) and fail: a hang."""
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(cmd[-3:])} hung for {TIMEOUT} s (killed):\n{out[-2000:]}\n{err[-2000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _results(out: Path, ranks: tuple[int, ...], proc: subprocess.CompletedProcess) -> dict[int, dict]:
    found = {r: json.loads((out / f"result-rank{r}.json").read_text())
             for r in ranks if (out / f"result-rank{r}.json").exists()}
    assert set(found) == set(ranks), proc.stdout[-3000:] + proc.stderr[-3000:]
    return found


def torchrun(scenario: str, out: Path) -> tuple[int, dict[int, dict], float]:
    out.mkdir(parents=True, exist_ok=True)
    # --standalone: a private rendezvous on a free port (--master_port=0 left both ranks waiting in
    # init_process_group with torch 2.13: MASTER_PORT=0 reaches the workers verbatim)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(SCRIPT), scenario, str(out)]
    t0 = time.monotonic()
    proc = _run(cmd)
    return proc.returncode, _results(out, (0, 1), proc), time.monotonic() - t0


def single(scenario: str, out: Path) -> tuple[int, dict]:
    out.mkdir(parents=True, exist_ok=True)
    proc = _run([sys.executable, str(SCRIPT), scenario, str(out), "--single"])
    return proc.returncode, _results(out, (0,), proc)[0]


def _assert_sharded(res: dict) -> None:
    assert res["fsdp_wrapped"] == ["FSDPLlamaForCausalLM"]  # fully_shard's class swap on the root
    shapes = res["param_shapes"]
    # FSDP2 shards dim 0 evenly over 2 ranks: this rank holds half of every matrix
    assert shapes["model.embed_tokens.weight"][0] * 2 == res["vocab_size"]
    assert shapes["model.layers.0.self_attn.q_proj.weight"] == [8, 16]


def test_fsdp2_counts_equal_single_process(tmp_path, zephyr_tokenizer):
    examples = rows(zephyr_tokenizer, "assistant")
    exp = expected_counts(examples)
    code, res, elapsed = torchrun("healthy", tmp_path / "fsdp")
    assert code == 0, res
    code1, ref = single("healthy", tmp_path / "single")
    assert code1 == 0
    assert ref["world_size"] == 1 and ref["summary"]["steps"] == 4
    for r in (0, 1):
        _assert_sharded(res[r])
        s = res[r]["summary"]
        assert res[r]["outcome"] == "completed" and res[r]["global_step"] == 4
        assert {k: s[k] for k in COUNT_KEYS} == {k: ref["summary"][k] for k in COUNT_KEYS}
        assert {k: s[k] for k in exp} == exp  # and both equal the independent count of the data
        assert s["micro_batches"] == 8 and ref["summary"]["micro_batches"] == 4  # 2 ranks x bs 1 vs bs 2
        assert s["loss_batches"] == 8 and s["aborted"] is None
        per_rank = res[r]["per_rank"]
        assert len(per_rank) == 2
        for k in ("sequences", "target_tokens", "supervised_tokens", "masked_tokens"):
            assert per_rank[0][k] + per_rank[1][k] == s[k]
        assert per_rank[0]["sequences"] == per_rank[1]["sequences"] == 4
    assert res[0]["per_rank"] == res[1]["per_rank"]  # every rank holds every rank's counts
    assert elapsed < TIMEOUT


def test_fsdp2_all_masked_aborts_on_both_ranks_same_step(tmp_path):
    code, res, elapsed = torchrun("all_masked", tmp_path)
    assert code != 0  # torchrun reports the ranks' exit code 3
    for r in (0, 1):
        _assert_sharded(res[r])
        assert res[r]["outcome"] == "aborted", res[r]
        assert res[r]["reason"] == "all_masked" and res[r]["step"] == 1 and res[r]["abort_rank"] == r
        assert res[r]["global_step"] == 0  # raised before the first optimizer step
        assert res[r]["summary"]["supervised_tokens"] == 0 and res[r]["summary"]["micro_batches"] == 2
    # each rank passed a monitored barrier after writing its result: both aborted, neither hung
    assert res[0]["barrier"] == res[1]["barrier"] == "passed"
    assert elapsed < TIMEOUT
