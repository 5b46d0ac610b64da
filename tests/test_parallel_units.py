"""One-process proofs for the distributed machinery: thread safety, micro-batches that arrive in parts,
bounded run totals, and which rank / micro-batch an abort's evidence names.

* Many threads feeding one ``MaskAuditor`` (what ``nn.DataParallel``'s one-thread-per-device replicas do)
  lose nothing and keep each micro-batch's evidence rows aligned with its counts.
* ``ForwardCapture`` on replicas made by DataParallel's own ``_replicate_for_data_parallel`` and run in one
  thread each (as ``parallel_apply`` does; it needs CUDA, the replicas and threads do not): the row chunks
  of each micro-batch count as one micro-batch, equal to the unchunked count.
* Row chunks merged (:func:`merge_row_parts`) and sequence shards combined (:func:`from_shards`, the sums
  an ``all_reduce`` over the sequence group would produce) equal ``batch_stats`` of the whole batch.
* Run totals over thousands of steps with no logging window keep a constant number of objects, in the
  plain-loop API and in a real ``Trainer`` with ``logging_strategy="no"``.
* The evidence names the rank and micro-batch at fault from the exchanged per-rank counts.
"""

from __future__ import annotations

import gc
import sys
import threading
import types

import pytest
import torch
from trainer_utils import IGNORE, dataset, rows, tiny_llama

from mask_monitor import FIELDS, MaskAuditor
from mask_monitor.capture import ForwardCapture
from mask_monitor.evidence import offending, write_evidence
from mask_monitor.parts import from_shards, merge_row_parts, shard_rows
from mask_monitor.reports import StepReport, Totals
from mask_monitor.stats import as_dict, batch_stats

TEMPLATE = {"audited_supervised_tokens", "prompt_leakage_tokens", "supervised_header_tokens",
            "assistant_content_tokens", "supervised_assistant_content_tokens", "assistant_turns",
            "supervised_eot_turns"}


def _batch(seed: int, rows_: int, length: int, prompt: int, pad_row: int | None = 0, pad: int = 3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 500, (rows_, length), generator=g)
    labels = ids.clone()
    labels[:, :prompt] = IGNORE
    mask = torch.ones_like(ids)
    if pad_row is not None:
        mask[pad_row, length - pad:] = 0
        labels[pad_row, length - pad:] = IGNORE
    return ids, labels, mask


def _plain_count(labels: torch.Tensor, mask: torch.Tensor) -> dict[str, int]:
    """Independent count: per row, the targets of its real tokens (right padding)."""
    out = {"sequences": 0, "target_tokens": 0, "supervised_tokens": 0, "fully_masked_sequences": 0}
    for lab, m in zip(labels.tolist(), mask.tolist(), strict=True):
        t = lab[1:sum(m)]
        s = sum(1 for x in t if x != IGNORE)
        out["sequences"] += 1
        out["target_tokens"] += len(t)
        out["supervised_tokens"] += s
        out["fully_masked_sequences"] += int(s == 0)
    return out


