"""Cost of the cure (``mask_monitor.assistant_only``) next to TRL's own tokenization of the same data.

On ``--n`` synthetic conversations (1 to 4 turns, half with a system prompt), times, alternately and
``--repeat`` times each, with ``datasets`` caching off for all:

* trl: what ``SFTTrainer`` does to a conversational dataset: ``datasets.map`` of
  ``tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)`` per example (TRL's
  ``tokenize_fn`` for language-modeling conversations), producing ``input_ids``;
* trl_assistant_masks: the same with ``return_assistant_tokens_mask=True`` (what ``assistant_only_loss``
  costs), on a template that has ``{% generation %}`` spans (timed only then);
* tokenize_batched: the same tokenization in a batched ``datasets.map`` (256 rows per call), as the cure
  runs it: the cure's cost minus its tagging;
* cure: ``mask_monitor.assistant_only(dataset, tokenizer)``: that tokenization, plus the role tagger over
  each batch of 256 rows, producing ``input_ids`` + ``assistant_masks``.

It prints each timing, the medians and the ratios cure / trl (what a run pays instead of TRL's own
tokenization), cure / tokenize_batched (the tagging's own share) and cure / trl_assistant_masks. Run::

    OMP_NUM_THREADS=1 python benchmarks/cure_speed.py                     # 20k conversations, TinyLlama
    OMP_NUM_THREADS=1 python benchmarks/cure_speed.py \
        --tokenizer ../shared/fixtures/tokenizers/Phi-3-mini-4k-instruct \
        --chat-template-from ../shared/fixtures/chat_templates/phi3__Phi-3-mini-4k-instruct__trl-training.json
    python benchmarks/cure_speed.py --tokenizer PATH --n 2000 --repeat 1  # quick
"""

from __future__ import annotations

import argparse
import os
import random
import re
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
TOKENIZERS = REPO.parent / "shared" / "fixtures" / "tokenizers"
DEFAULT_TOKENIZER = TOKENIZERS / "TinyLlama-1.1B-Chat-v1.0__composed"
WORDS = ("model data token label mask loss batch answer question train prompt shard window step rank "
         "value layer weight learning rate gradient sequence chat template turn").split()


def conversations(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)

    def sentence(lo: int, hi: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))).capitalize() + "."

    rows = []
    for i in range(n):
        msgs = [{"role": "system", "content": sentence(4, 12)}] if i % 2 else []
        for _ in range(rng.randint(1, 4)):
            msgs += [{"role": "user", "content": sentence(5, 30)}, {"role": "assistant", "content": sentence(5, 60)}]
        rows.append({"messages": msgs})
    return rows


def trl_tokenize(dataset, tok, assistant_masks: bool = False) -> float:
    def fn(example):
        out = tok.apply_chat_template(example["messages"], tokenize=True, return_dict=True,
                                      return_assistant_tokens_mask=assistant_masks)
        keep = ("input_ids", "assistant_masks") if assistant_masks else ("input_ids",)
        return {k: out[k] for k in keep}

    t = time.perf_counter()
    out = dataset.map(fn, remove_columns=["messages"], load_from_cache_file=False, keep_in_memory=True)
    elapsed = time.perf_counter() - t
    assert len(out) == len(dataset)
    return elapsed


def tokenize_batched(dataset, tok) -> float:
    def fn(batch):
        return {"input_ids": [list(tok.apply_chat_template(m, tokenize=True, return_dict=True)["input_ids"])
                              for m in batch["messages"]]}

    t = time.perf_counter()
    out = dataset.map(fn, batched=True, batch_size=256, remove_columns=["messages"], load_from_cache_file=False,
                      keep_in_memory=True, new_fingerprint=f"tokenize-{time.time_ns()}")  # as the cure does
    elapsed = time.perf_counter() - t
    assert len(out) == len(dataset)
    return elapsed


def cure(dataset, tok) -> float:
    from mask_monitor.cure import AssistantOnly

    t = time.perf_counter()
    out = AssistantOnly(tok).apply(dataset)
    elapsed = time.perf_counter() - t
    assert len(out) == len(dataset) and sum(out[0]["assistant_masks"]) > 0
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER))
    ap.add_argument("--chat-template-from", default=None, metavar="FIXTURE_JSON",
                    help="use the chat_template of a fixture file (e.g. a TRL training variant with "
                    "{% generation %} spans, which adds the assistant_masks baseline)")
    args = ap.parse_args()

    import datasets
    import torch
    from transformers import AutoTokenizer

    datasets.disable_progress_bars()
    datasets.disable_caching()
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    if args.chat_template_from:
        import json

        tok.chat_template = json.loads(Path(args.chat_template_from).read_text())["chat_template"]
    has_spans = re.search(r"\{%-?\s*generation\s*-?%\}", tok.chat_template or "") is not None
    dataset = datasets.Dataset.from_list(conversations(args.n))
    tokens = sum(len(tok.apply_chat_template(r["messages"], tokenize=True, return_dict=True)["input_ids"])
                 for r in dataset.select(range(200)))
    print(f"{args.n} conversations (1-4 turns), ~{tokens / 200:.0f} tokens each; tokenizer "
          f"{Path(args.tokenizer).name}; torch threads {torch.get_num_threads()}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    from mask_monitor.templates.assistant_mask import tagger_for

    tagger_for(tok)  # built once per tokenizer (cached), as in any run: not part of the per-dataset cost
    runs: dict[str, list[float]] = {"trl": [], "tokenize_batched": [], "cure": []}
    if has_spans:
        runs["trl_assistant_masks"] = []
    for r in range(args.repeat):
        for name in runs:
            if name == "trl":
                s = trl_tokenize(dataset, tok)
            elif name == "trl_assistant_masks":
                s = trl_tokenize(dataset, tok, assistant_masks=True)
            elif name == "tokenize_batched":
                s = tokenize_batched(dataset, tok)
            else:
                s = cure(dataset, tok)
            runs[name].append(s)
            print(f"  run {r + 1}: {name:20s} {s:7.2f} s")
    med = {k: statistics.median(v) for k, v in runs.items()}
    for k, v in med.items():
        print(f"median {k:20s} {v:7.2f} s  ({args.n / v:,.0f} conversations/s)")
    print(f"ratio cure / trl: {med['cure'] / med['trl']:.2f}")
    print(f"ratio cure / tokenize_batched (the tagging's share): {med['cure'] / med['tokenize_batched']:.2f}")
    if "trl_assistant_masks" in med:
        print(f"ratio cure / trl_assistant_masks: {med['cure'] / med['trl_assistant_masks']:.2f}")


if __name__ == "__main__":
    main()
