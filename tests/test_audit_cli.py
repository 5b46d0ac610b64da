"""``mask-monitor audit`` as a user runs it: a subprocess on fixture datasets made here, a real tokenizer.

Each case checks the exit code, and the JSON numbers against (a) an independent count made here in
plain Python from ``apply_chat_template`` renders and the raw labels, and (b) what
``MaskMonitorCallback`` reports when a real ``SFTTrainer`` trains one epoch on the same data.

Datasets: healthy (conversational prompt-completion), no masking (messages, default settings), all
masked (pre-tokenized, dropped by TRL / kept with ``max_length=None``), truncated (``max_length`` cuts
some completions away), packed (pre-tokenized with fully masked documents, BFD packing), pre-tokenized
with ``completion_mask`` (ignored by TRL unless ``completion_only_loss`` is set).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

_TRL_MAJOR = int(__import__("trl").__version__.split(".")[0])
needs_trl1 = pytest.mark.skipif(
    _TRL_MAJOR < 1,
    reason="expectations encode TRL >= 1, which drops fully masked examples after truncation (TRL 0.26 keeps them)",
)


datasets = pytest.importorskip("datasets")
trl = pytest.importorskip("trl")
pytestmark = pytest.mark.slow

IGNORE = -100
COUNT_KEYS = (
    "sequences",
    "target_tokens",
    "supervised_tokens",
    "masked_tokens",
    "fully_masked_sequences",
    "unmasked_sequences",
)
ROLE_KEYS = (
    "prompt_leakage_tokens",
    "supervised_header_tokens",
    "assistant_content_tokens",
    "supervised_assistant_content_tokens",
    "assistant_turns",
    "supervised_eot_turns",
)

QA = [
    ("What is the capital of France?", "Paris is the capital of France."),
    ("Name a prime number.", "Seven is a prime number, and so is eleven."),
    ("Say hello.", "Hello there, friend!"),
    ("What colour is the sky on a clear day, seen from the ground at noon?", "Usually blue."),
    ("Count to three.", "One, two, three."),
    ("Give me a fruit.", "An apple a day keeps the doctor away, they say."),
    ("What is two plus two?", "Two plus two is four."),
    ("Name an ocean.", "The Pacific Ocean is the largest."),
    ("Explain gravity very briefly, in one short sentence please, thank you kindly.", "Mass attracts mass."),
    ("Which planet is red?", "Mars."),
]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    return env


def cli(*argv: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "mask_monitor.cli.main", "audit", "--no-progress", *argv]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=240)


def parse(proc: subprocess.CompletedProcess) -> tuple[int, dict]:
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    return proc.returncode, json.loads(proc.stdout)


def main_json(capsys, *argv: str) -> tuple[int, dict]:
    """The same entry point in this process (variants of a case already run as a subprocess)."""
    from mask_monitor.cli.main import main

    capsys.readouterr()
    code = main(["audit", "--no-progress", "--json", *argv])
    out = capsys.readouterr().out
    assert code in (0, 1), out[-2000:]
    return code, json.loads(out)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    with path.open("w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    return path


# ------------------------------------------------------------------------------------ independent counts
def render(tok, messages, generation_prompt=False) -> list[int]:
    return list(tok.apply_chat_template(messages, tokenize=True, return_dict=False,
                                        add_generation_prompt=generation_prompt))


def pc_parts(tok, q: str, a: str) -> tuple[int, int]:
    """(prompt tokens incl. the assistant header, full length) of one conversational prompt/completion."""
    prompt = [{"role": "user", "content": q}]
    p = render(tok, prompt, generation_prompt=True)
    full = render(tok, prompt + [{"role": "assistant", "content": a}])
    assert full[: len(p)] == p  # Zephyr: the prompt render is a prefix of the full render
    return len(p), len(full)


def count_labels(examples: list[list[int]]) -> dict[str, int]:
    """What a shifted causal-LM loss sees, example by example, in plain Python."""
    target = sum(len(lab) - 1 for lab in examples if len(lab) > 1)
    sup = sum(sum(1 for t in lab[1:] if t != IGNORE) for lab in examples)
    return {
        "sequences": sum(1 for lab in examples if len(lab) > 1),
        "target_tokens": target,
        "supervised_tokens": sup,
        "masked_tokens": target - sup,
        "fully_masked_sequences": sum(1 for lab in examples if len(lab) > 1 and all(t == IGNORE for t in lab[1:])),
        "unmasked_sequences": sum(1 for lab in examples if len(lab) > 1 and all(t != IGNORE for t in lab[1:])),
    }


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def data(tmp_path_factory, tok) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("audit-data")
    pc = [{"prompt": [{"role": "user", "content": q}], "completion": [{"role": "assistant", "content": a}]}
          for q, a in QA]
    msgs = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": q},
                          {"role": "assistant", "content": a}]} for q, a in QA]
    ids = [render(tok, [{"role": "user", "content": q}, {"role": "assistant", "content": a}]) for q, a in QA]
    n_prompt = [pc_parts(tok, q, a)[0] for q, a in QA]
    all_masked = [{"input_ids": x, "labels": [IGNORE] * len(x)} for x in ids]
    # every third example fully masked, the others masked up to the response
    packed = [{"input_ids": x, "labels": [IGNORE] * len(x) if i % 3 == 0 else [IGNORE] * p + x[p:]}
              for i, (x, p) in enumerate(zip(ids, n_prompt, strict=True))]
    pretok = [{"input_ids": x, "completion_mask": [0] * p + [1] * (len(x) - p)}
              for x, p in zip(ids, n_prompt, strict=True)]
    datasets.Dataset.from_list(packed).to_parquet(str(d / "packed.parquet"))
    limit = sorted(n_prompt)[len(n_prompt) // 2] + 1  # max_length that cuts some answers entirely
    return {
        "_limit": limit,
        "healthy": write_jsonl(d / "healthy.jsonl", pc),
        "nomask": write_jsonl(d / "nomask.jsonl", msgs),
        "allmasked": write_jsonl(d / "allmasked.jsonl", all_masked),
        "packed": d / "packed.parquet",
        "pretok": write_jsonl(d / "pretok.jsonl", pretok),
        "_ids": ids,
        "_n_prompt": n_prompt,
        "_packed_rows": packed,
    }


@pytest.fixture(scope="module")
def runs(tok_path, data):
    """Every subprocess run of this module, started at once in the background (2 at a time), so the
    in-process training runs below overlap with them. ``runs[name].result()`` waits for one."""
    from concurrent.futures import ThreadPoolExecutor

    jobs = {
        "healthy": ["--data", str(data["healthy"]), "--json"],
        "nomask": ["--data", str(data["nomask"]), "--json"],
        "allmasked": ["--data", str(data["allmasked"]), "--json"],
        "truncated": ["--data", str(data["healthy"]), "--max-length", str(data["_limit"]), "--json"],
        "packed": ["--data", str(data["packed"]), "--packing", "--max-length", "96", "--json"],
        "pretok": ["--data", str(data["pretok"]), "--json"],
        "missing": ["--data", "/nonexistent/train.jsonl"],
    }
    pool = ThreadPoolExecutor(max_workers=2)
    futures = {name: pool.submit(cli, "--tokenizer", tok_path, *argv) for name, argv in jobs.items()}
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


# ------------------------------------------------------------------------------------ the callback's numbers
def callback_summary(tok_path: str, data_path: Path, **cfg) -> dict:
    """Train one epoch with MaskMonitorCallback on the same file; return its run summary."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from mask_monitor import MaskMonitorCallback

    tok = AutoTokenizer.from_pretrained(tok_path)
    builder = "parquet" if data_path.suffix == ".parquet" else "json"
    ds = datasets.load_dataset(builder, data_files=str(data_path), split="train")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                         max_position_embeddings=512))
    args = trl.SFTConfig(output_dir=str(data_path.parent / f"out-{data_path.stem}"), per_device_train_batch_size=3,
                         num_train_epochs=1, learning_rate=1e-3, save_strategy="no", report_to="none",
                         use_cpu=True, disable_tqdm=True, logging_steps=100, seed=0, **cfg)
    cb = MaskMonitorCallback(all_masked="off", zero_loss="off", fully_masked_sequences="off",
                             fully_masked_share="off", prompt_leakage="off", unmasked="off")
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=[cb])
    trainer.train()
    return cb.summary()


