"""``mask-monitor demo``: watch the monitor stop a dead run, then pass a healthy one. CPU, no downloads.

It builds a small word-level tokenizer with a ChatML chat template and a tiny random Llama model from
configs, then trains with ``trl.SFTTrainer`` twice on the same conversations:

1. labels made by the classic completion-only recipe with the *wrong* response template
   (``### Answer:``, which never occurs in ChatML): every label becomes -100. The monitor raises
   :class:`MaskMonitorAbort` at step 1, before the optimizer applies anything;
2. labels made with the right template (``<|im_start|>assistant\\n``): training completes and the
   monitor prints what the loss saw.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from typing import Any

__all__ = ["register", "run", "build_tokenizer", "completion_only_labels"]

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SYSTEM = "You are a helpful assistant ."
PAIRS = [
    ("what is the capital of france ?", "paris is the capital of france ."),
    ("name a prime number .", "seven is a prime number ."),
    ("say hello .", "hello there friend !"),
    ("what colour is the sky ?", "the sky is usually blue ."),
    ("count to three .", "one two three ."),
    ("give me a fruit .", "an apple a day ."),
    ("what is two plus two ?", "two plus two is four ."),
    ("name an ocean .", "the pacific ocean ."),
]


def build_tokenizer() -> Any:
    """A real ``PreTrainedTokenizerFast`` (word level) with a ChatML template, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "###"]
    words = sorted({w for p in PAIRS for text in p for w in text.split()} | set(SYSTEM.split())
                   | {"system", "user", "assistant", "answer", ":", "\n"})
    vocab = {t: i for i, t in enumerate(special + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split("\n", behavior="isolated"), pre_tokenizers.WhitespaceSplit()]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   eos_token="<|im_end|>", additional_special_tokens=["<|im_start|>"])
    fast.chat_template = CHATML
    return fast


def completion_only_labels(input_ids: list[int], response_ids: list[int]) -> list[int]:
    """The classic completion-only recipe: supervise what follows the last response template; if the
    template is not found in the tokenized sequence, every label becomes -100."""
    labels = [-100] * len(input_ids)
    n = len(response_ids)
    for start in range(len(input_ids) - n, -1, -1):
        if input_ids[start : start + n] == response_ids:
            labels[start + n :] = input_ids[start + n :]
            break
    return labels


def _examples(tok: Any, response_template: str) -> list[dict]:
    response_ids = tok(response_template, add_special_tokens=False)["input_ids"]
    out = []
    for q, a in PAIRS:
        msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q},
                {"role": "assistant", "content": a}]
        ids = tok.apply_chat_template(msgs, tokenize=True, return_dict=False)
        out.append({"input_ids": list(ids), "labels": completion_only_labels(list(ids), response_ids)})
    return out


def _train(tok: Any, examples: list[dict], out_dir: str, callback: Any) -> Any:
    import torch
    import trl
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                         pad_token_id=tok.pad_token_id))
    config = trl.SFTConfig(output_dir=out_dir, per_device_train_batch_size=2, num_train_epochs=2,
                           learning_rate=5e-3, logging_steps=2, save_strategy="no", report_to="none",
                           use_cpu=True, disable_tqdm=True, seed=0)
    trainer = trl.SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(examples),
                             processing_class=tok, callbacks=[callback])
    return trainer.train()


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1%}"


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    from ..callback import MaskMonitorCallback
    from ..errors import MaskMonitorAbort

    hf_logging.set_verbosity_error()
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("  [%(levelname)s] %(message)s"))
    handler.addFilter(lambda record: record.levelno < logging.ERROR)  # the abort is printed below, once
    log = logging.getLogger("mask_monitor")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    out_root = args.output_dir or tempfile.mkdtemp(prefix="mask-monitor-demo-")
    tok = build_tokenizer()
    t0 = time.monotonic()
    try:
        print("== 1/2: labels built with the wrong response template ('### answer :' is not in ChatML) ==")
        broken = _examples(tok, "### answer :")
        print(f"   {sum(1 for e in broken if set(e['labels']) == {-100})} of {len(broken)} examples have every "
              "label = -100; with TRL's defaults SFTTrainer drops them all silently and train() dies in the "
              "sampler (num_samples=0).")
        cb = MaskMonitorCallback()
        try:
            _train(tok, broken, os.path.join(out_root, "broken"), cb)
            print("   unexpected: training completed")
            return 1
        except MaskMonitorAbort as err:
            where = "SFTTrainer(...)" if err.step == 0 else "trainer.train()"
            print(f"\n   MaskMonitorAbort raised out of {where} (reason={err.reason!r}, step={err.step}):\n")
            print("   " + str(err).replace("\n", "\n   "))
        print("\n== 2/2: labels built with the right response template ('<|im_start|>assistant\\n') ==")
        healthy = _examples(tok, "<|im_start|>assistant\n")
        cb = MaskMonitorCallback()
        result = _train(tok, healthy, os.path.join(out_root, "healthy"), cb)
        s = cb.summary()
        print(f"\n   training completed: {result.global_step} optimizer steps, final loss {result.training_loss:.3f}")
        print(f"   template: {s['template_family'] or 'not detected'}")
        rows = [
            ("micro-batches audited", s["batches"]),
            ("target tokens", s["target_tokens"]),
            ("supervised tokens", s["supervised_tokens"]),
            ("masked ratio", _pct(s["masked_ratio"])),
            ("fully masked sequences", s["fully_masked_sequences"]),
            ("prompt leakage", _pct(s["prompt_leakage_ratio"])),
            ("response coverage", _pct(s["response_coverage_ratio"])),
            ("end-of-turn supervised", _pct(s["eot_supervised_ratio"])),
            ("aborted", s["aborted"] or "no"),
        ]
        for k, v in rows:
            print(f"   {k:<24} {v}")
        print(f"\n   demo finished in {time.monotonic() - t0:.1f}s; outputs under {out_root}")
        return 0
    finally:
        log.removeHandler(handler)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("demo", help="train a tiny model on the CPU: one dead run stopped, one healthy run",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", help="where the runs write (default: a temporary folder)")
    p.set_defaults(func=run)
