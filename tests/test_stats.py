"""batch_stats against an independent plain-Python count, on hand-written and random batches."""

from __future__ import annotations

import random

import pytest
import torch

from mask_monitor import FIELDS, MonitorConfig, batch_stats
from mask_monitor.stats import (
    ROLE_ASSISTANT_CONTENT,
    ROLE_ASSISTANT_HEADER,
    ROLE_END_OF_TURN,
    ROLE_OTHER,
    ROLE_SEPARATOR,
    ROLE_UNKNOWN,
    ROLE_USER,
    SEQUENCE_FIELDS,
    SLOT_STATUSES,
    UnsupportedBatch,
    as_dict,
    combine,
    sequence_stats,
    slot_status,
)

IGN = -100


ANSWER = (ROLE_ASSISTANT_HEADER, ROLE_ASSISTANT_CONTENT, ROLE_END_OF_TURN, ROLE_SEPARATOR)


def responses_reference(roles, valid, new_doc, seq_len, max_length=None):
    """Walk each row's slots once: a turn is a run of answer slots of one sequence, split where a header
    starts (a header slot not preceded by a header of the same run); it is a response unless it is a header
    alone; closed when its last slot is an end of turn or separator; an open one is truncated when it
    reaches the end of a sequence that may be cut, else unterminated."""
    B, W = len(roles), len(roles[0])
    doc_of, doc_len, doc = {}, [], -1
    for b in range(B):
        for j in range(W):
            if j == 0 or new_doc[b][j]:
                doc += 1
                doc_len.append(0)
            doc_of[b, j] = doc
            doc_len[doc] += int(valid[b][j])
    out = {"assistant_responses": 0, "unterminated_responses": 0, "truncated_responses": 0}
    if not doc_len:
        return out

    def answer(b, j):
        return valid[b][j] and roles[b][j] in ANSWER

    def continues(b, j):  # slot j belongs to the turn of slot j - 1
        if j == 0 or new_doc[b][j] or not answer(b, j - 1):
            return False
        return not (roles[b][j] == ROLE_ASSISTANT_HEADER and roles[b][j - 1] != ROLE_ASSISTANT_HEADER)

    for b in range(B):
        j = 0
        while j < W:
            if not answer(b, j):
                j += 1
                continue
            k = j
            while k + 1 < W and answer(b, k + 1) and continues(b, k + 1):
                k += 1
            last_role = roles[b][k]
            followed = k + 1 < W and valid[b][k + 1] and not new_doc[b][k + 1]
            if max_length is None:
                cut = doc_len[doc_of[b, k]] == max(doc_len) or k == seq_len - 2
            else:
                cut = doc_len[doc_of[b, k]] + 1 >= max_length or (k == seq_len - 2 and seq_len >= max_length)
            if last_role != ROLE_ASSISTANT_HEADER:
                out["assistant_responses"] += 1
                if last_role == ROLE_ASSISTANT_CONTENT:
                    key = "truncated_responses" if (not followed and cut) else "unterminated_responses"
                    out[key] += 1
            j = k + 1
    return out


