"""The GPU path: no host sync per micro-batch, exactly one per optimizer step, the abort on CUDA.

Runs only where ``torch.cuda.is_available()``; everywhere else every test is skipped with the reason.
``torch.cuda.set_sync_debug_mode("error")`` turns any synchronising CUDA call (a device-to-host copy,
``.item()``, ``nonzero()``, a stream synchronise) into an exception, so ``MaskAuditor.update`` running
under it proves the per-micro-batch path never waits for the device; in ``"warn"`` mode each such call
emits one warning, which counts the syncs of ``MaskAuditor.step`` (one: its single read-back).
"""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
from trainer_utils import IGNORE, assert_params_equal, dataset, params_snapshot, rows, tiny_llama

from mask_monitor import MaskAuditor, MaskMonitorAbort, MaskMonitorCallback
from mask_monitor.stats import FIELDS, as_dict, batch_stats

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available() False)"),
]
SYNC_WARNING = "called a synchronizing CUDA operation"


def _batches(device: str = "cuda") -> list[dict[str, torch.Tensor]]:
    """Micro-batches covering every code path: plain, padded, packed, all masked, with a loss."""
    torch.manual_seed(0)
    ids = torch.randint(3, 1000, (4, 64))
    labels = ids.clone()
    labels[:, :20] = IGNORE
    mask = torch.ones(4, 64, dtype=torch.long)
    mask[1, 50:] = 0
    labels[1, 50:] = IGNORE
    pos = (torch.arange(64) % 16).expand(4, 64).contiguous()
    out = [
        {"labels": labels, "input_ids": ids, "loss": torch.tensor(2.5)},
        {"labels": labels, "input_ids": ids, "attention_mask": mask, "loss": torch.tensor(1.0)},
        {"labels": labels, "input_ids": ids, "position_ids": pos, "loss": torch.tensor(float("nan"))},
        {"labels": torch.full((4, 64), IGNORE), "input_ids": ids, "loss": torch.tensor(0.0)},
    ]
    return [{k: v.to(device) for k, v in b.items()} for b in out]


@contextlib.contextmanager
def sync_mode(mode: str):
    """Run the block under torch.cuda.set_sync_debug_mode(mode), restoring the previous mode."""
    prev = torch.cuda.get_sync_debug_mode()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(prev)


def test_update_never_syncs_and_step_syncs_once():
    auditor = MaskAuditor()
    batches = _batches()
    with sync_mode("error"):
        for b in batches:
            auditor.update(**b)  # raises RuntimeError on any synchronising call
    with sync_mode("warn"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = auditor.step()
    syncs = [w for w in caught if SYNC_WARNING in str(w.message)]
    assert len(syncs) == 1, [str(w.message) for w in syncs]
    # and the numbers are those the CPU computes from the same batches
    cpu = [as_dict(batch_stats(**{k: v.cpu() for k, v in b.items() if k != "input_ids"})) for b in batches]
    assert report.total.micro_batches == 4
    assert report.total.supervised_tokens == sum(c["supervised_tokens"] for c in cpu)
    assert report.total.target_tokens == sum(c["target_tokens"] for c in cpu)
    assert report.total.all_masked_batches == 1 and report.total.non_finite_loss_batches == 1
    for got, want in zip(report.micro_batches, cpu, strict=True):
        assert {f: getattr(got, f) for f in FIELDS} == want


def test_batch_stats_on_cuda_equals_cpu_and_stays_on_device():
    for b in _batches():
        args = {k: v for k, v in b.items() if k != "input_ids"}
        with sync_mode("error"):
            vec = batch_stats(**args)
        assert vec.device.type == "cuda" and vec.shape == (len(FIELDS),)
        assert torch.equal(vec.cpu(), batch_stats(**{k: v.cpu() for k, v in args.items()}))


def test_role_tagger_update_never_syncs(zephyr_tokenizer):
    templates = pytest.importorskip("mask_monitor.templates")
    template = templates.detect_template(zephyr_tokenizer)
    assert template is not None
    tagger = templates.RoleTagger.from_tokenizer(zephyr_tokenizer, template)
    examples = rows(zephyr_tokenizer, "assistant", n=4)
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.tensor([e["input_ids"] + [zephyr_tokenizer.pad_token_id] * (width - len(e["input_ids"]))
                        for e in examples], device="cuda")
    labels = torch.tensor([e["labels"] + [IGNORE] * (width - len(e["labels"])) for e in examples], device="cuda")
    auditor = MaskAuditor(role_tagger=tagger)
    with sync_mode("error"):
        auditor.update(labels, input_ids=ids)
    report = auditor.step()
    # assistant-only labels: every supervised target is assistant content or its end of turn
    assert report.total.prompt_leakage_tokens == 0
    assert report.total.audited_supervised_tokens == report.total.supervised_tokens > 0


def test_all_masked_aborts_on_cuda_before_the_update(zephyr_tokenizer, tmp_path):
    trl = pytest.importorskip("trl")
    examples = rows(zephyr_tokenizer, "all", n=4)
    model = tiny_llama(len(zephyr_tokenizer)).to("cuda")
    before = params_snapshot(model)
    cb = MaskMonitorCallback()
    config = trl.SFTConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, num_train_epochs=1,
                           max_length=None, report_to="none", save_strategy="no", disable_tqdm=True,
                           logging_steps=1, seed=0, learning_rate=1e-2)
    trainer = trl.SFTTrainer(model=model, args=config, train_dataset=dataset(examples),
                             processing_class=zephyr_tokenizer, callbacks=[cb])
    assert trainer.args.device.type == "cuda"
    with pytest.raises(MaskMonitorAbort) as info:
        trainer.train()
    assert info.value.reason == "all_masked" and info.value.step == 1
    assert trainer.state.global_step == 0
    assert cb.last_report is not None and cb.last_report.total.supervised_tokens == 0
    assert next(model.parameters()).device.type == "cuda"
    assert_params_equal(before, params_snapshot(model))


def test_loss_vectors_and_untemplated_packed_rows_never_sync():
    """Per-row and per-device loss vectors (checked element by element) and the per-document template
    marking of packed rows (rows / documents without markers are not audited for leakage) stay on device."""
    torch.manual_seed(0)
    labels = torch.randint(3, 1000, (4, 32))
    labels[0] = IGNORE
    pos = (torch.arange(32) % 8).expand(4, 32).contiguous()
    roles = torch.zeros(4, 32, dtype=torch.long)
    roles[1, 8:16] = 4  # one document of row 1 is a chat render (assistant content), the rest is plain
    cases = [
        {"labels": labels, "loss": torch.tensor([0.0, 1.0, float("nan"), 2.0])},  # per row: NaN in row 2
        {"labels": labels, "loss": torch.tensor([0.0, 0.0])},  # per device: every element 0
        {"labels": labels, "position_ids": pos, "roles": roles, "loss": torch.tensor(1.5)},
    ]
    for case in cases:
        on_gpu = {k: v.to("cuda") for k, v in case.items()}
        with sync_mode("error"):
            vec = batch_stats(**on_gpu)
        assert torch.equal(vec.cpu(), batch_stats(**case))
