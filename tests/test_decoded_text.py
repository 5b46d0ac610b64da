"""Where decoded training text may go: ``MonitorConfig.decoded_text`` ("none" | "local" | "all"), per sink.

Real Trainer runs of a tiny random Llama with the real TinyLlama tokenizer: step 1 trains a healthy
example, step 2 an all -100 one, which aborts. Each sink's output is read back the way a user or an
attacker would see it: the evidence file on disk (and its permissions), every byte W&B wrote in offline
mode (the ``.wandb`` log, run files, table and HTML staging files), every message of the ``mask_monitor``
logger, the Prometheus exposition. "Training text" is the words of the two conversations trained on;
the ``"all"`` runs are the positive control that these words are found where they are allowed.
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
from pathlib import Path

import pytest
from test_wandb_sink import html_tokens, table_rows, trainer_for, wandb_dir  # noqa: F401 - the fixture is reused
from trainer_utils import CONVERSATIONS, IGNORE, rows
from wandb_records import find_run_dir, read_run

from mask_monitor import MaskMonitorAbort, MaskMonitorCallback
from mask_monitor.evidence import DECODED_KEYS, write_evidence
from mask_monitor.reports import StepReport, Totals

pytestmark = pytest.mark.slow

VALUES = ("none", "local", "all")


def healthy_then_dead(tokenizer) -> list[dict]:
    """Example 0 trains normally (step 1); example 1 is all -100 (step 2 aborts)."""
    examples = rows(tokenizer, "assistant", n=2)
    examples[1] = {"input_ids": examples[1]["input_ids"], "labels": [IGNORE] * len(examples[1]["labels"])}
    return examples


#: Words of the monitor's own vocabulary (messages, HELP texts): not evidence of training text.
MONITOR_WORDS = {"number"}


def training_words(n: int = 2) -> set[str]:
    """The words of the conversations trained on that no monitor output contains by itself."""
    words = set()
    for prompt, response in CONVERSATIONS[:n]:
        words |= {w for w in re.findall(r"[A-Za-z]+", prompt + " " + response) if len(w) >= 5}
    return words - MONITOR_WORDS


WORDS = training_words()


def found_words(data: bytes | str) -> set[str]:
    text = data.decode("utf-8", errors="replace") if isinstance(data, bytes) else data
    return {w for w in WORDS if w in text}


def train_and_abort(tokenizer, tmp_path, cb, report_to: str = "none") -> MaskMonitorAbort:
    trainer = trainer_for(tokenizer, healthy_then_dead(tokenizer), tmp_path, cb, logging_steps=1, report_to=report_to)
    with pytest.raises(MaskMonitorAbort) as info:
        trainer.train()
    assert info.value.reason == "all_masked" and info.value.step == 2
    return info.value


def test_the_words_are_really_in_the_training_text(zephyr_tokenizer):
    assert WORDS == {"capital", "France", "Paris", "prime", "Seven"}
    decoded = "".join(zephyr_tokenizer.decode(e["input_ids"]) for e in healthy_then_dead(zephyr_tokenizer))
    assert found_words(decoded) == WORDS


# --------------------------------------------------------------------------- the evidence file
@pytest.mark.parametrize("value", VALUES)
def test_evidence_file_decoded_text_and_owner_only(zephyr_tokenizer, tmp_path, value):
    cb = MaskMonitorCallback(template=None, decoded_text=value)
    err = train_and_abort(zephyr_tokenizer, tmp_path, cb)
    path = Path(err.evidence_path)
    assert path == tmp_path / "out" / "mask_monitor" / "abort-rank0.json"
    doc = json.loads(path.read_text())
    dead = healthy_then_dead(zephyr_tokenizer)[1]
    sample = doc["offending_micro_batch"]
    assert sample["input_ids"] == [dead["input_ids"]]  # token ids always
    assert sample["labels"] == [dead["labels"]]
    if value == "none":
        assert not set(DECODED_KEYS) & set(sample)
        assert found_words(path.read_bytes()) == set()
    else:
        assert sample["decoded"] == [zephyr_tokenizer.decode(dead["input_ids"], skip_special_tokens=False)]
        assert sample["decoded_supervised"] == [""]  # nothing supervised
        assert found_words(path.read_bytes()) == {"prime", "Seven"}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert sorted(p.name for p in path.parent.iterdir()) == ["abort-rank0.json"]  # no temporary file left


def test_decoded_text_from_the_environment(zephyr_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("MASK_MONITOR_DECODED_TEXT", "none")
    err = train_and_abort(zephyr_tokenizer, tmp_path, MaskMonitorCallback(template=None))
    assert not set(DECODED_KEYS) & set(json.loads(Path(err.evidence_path).read_text())["offending_micro_batch"])


def _report() -> StepReport:
    t = Totals(micro_batches=1, sequences=1, target_tokens=3, masked_tokens=3, fully_masked_sequences=1,
               all_masked_batches=1, max_masked_ratio=1.0)
    return StepReport(step=1, rank=0, world_size=1, total=t, per_rank=(t,), micro_batches=(t,))


def test_evidence_modes_do_not_depend_on_the_umask(tmp_path):
    rows_ = [{"input_ids": [[1, 2, 3, 4]], "labels": [[IGNORE] * 4]}]
    old = os.umask(0)  # the most permissive umask: the modes come from the writer, not the environment
    try:
        path = write_evidence(output_dir=tmp_path / "run", reason="all_masked", step=1, rank=3, numbers={},
                              report=_report(), rows=rows_)
    finally:
        os.umask(old)
    assert path == str(tmp_path / "run" / "mask_monitor" / "abort-rank3.json")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
    assert json.loads(Path(path).read_text())["offending_micro_batch"]["input_ids"] == [[1, 2, 3, 4]]

    # a world-readable file left by an older run is replaced by an owner-only one; a directory the user
    # made is left as it is
    own = tmp_path / "own"
    (own / "mask_monitor").mkdir(parents=True)
    os.chmod(own / "mask_monitor", 0o755)
    stale = own / "mask_monitor" / "abort-rank0.json"
    stale.write_text("{}")
    os.chmod(stale, 0o644)
    path = write_evidence(output_dir=own, reason="all_masked", step=1, rank=0, numbers={}, report=_report(),
                          rows=rows_)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert json.loads(Path(path).read_text())["reason"] == "all_masked"
    assert stat.S_IMODE(os.stat(own / "mask_monitor").st_mode) == 0o755


# --------------------------------------------------------------------------- W&B
def wandb_bytes(tmp_path: Path) -> bytes:
    """Every byte wandb wrote: run directory (``.wandb`` log, files, logs), data, cache and artifact dirs."""
    out = []
    for sub in ("wb", "wb-data", "wb-cache", "wb-config", "wb-artifacts"):
        for p in sorted((tmp_path / sub).rglob("*")):
            if p.is_file() and not p.is_symlink():
                out.append(p.read_bytes())
    return b"\n".join(out)


@pytest.mark.parametrize("value", VALUES)
def test_wandb_sends_training_text_only_with_all(zephyr_tokenizer, tmp_path, wandb_dir, value):  # noqa: F811
    wandb = pytest.importorskip("wandb")
    cb = MaskMonitorCallback(template=None, decoded_text=value)
    err = train_and_abort(zephyr_tokenizer, tmp_path, cb, report_to="wandb")
    assert wandb.run is None
    run = read_run(find_run_dir(wandb_dir))
    examples = healthy_then_dead(zephyr_tokenizer)

    # the evidence table: step 1's row (logged) and the stopped step's row (abort); token text only with "all"
    table, html_files = table_rows(run)
    assert [(r["step"], r["source"]) for r in table] == [(1, "log"), (2, "abort")]
    for r, ex in zip(table, examples, strict=True):
        tokens = html_tokens(html_files[r["tokens"]["path"]])
        if value == "all":
            assert tokens == [t.replace("<", "&lt;").replace(">", "&gt;")
                              for t in zephyr_tokenizer.convert_ids_to_tokens(ex["input_ids"])]
        else:
            assert tokens == [f"[{i}]" for i in ex["input_ids"]]

    # the evidence file saved with the run: ids always, decoded rows only with "all"
    saved = json.loads((run.files_dir / "abort-rank0.json").read_text())
    local = json.loads(Path(err.evidence_path).read_text())
    assert saved["offending_micro_batch"]["input_ids"] == local["offending_micro_batch"]["input_ids"]
    assert (set(DECODED_KEYS) <= set(saved["offending_micro_batch"])) == (value == "all")
    assert (set(DECODED_KEYS) <= set(local["offending_micro_batch"])) == (value != "none")
    assert stat.S_IMODE((run.files_dir / "abort-rank0.json").stat().st_mode) == 0o600
    uploads = [f for rec in run.records if rec.WhichOneof("record_type") == "files" for f in rec.files.files]
    assert [f.path for f in uploads if f.path.endswith(".json") and "abort" in f.path] == ["abort-rank0.json"]

    # alert and summary: numbers, never text
    (alert,) = run.alerts
    assert found_words(alert.title + alert.text) == set()
    assert found_words(json.dumps(run.summary)) == set()

    # every byte W&B holds: the training words appear only when "all" lets them: then in the decoded rows of
    # the saved evidence (the dead example) and in the table's token pieces (a word split across pieces
    # is not found there)
    pieces = [p for ex in examples for p in zephyr_tokenizer.convert_ids_to_tokens(ex["input_ids"])]
    sent = found_words(zephyr_tokenizer.decode(examples[1]["input_ids"])) | {
        w for w in WORDS if any(w in p for p in pieces)}
    assert sent >= {"prime", "Seven", "capital", "France"}
    assert found_words(wandb_bytes(tmp_path)) == (sent if value == "all" else set())


# --------------------------------------------------------------------------- logging
@pytest.mark.parametrize("value", VALUES)
def test_logging_sink_messages_carry_no_training_text(zephyr_tokenizer, tmp_path, caplog, value):
    caplog.set_level(logging.DEBUG, logger="mask_monitor")
    examples = rows(zephyr_tokenizer, "none", n=2)  # labels == input_ids: leakage and unmasked warnings
    examples[1] = {"input_ids": examples[1]["input_ids"], "labels": [IGNORE] * len(examples[1]["labels"])}
    cb = MaskMonitorCallback(decoded_text=value)  # template auto: the Zephyr template is audited
    trainer = trainer_for(zephyr_tokenizer, examples, tmp_path, cb, logging_steps=1, report_to="none")
    with pytest.raises(MaskMonitorAbort):
        trainer.train()
    mine = [r for r in caplog.records if r.name == "mask_monitor"]
    levels = {r.levelno for r in mine}
    assert {logging.INFO, logging.WARNING, logging.ERROR} <= levels  # windows, findings, the abort
    assert any("prompt_leakage" in r.getMessage() for r in mine)
    assert found_words("\n".join(r.getMessage() for r in mine)) == set()
    # the abort's own text (what the logging sink logs at ERROR) names the evidence file, not its content
    assert found_words(str(cb.summary())) == set()


# --------------------------------------------------------------------------- Prometheus
@pytest.mark.parametrize("value", VALUES)
def test_prometheus_exposition_carries_no_training_text(zephyr_tokenizer, tmp_path, value):
    pytest.importorskip("prometheus_client")
    from prometheus_client import CollectorRegistry, generate_latest

    from mask_monitor.sinks.prometheus import PrometheusSink

    registry = CollectorRegistry()
    sink = PrometheusSink(registry=registry, linger_seconds=0)
    examples = rows(zephyr_tokenizer, "none", n=2)
    examples[1] = {"input_ids": examples[1]["input_ids"], "labels": [IGNORE] * len(examples[1]["labels"])}
    cb = MaskMonitorCallback(sinks=[sink], decoded_text=value)
    trainer = trainer_for(zephyr_tokenizer, examples, tmp_path, cb, logging_steps=1, report_to="none")
    with pytest.raises(MaskMonitorAbort):
        trainer.train()
    text = generate_latest(registry).decode()
    assert registry.get_sample_value("mask_monitor_all_masked_batches_total", {"rank": "0"}) == 1.0
    assert "mask_monitor_prompt_leakage_tokens_total" in text
    assert found_words(text) == set()