def reference(labels, attention=None, position_ids=None, shift_labels=None, roles=None, max_length=None):
    """Slow, obvious, per-token count of what a shifted causal-LM loss sees."""
    B, L = len(labels), len(labels[0])
    out = dict.fromkeys(FIELDS, 0.0)
    out["micro_batches"] = 1
    seqs = []  # (slots, supervised, holds a template marker) per sequence
    W = L if shift_labels is not None else L - 1  # slot columns
    grid_valid = [[False] * W for _ in range(B)]
    grid_new_doc = [[False] * W for _ in range(B)]
    grid_role = [[0] * W for _ in range(B)]
    for b in range(B):
        cur = None
        marked = _marked_by_position(roles[b], position_ids[b] if position_ids is not None else None) \
            if roles is not None else [False] * L
        for j in range(L):
            starts = j == 0 or (position_ids is not None and position_ids[b][j] == 0)
            if starts:
                cur = [0, 0, marked[j]]
                seqs.append(cur)
            if shift_labels is not None:
                tgt = shift_labels[b][j]
                # the token predicted is j + 1; past the last column it is unknown (a slot only if supervised)
                if j + 1 < L:
                    real = attention[b][j + 1] if attention is not None else True
                else:
                    real = False
                boundary = position_ids is not None and j + 1 < L and position_ids[b][j + 1] == 0
            else:
                if j == L - 1:
                    tgt, real, boundary = IGN, False, False
                else:
                    tgt = labels[b][j + 1]
                    real = attention[b][j + 1] if attention is not None else True
                    boundary = position_ids is not None and position_ids[b][j + 1] == 0
            valid = bool(real) and not boundary
            if j < W:
                grid_valid[b][j], grid_new_doc[b][j] = valid, starts
                if roles is not None:
                    grid_role[b][j] = roles[b][j + 1] if j + 1 < L else 0
            sup = tgt != IGN
            if valid or sup:
                out["target_tokens"] += 1
                cur[0] += 1
            if sup:
                out["supervised_tokens"] += 1
                cur[1] += 1
                if not valid:
                    out["supervised_padding_tokens"] += 1
            if roles is not None:
                role = roles[b][j + 1] if j + 1 < L else 0
                eot_first = role == ROLE_END_OF_TURN and not (j >= 1 and roles[b][j] == ROLE_END_OF_TURN)
                # rows / documents without any marker, and fragments before a row's first turn, are not audited
                if sup and marked[j] and role != ROLE_UNKNOWN:
                    out["audited_supervised_tokens"] += 1
                    if role not in ANSWER:
                        out["prompt_leakage_tokens"] += 1
                if sup and role == ROLE_ASSISTANT_HEADER:  # headers are counted apart, wherever they are
                    out["supervised_header_tokens"] += 1
                if role == ROLE_ASSISTANT_CONTENT and (valid or sup):
                    out["assistant_content_tokens"] += 1
                if role == ROLE_ASSISTANT_CONTENT and sup:
                    out["supervised_assistant_content_tokens"] += 1
                if eot_first and (valid or sup):
                    out["assistant_turns"] += 1
                if eot_first and sup:
                    out["supervised_eot_turns"] += 1
    if roles is not None:
        out.update(responses_reference(grid_role, grid_valid, grid_new_doc, L, max_length))
    out["masked_tokens"] = out["target_tokens"] - out["supervised_tokens"]
    live = [s for s in seqs if s[0] > 0]
    out["sequences"] = len(live)
    out["fully_masked_sequences"] = sum(1 for s in live if s[1] == 0)
    out["unmasked_sequences"] = sum(1 for s in live if s[1] == s[0])
    if roles is not None:
        out["untemplated_sequences"] = sum(1 for s in live if not s[2])
    out["all_masked_batches"] = float(out["supervised_tokens"] == 0)
    out["unmasked_batches"] = float(out["masked_tokens"] == 0 and out["target_tokens"] > 0)
    out["max_masked_ratio"] = out["masked_tokens"] / out["target_tokens"] if out["target_tokens"] else 0.0
    return out


def _marked_by_position(roles_row, pos_row=None):
    """Per position: does its row (or packed document) hold any template marker (a role other than other / unknown)?"""
    L = len(roles_row)
    docs, cur = [], -1
    for j in range(L):
        if j == 0 or (pos_row is not None and pos_row[j] == 0):
            cur += 1
        docs.append(cur)
    has = {d for d, r in zip(docs, roles_row, strict=True) if r not in (ROLE_OTHER, ROLE_UNKNOWN)}
    return [d in has for d in docs]


def check(labels, max_length=None, **kw):
    t = {k: (torch.tensor(v) if v is not None else None) for k, v in kw.items()}
    got = as_dict(batch_stats(torch.tensor(labels), max_length=max_length, **t))
    exp = reference(labels, attention=kw.get("attention_mask"), position_ids=kw.get("position_ids"),
                    shift_labels=kw.get("shift_labels"), roles=kw.get("roles"), max_length=max_length)
    for k in FIELDS:
        if k.startswith("loss") or k.endswith("loss_batches"):
            continue
        assert got[k] == pytest.approx(exp[k]), k
    return got