# ----------------------------------------------------------------------------------------- threads
def test_auditor_update_from_many_threads_loses_nothing_and_keeps_rows_aligned():
    auditor = MaskAuditor(evidence_rows=2)
    n_threads, per_thread = 16, 40
    batches = {(t, i): _batch(1000 * t + i, 2, 6 + (t + i) % 7, prompt=(t * 3 + i) % 5, pad_row=None)
               for t in range(n_threads) for i in range(per_thread)}
    start = threading.Barrier(n_threads)

    def feed(t: int) -> None:
        start.wait()
        for i in range(per_thread):
            _, labels, _ = batches[(t, i)]
            auditor.update(labels, loss=torch.tensor(float(t)))

    threads = [threading.Thread(target=feed, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    report = auditor.step()
    expected = [_plain_count(lab, torch.ones_like(lab)) for _, lab, _ in batches.values()]
    assert report.total.micro_batches == n_threads * per_thread
    assert report.total.supervised_tokens == sum(e["supervised_tokens"] for e in expected)
    assert report.total.target_tokens == sum(e["target_tokens"] for e in expected)
    assert report.total.loss_sum == per_thread * sum(range(n_threads))
    # each micro-batch's kept rows (whole batches: 2 rows each) are the rows its counts came from
    kept = auditor.evidence_rows_of_last_step()
    assert len(kept) == len(report.micro_batches) == n_threads * per_thread
    for rows_i, counts in zip(kept, report.micro_batches, strict=True):
        mine = as_dict(batch_stats(torch.tensor(rows_i["labels"])))
        assert mine["supervised_tokens"] == counts.supervised_tokens
        assert mine["target_tokens"] == counts.target_tokens


def _replica_forward(capture_model, model, chunks, losses_out):
    """Run DataParallel-style replicas (``_replicate_for_data_parallel``) of ``model``, one thread each."""
    replicas = [model._replicate_for_data_parallel() for _ in chunks]
    barrier = threading.Barrier(len(chunks))

    def run(i: int) -> None:
        barrier.wait()
        out = replicas[i](**chunks[i])
        losses_out[i] = out.loss.detach()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(chunks))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()


def test_forward_capture_merges_dataparallel_replica_chunks(zephyr_tokenizer):
    model = tiny_llama(len(zephyr_tokenizer))
    model.train()
    auditor = MaskAuditor()
    seen = []

    def sink(mb):
        seen.append(mb.part_of)
        auditor.update(mb.labels, input_ids=mb.input_ids, attention_mask=mb.attention_mask, loss=mb.loss,
                       part_of=mb.part_of)

    capture = ForwardCapture(model, sink)
    capture.install()
    data = rows(zephyr_tokenizer, "assistant")
    width = max(len(e["input_ids"]) for e in data)
    ids = torch.tensor([e["input_ids"] + [0] * (width - len(e["input_ids"])) for e in data])
    labels = torch.tensor([e["labels"] + [IGNORE] * (width - len(e["labels"])) for e in data])
    mask = torch.tensor([[1] * len(e["input_ids"]) + [0] * (width - len(e["input_ids"])) for e in data])
    labels[0:2] = IGNORE  # the first chunk of micro-batch 0 is all prompt: not an all-masked micro-batch
    reference = MaskAuditor()
    mean_losses = []
    for mb in range(2):  # two micro-batches of 4 rows, each split in 2 chunks of 2 rows (2 "devices")
        capture.new_micro_batch()
        sl = slice(4 * mb, 4 * mb + 4)
        chunks = [{"input_ids": ids[sl][c:c + 2], "labels": labels[sl][c:c + 2], "attention_mask": mask[sl][c:c + 2]}
                  for c in (0, 2)]
        losses = [None, None]
        _replica_forward(capture, model, chunks, losses)
        mean = torch.stack(losses).mean()
        mean_losses.append(mean)
        reference.update(labels[sl], attention_mask=mask[sl], loss=torch.nan_to_num(mean, nan=0.0))
    capture.remove()
    report, ref = auditor.step(), reference.step()
    assert sorted(seen) == [1, 1, 2, 2]  # four chunk forwards, two per micro-batch
    assert report.total.micro_batches == 2 and len(report.micro_batches) == 2
    assert report.total.all_masked_batches == 0 and report.micro_batches[0].fully_masked_sequences == 2
    for f in FIELDS:
        if f in ("loss_sum", "non_finite_loss_batches", "zero_loss_batches"):
            continue
        assert getattr(report.total, f) == getattr(ref.total, f), f
    plain = _plain_count(labels, mask)
    assert {k: getattr(report.total, k) for k in plain} == plain
    # chunk 0 of micro-batch 0 has no supervised target: its mean-reduced loss is NaN, as DataParallel's is
    assert report.micro_batches[0].non_finite_loss_batches == 1
    assert report.micro_batches[1].loss_sum == pytest.approx(float(mean_losses[1]))


# ----------------------------------------------------------------------------------------- parts
def test_row_chunks_merge_to_the_whole_batch():
    ids, labels, mask = _batch(3, 6, 10, prompt=4)
    labels[2:4] = IGNORE  # a chunk whose rows are all prompt
    losses = [torch.tensor(1.25, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64),
              torch.tensor(2.0, dtype=torch.float64)]
    parts = torch.stack([batch_stats(labels[i:i + 2], attention_mask=mask[i:i + 2], loss=losses[i // 2])
                         for i in (0, 2, 4)])
    whole = batch_stats(labels, attention_mask=mask, loss=torch.stack(losses).mean())
    assert torch.equal(merge_row_parts(parts), whole)
    assert as_dict(whole)["all_masked_batches"] == 0 and as_dict(parts[1])["all_masked_batches"] == 1


@pytest.mark.parametrize("n_shards", [2, 3])
def test_sequence_shards_combine_to_the_whole_batch(n_shards):
    length = 12
    _, labels, mask = _batch(7, 4, length, prompt=7)
    labels[3] = IGNORE  # one row really fully masked
    mask[1, 4:] = 0  # a row mostly padding: later shards hold no real token of it
    labels[1, 4:] = IGNORE
    shift = torch.nn.functional.pad(labels, (0, 1), value=IGNORE)[:, 1:]
    w = length // n_shards
    loss_parts = [torch.tensor(0.5 * i) for i in range(n_shards)]
    vecs, blocks = [], []
    for i in range(n_shards):
        cols = slice(i * w, (i + 1) * w)
        vecs.append(batch_stats(None, shift_labels=shift[:, cols], attention_mask=mask[:, cols], loss=loss_parts[i]))
        blocks.append(shard_rows(shift[:, cols], mask[:, cols]))
    # what the all_reduce over the sequence group sums
    summed, rows_sum = torch.stack(vecs).sum(0, keepdim=True), torch.stack(blocks).sum(0)
    got = from_shards(summed, rows_sum, [labels.shape[0]])[0]
    whole = batch_stats(labels, attention_mask=mask, loss=sum(loss_parts))
    assert {f: v for f, v in as_dict(got).items() if f not in TEMPLATE} == \
        {f: v for f, v in as_dict(whole).items() if f not in TEMPLATE}
    assert as_dict(vecs[0])["all_masked_batches"] == 1  # shard 0 by itself looks all masked
    assert as_dict(got)["all_masked_batches"] == 0
    assert {k: as_dict(got)[k] for k in _plain_count(labels, mask)} == _plain_count(labels, mask)


def test_sequence_group_needs_the_data_parallel_group_and_shift_labels():
    with pytest.raises(ValueError, match="needs process_group"):
        MaskAuditor(sequence_group=object())
    from mask_monitor.stats import UnsupportedBatch

    with pytest.raises(UnsupportedBatch, match="needs shift_labels"):
        shard_rows(None, None, labels=torch.zeros(1, 4, dtype=torch.long))


# ----------------------------------------------------------------------------------------- bounded totals
def _reachable(root: object) -> tuple[int, int]:
    """Objects reachable from ``root`` and their sizes: containers, tensors, reports (scalars, whose
    identity depends on their value, and modules, classes, functions and the lock left out)."""
    seen: set[int] = set()
    stack = [root]
    size = 0
    skip = (types.ModuleType, type, types.FunctionType, types.BuiltinFunctionType, types.MethodType,
            int, float, str, bytes, type(None))
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, skip) or type(obj).__name__ == "lock":
            continue
        seen.add(id(obj))
        size += sys.getsizeof(obj)
        if isinstance(obj, torch.Tensor):
            size += obj.untyped_storage().nbytes()
        stack.extend(gc.get_referents(obj))
    return len(seen), size


def test_run_totals_constant_in_steps_plain_loop():
    auditor = MaskAuditor()
    _, labels, mask = _batch(5, 2, 16, prompt=5)
    sizes = {}
    for step in range(1, 3001):
        for _ in range(3):  # three micro-batches per step
            auditor.update(labels, attention_mask=mask, loss=torch.tensor(1.0))
        auditor.step()
        if step in (100, 3000):
            sizes[step] = _reachable(auditor)
    assert auditor.steps == 3000 and auditor.summary()["micro_batches"] == 9000
    assert sizes[100] == sizes[3000]
    window = auditor.window()  # nothing per step was kept, yet the window covers every step
    assert (window.first_step, window.last_step, window.steps) == (1, 3000, 3000)
    assert window.total.micro_batches == 9000


def test_run_totals_constant_in_steps_trainer_logging_off(zephyr_tokenizer, tmp_path):
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    from mask_monitor import MaskMonitorCallback

    cb = MaskMonitorCallback(template=None, wandb=False)
    sizes: dict[int, tuple[int, int]] = {}

    class Measure(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            sizes[state.global_step] = _reachable(cb.auditor)

    examples = rows(zephyr_tokenizer, "assistant") * 5
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=1, max_steps=30,
                             logging_strategy="no", report_to="none", use_cpu=True, save_strategy="no",
                             disable_tqdm=True, seed=0)
    trainer = Trainer(model=tiny_llama(len(zephyr_tokenizer)), args=args, train_dataset=dataset(examples),
                      data_collator=DataCollatorForSeq2Seq(zephyr_tokenizer, padding=True), callbacks=[cb, Measure()])
    trainer.train()
    assert cb.summary()["steps"] == 30 and cb.summary()["micro_batches"] == 30
    assert sizes[5] == sizes[30], {k: sizes[k] for k in (2, 5, 10, 30)}


# ----------------------------------------------------------------------------------------- evidence
def _report(rank: int, micro: tuple[Totals, ...]) -> StepReport:
    healthy = Totals(micro_batches=3, sequences=3, target_tokens=30, supervised_tokens=12, loss_batches=3)
    sick = Totals(micro_batches=3, sequences=3, target_tokens=30, supervised_tokens=12, loss_batches=3,
                  non_finite_loss_batches=1)
    first_sick = [-1] * len(FIELDS)
    for f in ("micro_batches", "sequences", "target_tokens", "supervised_tokens", "loss_batches"):
        first_sick[FIELDS.index(f)] = 0
    first_sick[FIELDS.index("non_finite_loss_batches")] = 2
    first_healthy = [0 if v >= 0 else -1 for v in first_sick]
    first_healthy[FIELDS.index("non_finite_loss_batches")] = -1
    return StepReport(step=2, rank=rank, world_size=2, total=healthy + sick, per_rank=(healthy, sick),
                      micro_batches=micro, ranks=(0, 1), first_positive=(tuple(first_healthy), tuple(first_sick)))


def test_evidence_names_the_rank_and_micro_batch_at_fault(tmp_path):
    ok = Totals(micro_batches=1, sequences=1, target_tokens=10, supervised_tokens=4, loss_batches=1)
    nan = Totals(micro_batches=1, sequences=1, target_tokens=10, supervised_tokens=4, loss_batches=1,
                 non_finite_loss_batches=1)
    on_rank0, on_rank1 = _report(0, (ok, ok, ok)), _report(1, (ok, ok, nan))
    assert offending("non_finite_loss", on_rank0) == (1, 2)  # from rank 1's exchanged first indices
    assert offending("non_finite_loss", on_rank1) == (1, 2)  # from its own micro-batch counts
    rows_ = [{"labels": [[i, i]], "input_ids": [[i, i]]} for i in range(3)]
    import json

    for rank, report in ((0, on_rank0), (1, on_rank1)):
        path = write_evidence(output_dir=tmp_path, reason="non_finite_loss", step=2, rank=rank, numbers={},
                              report=report, rows=rows_)
        doc = json.loads(open(path).read())
        sample = doc["offending_micro_batch"]
        assert doc["offending_rank"] == 1 and sample["rank"] == 1 and sample["micro_batch_index"] == 2
        if rank == 0:  # rank 0 does not present its own healthy rows as the offending batch
            assert "labels" not in sample and sample["rows_in"] == "abort-rank1.json"
        else:
            assert sample["labels"] == [[2, 2]] and "rows_in" not in sample