def assert_same(audit_totals: dict, summary: dict, keys=COUNT_KEYS + ROLE_KEYS) -> None:
    assert {k: audit_totals[k] for k in keys} == {k: int(summary[k]) for k in keys}


# ------------------------------------------------------------------------------------ cases
def test_healthy_prompt_completion(tok, tok_path, data, runs):
    code, rep = parse(runs["healthy"].result())
    assert code == 0 and rep["verdict"] == "healthy" and rep["blocking"] == []
    assert rep["completion_only_loss"] is True and rep["template_family"] == "zephyr"
    parts = [pc_parts(tok, q, a) for q, a in QA]
    labels = [[IGNORE] * p + [1] * (n - p) for p, n in parts]
    assert {k: rep["totals"][k] for k in COUNT_KEYS} == count_labels(labels)
    # every supervised token is the answer or its end of turn: no leakage, full coverage, every EOT trained
    assert rep["totals"]["prompt_leakage_tokens"] == 0
    assert rep["totals"]["response_coverage_ratio"] == 1.0
    assert rep["totals"]["assistant_turns"] == len(QA) == rep["totals"]["supervised_eot_turns"]
    assert rep["examples_in"] == len(QA) and rep["dropped_examples"] == 0
    assert_same(rep["totals"], callback_summary(tok_path, data["healthy"]))