def test_hand_written_right_padding():
    labels = [[IGN, IGN, 5, 6, IGN], [IGN, 7, 8, IGN, IGN]]
    attn = [[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]]
    got = check(labels, attention_mask=attn)
    # row 0: targets 1..3 real (3 slots), supervised 5,6; row 1: targets 1..2 real, supervised 7,8
    assert (got["target_tokens"], got["supervised_tokens"], got["masked_tokens"]) == (5, 4, 1)
    assert (got["sequences"], got["fully_masked_sequences"], got["unmasked_sequences"]) == (2, 0, 1)


def test_label_at_position_zero_is_never_a_target():
    got = check([[9, IGN, IGN]])
    assert got["supervised_tokens"] == 0 and got["all_masked_batches"] == 1 and got["fully_masked_sequences"] == 1


def test_packed_padding_free_boundary_is_not_a_target():
    # two documents in one row: [a b c | d e]; TRL sets the label of each document's first token to -100
    labels = [[IGN, 2, 3, IGN, 5]]
    pos = [[0, 1, 2, 0, 1]]
    got = check(labels, position_ids=pos)
    assert got["sequences"] == 2 and got["target_tokens"] == 3 and got["supervised_tokens"] == 3
    # a fully masked second document
    got = check([[IGN, 2, 3, IGN, IGN, IGN]], position_ids=[[0, 1, 2, 0, 1, 2]])
    assert got["sequences"] == 2 and got["fully_masked_sequences"] == 1


def test_supervised_boundary_counts_as_padding_training():
    got = check([[IGN, 2, 3, 4, 5]], position_ids=[[0, 1, 2, 0, 1]])
    assert got["supervised_padding_tokens"] == 1 and got["supervised_tokens"] == 4


def test_shift_labels_replace_labels():
    got = check([[0, 0, 0]], shift_labels=[[5, IGN, IGN]], attention_mask=[[1, 1, 1]])
    assert got["supervised_tokens"] == 1


def test_loss_flags():
    lab = torch.tensor([[IGN, 3, 4]])
    d = as_dict(batch_stats(lab, loss=torch.tensor(0.0)))
    assert d["zero_loss_batches"] == 1 and d["loss_batches"] == 1 and d["non_finite_loss_batches"] == 0
    d = as_dict(batch_stats(lab, loss=torch.tensor(float("nan"))))
    assert d["non_finite_loss_batches"] == 1 and d["loss_sum"] == 0
    d = as_dict(batch_stats(torch.full((1, 3), IGN), loss=torch.tensor(0.0)))
    assert d["zero_loss_batches"] == 0 and d["all_masked_batches"] == 1  # TRL's clamp: 0 with no targets
    d = as_dict(batch_stats(lab, loss=2.5))
    assert d["loss_sum"] == 2.5


def test_roles_leakage_coverage_eot():
    U, H, C, E = ROLE_USER, ROLE_ASSISTANT_HEADER, ROLE_ASSISTANT_CONTENT, ROLE_END_OF_TURN
    ids_roles = [[U, U, U, H, H, C, C, C, E, E]]
    assistant_only = [[IGN, IGN, IGN, IGN, IGN, 5, 6, 7, 8, IGN]]
    got = check(assistant_only, roles=ids_roles)
    assert got["prompt_leakage_tokens"] == 0 and got["assistant_content_tokens"] == 3
    assert got["supervised_assistant_content_tokens"] == 3
    assert got["assistant_turns"] == 1 and got["supervised_eot_turns"] == 1
    everything = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]]
    got = check(everything, roles=ids_roles)
    assert got["prompt_leakage_tokens"] == 2  # targets 1..2 are user tokens
    assert got["supervised_header_tokens"] == 2  # targets 3..4: the assistant header, counted apart


