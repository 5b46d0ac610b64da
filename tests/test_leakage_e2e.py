"""End to end: SFTTrainer's default settings on a conversational dataset train on the whole conversation,
and the monitor says so with the right ratio; prompt/completion data (completion-only loss) is clean."""

from __future__ import annotations

import logging
import re

import pytest
from test_trainer import Recorder
from trainer_utils import CONVERSATIONS, tiny_llama

from mask_monitor import MaskMonitorCallback, assistant_token_mask

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
pytestmark = pytest.mark.slow


def _train(tokenizer, rows, tmp_path, cb):
    cfg = trl.SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, num_train_epochs=1,
                        report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True, logging_steps=1)
    trainer = trl.SFTTrainer(model=tiny_llama(len(tokenizer)), args=cfg, train_dataset=datasets.Dataset.from_list(rows),
                             processing_class=tokenizer, callbacks=[cb])
    trainer.train()
    return trainer


def test_default_conversational_sft_reports_prompt_leakage(zephyr_tokenizer, tmp_path, caplog):
    tok = zephyr_tokenizer
    convs = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": q},
              {"role": "assistant", "content": a}] for q, a in CONVERSATIONS[:4]]
    rec = Recorder()
    cb = MaskMonitorCallback(sinks=[rec])
    trainer = _train(tok, [{"messages": m} for m in convs], tmp_path, cb)

    # Independent expectation: labels == input_ids (TRL's default), so every target after position 0 is
    # supervised; the answer (content + end of turn) is assistant_token_mask (checked elsewhere against
    # an independent reference); the assistant header is what the generation prompt adds; what the turn
    # writes after its end of turn (the "\n" after </s>) is the answer's tail; the rest is prompt.
    supervised = leaked = headers = 0
    for i, m in enumerate(convs):
        ids = tok.apply_chat_template(m, tokenize=True, return_dict=False)
        assert trainer.train_dataset[i]["input_ids"] == list(ids)  # what TRL trains on
        answer = assistant_token_mask(tok, m)
        header = (len(tok.apply_chat_template(m[:-1], add_generation_prompt=True, tokenize=True, return_dict=False))
                  - len(tok.apply_chat_template(m[:-1], tokenize=True, return_dict=False)))
        tail = len(ids) - 1 - max(i for i, a in enumerate(answer) if a)
        assert tail >= 1 and not tok.decode(ids[-tail:]).strip()  # "\n" (one or two tokens, by version)
        supervised += len(ids) - 1
        headers += header
        leaked += (len(ids) - 1) - sum(answer[1:]) - header - tail
    s = cb.summary()
    assert s["template_family"] == "zephyr"
    assert (s["supervised_tokens"], s["audited_supervised_tokens"]) == (supervised, supervised)
    assert (s["prompt_leakage_tokens"], s["supervised_header_tokens"]) == (leaked, headers)
    assert s["prompt_leakage_ratio"] == pytest.approx(leaked / supervised)
    assert s["response_coverage_ratio"] == 1.0 and s["eot_supervised_ratio"] == 1.0
    assert s["findings"]["prompt_leakage"] == 2 and s["aborted"] is None

    warnings = [r.getMessage() for r in caplog.records
                if r.levelno == logging.WARNING and "[prompt_leakage]" in r.getMessage()]
    assert len(warnings) == 1
    m = re.search(r"(\d+) of (\d+) supervised targets \(([\d.]+)%\) in step 1", warnings[0])
    first = rec.steps[0].total
    assert (int(m[1]), int(m[2])) == (first.prompt_leakage_tokens, first.audited_supervised_tokens)
    assert float(m[3]) == round(100 * first.prompt_leakage_ratio, 1)
    assert "masking is disabled" in warnings[0] and "assistant_only_loss" in warnings[0]


def test_prompt_completion_sft_has_no_leakage(zephyr_tokenizer, tmp_path, caplog):
    rows = [{"prompt": [{"role": "user", "content": q}], "completion": [{"role": "assistant", "content": a}]}
            for q, a in CONVERSATIONS[:4]]
    cb = MaskMonitorCallback()
    _train(zephyr_tokenizer, rows, tmp_path, cb)
    s = cb.summary()
    assert s["prompt_leakage_tokens"] == 0 and s["audited_supervised_tokens"] == s["supervised_tokens"] > 0
    assert s["response_coverage_ratio"] == 1.0 and s["eot_supervised_ratio"] == 1.0
    assert s["findings"] == {}
    assert not [r for r in caplog.records if "[prompt_leakage]" in r.getMessage()]


def test_prompt_leakage_abort_action(zephyr_tokenizer, tmp_path):
    from mask_monitor import MaskMonitorAbort

    convs = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
             for q, a in CONVERSATIONS[:2]]
    cb = MaskMonitorCallback(prompt_leakage="abort")
    with pytest.raises(MaskMonitorAbort) as info:
        _train(zephyr_tokenizer, convs, tmp_path, cb)
    assert info.value.reason == "prompt_leakage" and info.value.step == 1