def test_no_masking_reports_prompt_leakage(tok, tok_path, data, runs, capsys):
    code, rep = parse(runs["nomask"].result())
    # prompt_leakage's default action is the callback's: a warning, exit 0
    assert code == 0 and rep["blocking"] == []
    assert {"prompt_leakage", "unmasked"} <= {w["check"] for w in rep["warnings"]}
    msgs = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": q},
             {"role": "assistant", "content": a}] for q, a in QA]
    full = [render(tok, m) for m in msgs]
    prompt = [render(tok, m[:2]) for m in msgs]  # system + user turns
    header = [len(render(tok, m[:2], generation_prompt=True)) - len(render(tok, m[:2])) for m in msgs]
    assert {k: rep["totals"][k] for k in COUNT_KEYS} == count_labels(full)  # labels == input_ids
    # leakage: every supervised target in the system and user turns (the first token is never a target);
    # the assistant header the generation prompt adds is counted apart
    assert rep["totals"]["prompt_leakage_tokens"] == sum(len(p) - 1 for p in prompt)
    assert rep["totals"]["supervised_header_tokens"] == sum(header) > 0
    assert rep["totals"]["unmasked_sequences"] == len(QA)
    assert_same(rep["totals"], callback_summary(tok_path, data["nomask"]))

    # the same MonitorConfig setting as in training makes it blocking: same numbers, exit 1
    code2, rep2 = main_json(capsys, "--tokenizer", tok_path, "--data", str(data["nomask"]),
                            "--set", "prompt_leakage=abort")
    assert code2 == 1 and rep2["totals"] == rep["totals"]
    assert [b["check"] for b in rep2["blocking"]] == ["prompt_leakage"]
    # --fail-on warn: every finding blocks the CI step
    code3, rep3 = main_json(capsys, "--tokenizer", tok_path, "--data", str(data["nomask"]), "--fail-on", "warn")
    assert code3 == 1 and rep3["blocking"] == [] and rep3["verdict"] == "blocked"


@needs_trl1
def test_all_masked(tok_path, data, runs, capsys):
    n = len(QA)
    # default max_length: TRL drops every fully masked example before training
    code, rep = parse(runs["allmasked"].result())
    assert code == 1 and rep["blocking"][0]["check"] == "all_masked"
    assert rep["dropped_examples"] == n and rep["dropped_reasons"] == {"no_response": n}
    assert rep["totals"]["sequences"] == 0
    # max_length none: they all reach training, fully masked
    code, rep = main_json(capsys, "--tokenizer", tok_path, "--data", str(data["allmasked"]), "--max-length", "none")
    assert code == 1 and rep["blocking"][0]["check"] == "all_masked"
    labels = [[IGNORE] * len(x) for x in data["_ids"]]
    assert {k: rep["totals"][k] for k in COUNT_KEYS} == count_labels(labels)
    assert rep["fully_masked_reasons"] == {"no_response": n}
    assert_same(rep["totals"], callback_summary(tok_path, data["allmasked"], max_length=None), keys=COUNT_KEYS)


@needs_trl1
def test_truncated(tok, tok_path, data, runs):
    parts = [pc_parts(tok, q, a) for q, a in QA]
    limit = data["_limit"]
    code, rep = parse(runs["truncated"].result())
    kept = [(p, n) for p, n in parts if p < limit]  # TRL keeps rows with any label left after keep_start
    dropped = len(parts) - len(kept)
    labels = [([IGNORE] * p + [1] * (n - p))[:limit] for p, n in kept]
    assert {k: rep["totals"][k] for k in COUNT_KEYS} == count_labels(labels)
    assert rep["dropped_examples"] == dropped and rep["dropped_reasons"] == {"truncated_away": dropped}
    assert rep["truncated_examples"] == sum(1 for _, n in parts if n > limit)
    share = dropped / len(parts)
    assert rep["lost_share"] == pytest.approx(share)
    assert code == 0  # fully_masked_share's default action is the callback's: warn
    assert ("fully_masked_share" in [w["check"] for w in rep["warnings"]]) == (share > 0.5)
    assert "truncation" in [w["check"] for w in rep["warnings"]]
    assert_same(rep["totals"], callback_summary(tok_path, data["healthy"], max_length=limit))