def test_random_batches_match_reference():
    rng = random.Random(0)
    for _ in range(300):
        B, L = rng.randint(1, 4), rng.randint(2, 12)
        labels = [[rng.choice([IGN, IGN, rng.randint(0, 50)]) for _ in range(L)] for _ in range(B)]
        kw = {}
        if rng.random() < 0.5:
            lens = [rng.randint(1, L) for _ in range(B)]
            kw["attention_mask"] = [[1 if j < n else 0 for j in range(L)] for n in lens]
        if rng.random() < 0.4:
            pos = []
            for _ in range(B):
                row, p = [], 0
                for j in range(L):
                    if j > 0 and rng.random() < 0.25:
                        p = 0
                    row.append(p)
                    p += 1
                pos.append(row)
            kw["position_ids"] = pos
        if rng.random() < 0.5:
            kw["roles"] = [[rng.choice([0, 1, 2, 3, 3, 3, 4, 4, 5, 6]) for _ in range(L)] for _ in range(B)]
        if rng.random() < 0.3:  # already shifted targets (context parallelism): any values, any masks
            kw["shift_labels"] = [[rng.choice([IGN, rng.randint(0, 50)]) for _ in range(L)] for _ in range(B)]
        check(labels, max_length=rng.choice([None, None, rng.randint(2, 12)]), **kw)


