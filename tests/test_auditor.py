"""MaskAuditor, the framework-agnostic core: micro-batches in, one report per optimizer step out."""

from __future__ import annotations

import pytest
import torch

from mask_monitor import MaskAuditor
from mask_monitor.reports import Totals

IGN = -100


def test_step_report_holds_each_micro_batch_and_their_total():
    aud = MaskAuditor()
    aud.update(torch.tensor([[IGN, IGN, 5, 6]]), loss=torch.tensor(1.0))
    aud.update(torch.tensor([[IGN, IGN, IGN, IGN]]), loss=torch.tensor(0.0))
    r = aud.step(7)
    assert (r.step, r.world_size, len(r.micro_batches)) == (7, 1, 2)
    a, b = r.micro_batches
    assert (a.target_tokens, a.supervised_tokens, b.supervised_tokens, b.all_masked_batches) == (3, 2, 0, 1)
    assert r.total == a + b == r.local
    assert r.total.loss_sum == 1.0 and r.total.zero_loss_batches == 0  # loss 0 without targets is not broken
    assert aud.pending_micro_batches == 0


def test_windows_and_state_roundtrip():
    aud = MaskAuditor()
    for n in (1, 2, 3):
        lab = torch.full((1, 4), IGN)
        lab[0, 4 - n :] = 1
        aud.update(lab)
        aud.step()
    w = aud.window()
    assert (w.first_step, w.last_step, w.steps) == (1, 3, 3)
    assert w.total.supervised_tokens == 6 and w.total.target_tokens == 9
    assert w.worst_batch["masked_ratio"] == pytest.approx(2 / 3) and w.worst_batch["step"] == 1
    assert aud.window() is None
    fresh = MaskAuditor()
    fresh.load_state_dict(aud.state_dict())
    assert fresh.summary() == aud.summary()


def test_reset_and_dataset_counts():
    aud = MaskAuditor()
    aud.update(torch.tensor([[IGN, 1, 2]]))
    aud.step()
    aud.reset()
    assert aud.summary()["steps"] == 0 and aud.summary()["micro_batches"] == 0
    aud.add_totals(Totals(dropped_sequences=3))
    aud.update(torch.tensor([[IGN, 1, 2]]))
    aud.step()
    s = aud.summary()
    assert (s["steps"], s["micro_batches"], s["dropped_sequences"], s["supervised_tokens"]) == (1, 1, 3, 2)


def test_unreadable_labels_count_the_loss_only():
    aud = MaskAuditor()
    aud.update(None, loss=torch.tensor(float("nan")))
    aud.update(torch.tensor([[IGN, 4, 5]]), input_ids=torch.tensor([[1, 4, 5]]), loss=torch.tensor(2.0))
    r = aud.step()
    t = r.total
    assert (t.micro_batches, t.unaudited_batches, t.loss_batches, t.non_finite_loss_batches) == (1, 1, 2, 1)
    assert t.loss_sum == 2.0 and t.supervised_tokens == 2
    rows = aud.evidence_rows_of_last_step()
    assert rows[0] == {} and rows[1]["labels"] == [[IGN, 4, 5]]  # aligned with the micro-batches


def test_encoder_decoder_labels_are_not_shifted():
    labels = torch.tensor([[5, 6, 7, IGN], [8, IGN, IGN, IGN]])
    decoder_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])  # row 1: one masked target, then padding
    aud = MaskAuditor()
    aud.update(labels, attention_mask=decoder_mask, causal=False)
    t = aud.step().total
    # every decoder position is a target slot (no shift); padding by the decoder's own mask
    assert (t.target_tokens, t.supervised_tokens, t.masked_tokens, t.sequences) == (5, 4, 1, 2)
    assert (t.unmasked_sequences, t.unmasked_batches) == (0, 0)  # no prompt in decoder labels: not a finding
    aud.update(labels, causal=False)  # no decoder mask: every position is a slot
    t = aud.step().total
    assert (t.target_tokens, t.supervised_tokens) == (8, 4)