@needs_trl1
def test_packed_with_fully_masked_documents(tok_path, data, runs):
    code, rep = parse(runs["packed"].result())
    rows = data["_packed_rows"]
    assert rep["padding_free"] is True  # BFD packing collates padding-free
    assert {k: rep["totals"][k] for k in COUNT_KEYS} == count_labels([r["labels"] for r in rows])
    n_fully = sum(1 for i in range(len(rows)) if i % 3 == 0)
    assert rep["totals"]["fully_masked_sequences"] == n_fully
    assert rep["fully_masked_reasons"] == {"no_response": n_fully}
    # a third of the documents is under fully_masked_share_threshold (0.5): the sequences are reported
    assert code == 0 and "fully_masked_sequences" in [w["check"] for w in rep["warnings"]]
    assert "fully_masked_share" not in [w["check"] for w in rep["warnings"]]
    assert_same(rep["totals"], callback_summary(tok_path, data["packed"], packing=True, max_length=96))


def test_pretokenized_completion_mask(tok_path, data, runs, capsys):
    ids, n_prompt = data["_ids"], data["_n_prompt"]
    # no prompt column: TRL's completion_only_loss defaults to False and ignores completion_mask
    code, rep = parse(runs["pretok"].result())
    assert rep["completion_only_loss"] is False
    assert {k: rep["totals"][k] for k in COUNT_KEYS} == count_labels(ids)
    assert code == 0 and "prompt_leakage" in [w["check"] for w in rep["warnings"]]
    code, rep = main_json(capsys, "--tokenizer", tok_path, "--data", str(data["pretok"]),
                          "--completion-only-loss", "true")
    assert code == 0 and rep["completion_only_loss"] is True
    labels = [[IGNORE] * p + x[p:] for x, p in zip(ids, n_prompt, strict=True)]
    assert {k: rep["totals"][k] for k in COUNT_KEYS} == count_labels(labels)
    assert rep["totals"]["prompt_leakage_tokens"] == 0


def test_terminal_report_and_config_file(tok_path, data, tmp_path, capsys):
    from mask_monitor.cli.main import main

    cfg = tmp_path / "sft.yaml"
    cfg.write_text("max_length: 64\npacking: false\nlearning_rate: 2.0e-5\n")
    capsys.readouterr()
    code = main(["audit", "--no-progress", "--tokenizer", tok_path, "--data", str(data["nomask"]),
                 "--config", str(cfg), "--show", "2", "--set", "prompt_leakage=abort"])
    assert code == 1
    out = capsys.readouterr().out
    assert out.index("BLOCKED (exit 1)") < out.index("target tokens")  # verdict first, numbers after
    assert "prompt_leakage" in out and "max_length=64" in out and "example #" in out


def test_usage_error_subprocess(runs):
    proc = runs["missing"].result()
    assert proc.returncode == 2 and "data not found" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert proc.stderr.strip().splitlines()[-1].startswith("mask-monitor: error: data not found")


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--data", "{healthy}", "--config", "/nonexistent.yaml"], "config file not found"),
        (["--data", "{healthy}", "--config", "{badcfg}"], "unknown SFTConfig field(s): not_a_field"),
        (["--data", "{healthy}", "--prompt-leakage-threshold", "2"], "expected a number between 0 and 1"),
        (["--data", "{healthy}", "--sample", "0"], "--sample must be at least 1"),
        (["--data", "{txt}"], "unsupported file type '.txt'"),
        (["--data", "{healthy}", "--packing", "--max-length", "none"], "TRL could not prepare the data"),
    ],
)
def test_usage_errors(tok_path, data, tmp_path, capsys, argv, needle):
    from mask_monitor.cli.main import main

    (tmp_path / "bad.yaml").write_text("not_a_field: 1\n")
    (tmp_path / "x.txt").write_text("hello\n")
    argv = [a.format(healthy=data["healthy"], badcfg=tmp_path / "bad.yaml", txt=tmp_path / "x.txt") for a in argv]
    code = main(["audit", "--no-progress", "--tokenizer", tok_path, *argv])
    err = capsys.readouterr().err
    assert code == 2 and needle in err, err
    assert len(err.strip().splitlines()) == 1


def test_no_chat_template_is_a_usage_error(tokenizers_dir, data, capsys):
    from mask_monitor.cli.main import main

    code = main(["audit", "--no-progress", "--tokenizer", str(tokenizers_dir / "phi-2"), "--data", str(data["nomask"])])
    err = capsys.readouterr().err
    assert code == 2 and "no chat template" in err and len(err.strip().splitlines()) == 1, err