def _random_tensors(rng: random.Random, roles: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Random labels (width 1..12) with, at random, right padding and packed documents; roles if asked."""
    B, L = rng.randint(1, 4), rng.randint(1, 12)
    labels = torch.tensor([[rng.choice([IGN, IGN, rng.randint(0, 50)]) for _ in range(L)] for _ in range(B)])
    kw = {}
    if rng.random() < 0.5:
        kw["attention_mask"] = torch.tensor([[int(j < n) for j in range(L)] for n in
                                             (rng.randint(0, L) for _ in range(B))])
    if rng.random() < 0.5:
        kw["position_ids"] = torch.tensor([[0 if j == 0 or rng.random() < 0.25 else 1 for j in range(L)]
                                           for _ in range(B)])
    if roles:
        kw["roles"] = torch.tensor([[rng.choice([0, 1, 2, 3, 3, 3, 4, 4, 5, 6]) for _ in range(L)] for _ in range(B)])
    return labels, kw


def test_shifted_and_unshifted_forms_of_one_batch_count_the_same():
    """shift_labels = labels[:, 1:] + [ignore] is the same batch: every field must agree."""
    rng = random.Random(7)
    for _ in range(300):
        labels, kw = _random_tensors(rng, roles=rng.random() < 0.5)
        B = labels.shape[0]
        shifted = torch.cat([labels[:, 1:], torch.full((B, 1), IGN)], dim=1)
        a = batch_stats(labels, **kw)
        b = batch_stats(torch.zeros_like(labels), shift_labels=shifted, **kw)
        assert torch.equal(a, b), (labels, kw)
        sa = sequence_stats(labels, **kw)
        sb = sequence_stats(torch.zeros_like(labels), shift_labels=shifted, **kw)
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), (labels, kw)
        assert torch.equal(slot_status(labels, **kw), slot_status(labels, shift_labels=shifted, **kw))


def _statuses_by_hand(labels, attention=None, position_ids=None, roles=None):
    """Per input token, in words: the slot rules spelled out one token at a time."""
    out = ["none"]
    marked = _marked_by_position(roles, position_ids) if roles is not None else None
    for j in range(1, len(labels)):
        real = attention is None or attention[j] == 1
        crosses = position_ids is not None and position_ids[j] == 0
        sup = labels[j] != IGN
        # token j is the target of slot j - 1, which belongs to the document of position j - 1
        if sup and roles is not None and marked[j - 1] and roles[j] not in (
                ROLE_ASSISTANT_CONTENT, ROLE_END_OF_TURN, ROLE_ASSISTANT_HEADER):
            out.append("leakage")
        elif sup:
            out.append("supervised")
        elif real and not crosses:
            out.append("masked")
        else:
            out.append("padding")
    return out


def test_slot_status_follows_the_slot_rules():
    rng = random.Random(11)
    for _ in range(200):
        L = rng.randint(1, 10)
        labels = [rng.choice([IGN, rng.randint(0, 9)]) for _ in range(L)]
        attn = [int(j < rng.randint(0, L)) for j in range(L)] if rng.random() < 0.5 else None
        pos = [0 if j == 0 or rng.random() < 0.3 else 1 for j in range(L)] if rng.random() < 0.5 else None
        roles = [rng.randint(0, 5) for _ in range(L)] if rng.random() < 0.5 else None
        t = {k: torch.tensor([v]) for k, v in
             (("attention_mask", attn), ("position_ids", pos), ("roles", roles)) if v is not None}
        got = [SLOT_STATUSES[c] for c in slot_status(torch.tensor([labels]), **t)[0].tolist()]
        assert got == _statuses_by_hand(labels, attn, pos, roles), (labels, attn, pos, roles)


def test_sequence_stats_add_up_to_batch_stats():
    rng = random.Random(5)
    for _ in range(300):
        labels, kw = _random_tensors(rng, roles=True)
        stats = as_dict(batch_stats(labels, **kw))
        table = sequence_stats(labels, **kw)
        for name in SEQUENCE_FIELDS:
            assert int(table[name].sum()) == stats[name], (name, labels, kw)
        assert len(table["target_tokens"]) == stats["sequences"]
        assert int((table["supervised_tokens"] == 0).sum()) == stats["fully_masked_sequences"]
        assert int((table["supervised_tokens"] == table["target_tokens"]).sum()) == stats["unmasked_sequences"]


def test_sequence_stats_by_hand():
    labels = torch.tensor([[IGN, IGN, 5, 6, IGN], [IGN, 3, 4, IGN, IGN]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    t = sequence_stats(labels, attention_mask=mask)
    # row 0: targets at slots 0..2 (labels[1:4]); row 1: slots 0..1 (labels[1:3])
    assert t["target_tokens"].tolist() == [3, 2] and t["supervised_tokens"].tolist() == [2, 2]
    assert t["start"].tolist() == [0, 0] and t["end"].tolist() == [4, 3]
    packed = sequence_stats(torch.tensor([[IGN, 5, 6, IGN, IGN, 9]]), position_ids=torch.tensor([[0, 1, 2, 0, 1, 2]]))
    # documents [0:3] and [3:6]: the target across the boundary is not a slot
    assert packed["target_tokens"].tolist() == [2, 2] and packed["supervised_tokens"].tolist() == [2, 1]
    assert packed["start"].tolist() == [0, 3] and packed["end"].tolist() == [3, 6]
    assert packed["segment"].tolist() == [0, 1] and packed["row"].tolist() == [0, 0]


def test_unsupported_shapes_raise_unsupported_batch():
    with pytest.raises(UnsupportedBatch):
        batch_stats(torch.zeros(2, 3, 4, dtype=torch.long))
    with pytest.raises(UnsupportedBatch):
        batch_stats(torch.zeros(2, 3, dtype=torch.long), attention_mask=torch.ones(2, 4))


def test_combine_sums_counts_and_takes_max_ratio():
    a = batch_stats(torch.tensor([[IGN, IGN, 3]]))
    b = batch_stats(torch.tensor([[IGN, 2, 3]]))
    c = as_dict(combine(torch.stack([a, b])))
    assert c["micro_batches"] == 2 and c["target_tokens"] == 4 and c["supervised_tokens"] == 3
    assert c["max_masked_ratio"] == 0.5


def test_config_env_and_validation():
    cfg = MonitorConfig.resolve({}, env={"MASK_MONITOR_ALL_MASKED": "warn", "MASK_MONITOR_EVIDENCE_ROWS": "5"})
    assert cfg.all_masked == "warn" and cfg.evidence_rows == 5
    assert MonitorConfig.resolve({"all_masked": "off"}, env={"MASK_MONITOR_ALL_MASKED": "warn"}).all_masked == "off"
    with pytest.raises(ValueError, match="expected one of 'abort', 'warn', 'off'"):
        MonitorConfig(zero_loss="explode")
    with pytest.raises(ValueError, match="unknown setting 'bogus'"):
        MonitorConfig.resolve({"bogus": 1})
    with pytest.raises(ValueError, match="between 0 and 1"):
        MonitorConfig(prompt_leakage_threshold=2)


# ---------------------------------------------------------------------------- loss vectors, element by element
LOSS_CASES = [  # (loss, zero_loss_batches, non_finite_loss_batches, loss_sum); row 0 of LOSS_LABELS has no target
    (0.0, 1, 0, 0.0),  # a scalar 0 with supervised targets
    ([0.0, 1.0, float("nan"), 2.0], 0, 1, 0.0),  # per row: a NaN in row 2 is seen
    ([0.0, 1.0, 1.0, 2.0], 0, 0, 1.0),  # per row: the fully masked row's 0 is no finding
    ([0.0, 0.0, 0.0, 0.0], 1, 0, 0.0),  # per row: every supervised row exactly 0
    ([0.0, 0.0, 1.0, 1.0], 0, 0, 0.5),  # per row: one supervised row at 0, the others not: not a zero loss
    ([0.0, 0.0], 1, 0, 0.0),  # another length (per device): zero only if every element is 0
    ([0.0, 3.0], 0, 0, 1.5),
    ([float("inf"), 3.0], 0, 1, 0.0),
]
LOSS_LABELS = [[IGN] * 4, [IGN, IGN, 5, 6], [IGN, 7, 8, 9], [IGN, IGN, IGN, 4]]


@pytest.mark.parametrize("loss,zero,non_finite,loss_sum", LOSS_CASES)
def test_loss_vectors_are_checked_element_by_element(loss, zero, non_finite, loss_sum):
    got = as_dict(batch_stats(torch.tensor(LOSS_LABELS), loss=torch.tensor(loss)))
    assert (got["zero_loss_batches"], got["non_finite_loss_batches"]) == (zero, non_finite)
    assert (got["loss_batches"], got["loss_sum"]) == (1, loss_sum)


def test_unread_labels_loss_vector():
    got = as_dict(batch_stats(None, loss=torch.tensor([0.0, 0.0])))
    assert (got["unaudited_batches"], got["micro_batches"], got["zero_loss_batches"]) == (1, 0, 1)
    got = as_dict(batch_stats(None, loss=torch.tensor([1.0, float("nan")])))
    assert (got["non_finite_loss_batches"], got["zero_loss_batches"]) == (1, 0)


def test_rows_without_template_markers_are_not_audited_for_leakage():
    # row 0: plain text (no marker, every target supervised); row 1: user turn then assistant content
    labels = torch.tensor([[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6]])
    roles = torch.tensor([[ROLE_OTHER] * 6, [ROLE_USER, ROLE_USER, ROLE_ASSISTANT_HEADER, ROLE_ASSISTANT_CONTENT,
                                             ROLE_ASSISTANT_CONTENT, ROLE_END_OF_TURN]])
    got = as_dict(batch_stats(labels, roles=roles))
    assert got["untemplated_sequences"] == 1 and got["sequences"] == 2
    assert got["audited_supervised_tokens"] == 5  # row 1's 5 targets only
    assert got["prompt_leakage_tokens"] == 1 and got["supervised_header_tokens"] == 1  # targets 1 (user), 2 (header)
    assert [SLOT_STATUSES[c] for c in slot_status(labels, roles=roles)[0].tolist()] == ["none"] + ["supervised"] * 5
    table = sequence_stats(labels, roles=roles)
    assert table["prompt_leakage_tokens"].tolist() == [0, 1]
    # nothing in the batch carries a marker: leakage is not audited at all (no ratio), never 100%
    plain = as_dict(batch_stats(labels, roles=torch.zeros_like(roles)))
    assert (plain["untemplated_sequences"], plain["audited_supervised_tokens"], plain["prompt_leakage_tokens"]) == (
        2, 0, 0)
