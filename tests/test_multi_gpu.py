"""Two or more GPUs: ``nn.DataParallel`` (what the Trainer uses for a plain ``python train.py`` on a multi-GPU
machine) and DDP over NCCL. Skipped, with the reason, where fewer than two CUDA devices are visible; run by
``scripts/gpu_check.sh``.

* DataParallel under the real ``Trainer``: the compute_loss capture sees the whole batch on one device
  (the replicas' forwards run in one thread per GPU on row chunks); counts equal an independent count of
  the data; an all -100 step and a NaN on one replica only (the loss DataParallel gathers is one value
  per GPU; the Trainer trains their mean) abort before the update, parameters unchanged.
* DataParallel through the forward-hook fallback (no Trainer): the replicas' chunks, on two devices, are
  moved to one device and merged into one micro-batch each.
* DDP over NCCL, one GPU per rank (torchrun): a NaN on rank 1 only stops both ranks in the same step.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from trainer_utils import (
    IGNORE,
    assert_params_equal,
    dataset,
    expected_counts,
    launch,
    params_snapshot,
    rows,
    tiny_llama,
)

from mask_monitor import MaskAuditor, MaskMonitorAbort, MaskMonitorCallback
from mask_monitor.capture import ForwardCapture

N_GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
pytestmark = [
    pytest.mark.multi_gpu,
    pytest.mark.slow,
    pytest.mark.skipif(N_GPUS < 2, reason=f"needs 2+ CUDA devices (torch.cuda.device_count() = {N_GPUS})"),
]
DDP_SCRIPT = Path(__file__).parent / "scripts" / "train_ddp.py"


def _trainer(tok, examples, tmp_path, callbacks):
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, num_train_epochs=1,
                             report_to="none", save_strategy="no", disable_tqdm=True, logging_steps=1, seed=0,
                             learning_rate=1e-2)
    model = tiny_llama(len(tok))
    trainer = Trainer(model=model, args=args, train_dataset=dataset(examples),
                      data_collator=DataCollatorForSeq2Seq(tok, padding=True), callbacks=callbacks)
    assert trainer.args.n_gpu == N_GPUS  # not distributed: the Trainer wraps the model in nn.DataParallel
    return trainer, model


def _replica_devices(model) -> set[int]:
    seen: set[int] = set()
    model.model.norm.register_forward_hook(lambda m, a, out: seen.add(out.device.index))
    return seen


def test_dataparallel_trainer_counts_whole_batches(zephyr_tokenizer, tmp_path):
    examples = rows(zephyr_tokenizer, "assistant")
    cb = MaskMonitorCallback(template=None, wandb=False)
    trainer, model = _trainer(zephyr_tokenizer, examples, tmp_path, [cb])
    devices = _replica_devices(model)
    trainer.train()
    assert isinstance(trainer.model_wrapped, torch.nn.DataParallel)
    assert devices == set(range(N_GPUS))  # the replicas really ran on every GPU
    s = cb.summary()
    steps = -(-len(examples) // (2 * N_GPUS))
    assert s["steps"] == steps and s["micro_batches"] == steps  # one whole batch per step, not one per GPU
    assert s["unaudited_batches"] == 0 and s["aborted"] is None
    exp = expected_counts(examples)
    assert {k: s[k] for k in exp} == exp


def test_dataparallel_all_masked_aborts_before_update(zephyr_tokenizer, tmp_path):
    cb = MaskMonitorCallback(template=None, wandb=False)
    trainer, model = _trainer(zephyr_tokenizer, rows(zephyr_tokenizer, "all"), tmp_path, [cb])
    before = params_snapshot(model)
    with pytest.raises(MaskMonitorAbort) as info:
        trainer.train()
    assert info.value.reason == "all_masked" and info.value.step == 1 and trainer.state.global_step == 0
    assert_params_equal(before, params_snapshot(model))


def test_dataparallel_nan_on_one_replica_aborts(zephyr_tokenizer, tmp_path):
    cb = MaskMonitorCallback(template=None, wandb=False)
    trainer, model = _trainer(zephyr_tokenizer, rows(zephyr_tokenizer, "assistant"), tmp_path, [cb])
    last = N_GPUS - 1

    def nan_on_last_gpu(module, args, output):  # copied into every replica; fires on the last GPU only
        return output * float("nan") if output.device.index == last else None

    model.model.norm.register_forward_hook(nan_on_last_gpu)
    before = params_snapshot(model)
    with pytest.raises(MaskMonitorAbort) as info:
        trainer.train()
    assert info.value.reason == "non_finite_loss" and info.value.step == 1 and trainer.state.global_step == 0
    assert cb.last_report.total.non_finite_loss_batches == 1 and cb.last_report.total.micro_batches == 1
    assert_params_equal(before, params_snapshot(model))


def test_dataparallel_forward_hook_fallback_merges_replica_chunks(zephyr_tokenizer):
    model = tiny_llama(len(zephyr_tokenizer)).cuda()
    model.train()
    dp = torch.nn.DataParallel(model)
    auditor = MaskAuditor()

    def sink(mb):
        auditor.update(mb.labels, input_ids=mb.input_ids, attention_mask=mb.attention_mask, loss=mb.loss,
                       part_of=mb.part_of)

    capture = ForwardCapture(model, sink)
    capture.install()
    examples = rows(zephyr_tokenizer, "assistant", n=2 * N_GPUS)
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.tensor([e["input_ids"] + [0] * (width - len(e["input_ids"])) for e in examples]).cuda()
    labels = torch.tensor([e["labels"] + [IGNORE] * (width - len(e["labels"])) for e in examples]).cuda()
    mask = torch.tensor([[1] * len(e["input_ids"]) + [0] * (width - len(e["input_ids"])) for e in examples]).cuda()
    for _ in range(2):
        capture.new_micro_batch()
        dp(input_ids=ids, labels=labels, attention_mask=mask)
    capture.remove()
    report = auditor.step()  # chunks on N devices: moved to one before stacking
    assert report.total.micro_batches == 2 and len(report.micro_batches) == 2
    padded = [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples]
    exp = expected_counts(padded)
    assert report.micro_batches[0].supervised_tokens == exp["supervised_tokens"]
    assert report.micro_batches[0].sequences == exp["sequences"]


def test_ddp_nccl_two_gpus_nan_on_rank1(tmp_path, fixtures_dir):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(DDP_SCRIPT),
           "nan_rank1", str(tmp_path)]
    proc, elapsed = launch(cmd, 240, {"MM_CUDA": "1"})
    res = {r: json.loads((tmp_path / f"result-rank{r}.json").read_text()) for r in (0, 1)
           if (tmp_path / f"result-rank{r}.json").exists()}
    assert set(res) == {0, 1}, proc.stderr[-3000:]
    assert proc.returncode != 0 and elapsed < 240
    for r in (0, 1):
        assert res[r]["device"] == f"cuda:{r}" and res[r]["backend"] == "nccl"
        assert res[r]["outcome"] == "aborted" and res[r]["reason"] == "non_finite_loss" and res[r]["step"] == 2
        assert res[r]["global_step"] == 1
