"""Cost of ``mask-monitor audit`` over TRL's own preparation of the same data (target: ratio <= 1.25).

Writes a synthetic dataset of conversational prompt/completion examples (multi-turn prompts) as
JSONL, then times, alternately and ``--repeat`` times each:

* baseline: what a training script pays anyway: load the JSONL with ``datasets`` and build
  ``trl.SFTTrainer`` (tokenization, labels, truncation), with a tiny model;
* audit: :func:`mask_monitor.audit.run_audit` on the same file and settings: the same TRL preparation,
  plus TRL's collator, the template role tagger, ``batch_stats`` and the per-example table.

It prints each timing and the ratio of the medians. Datasets caching is off for both, so neither
reuses the other's work. Run::

    OMP_NUM_THREADS=1 python benchmarks/audit_speed.py            # 20k conversations
    python benchmarks/audit_speed.py --n 2000 --repeat 1          # quick
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TOKENIZER = REPO.parent / "shared" / "fixtures" / "tokenizers" / "TinyLlama-1.1B-Chat-v1.0__composed"
WORDS = ("model data token label mask loss batch answer question train prompt shard window step rank "
         "value layer weight learning rate gradient sequence chat template turn").split()


def synthetic(n: int, seed: int = 0) -> list[dict]:
    import random

    rng = random.Random(seed)

    def sentence(lo: int, hi: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))).capitalize() + "."

    rows = []
    for _ in range(n):
        prompt = [{"role": "system", "content": sentence(4, 12)}]
        for _ in range(rng.randint(0, 2)):
            prompt += [{"role": "user", "content": sentence(5, 30)}, {"role": "assistant", "content": sentence(5, 40)}]
        prompt.append({"role": "user", "content": sentence(5, 30)})
        rows.append({"prompt": prompt, "completion": [{"role": "assistant", "content": sentence(5, 60)}]})
    return rows


def baseline(path: Path, tok, sft: dict) -> float:
    import datasets
    import trl

    from mask_monitor.audit.prepare import tiny_model

    t = time.perf_counter()
    ds = datasets.load_dataset("json", data_files=str(path), split="train")
    with tempfile.TemporaryDirectory() as out:
        args = trl.SFTConfig(output_dir=out, report_to="none", use_cpu=True, **sft)
        trl.SFTTrainer(model=tiny_model(len(tok)), args=args, train_dataset=ds, processing_class=tok)
    return time.perf_counter() - t


def audit(path: Path, tok, sft: dict) -> tuple[float, dict]:
    from mask_monitor.audit.pipeline import AuditOptions, run_audit

    t = time.perf_counter()
    result = run_audit(AuditOptions(tokenizer=str(tok.name_or_path), data=str(path), sft=dict(sft)), tokenizer=tok)
    return time.perf_counter() - t, result.as_dict()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20_000, help="conversations (default 20000)")
    ap.add_argument("--repeat", type=int, default=2, help="timings of each kind (default 2)")
    ap.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER))
    ap.add_argument("--max-length", type=int, default=1024)
    args = ap.parse_args()
    if not Path(args.tokenizer).exists():
        print(f"tokenizer not found: {args.tokenizer} (the fixtures live in ../shared/fixtures)", file=sys.stderr)
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import datasets
    import transformers

    datasets.disable_caching()
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    tok = transformers.AutoTokenizer.from_pretrained(args.tokenizer)
    sft = {"max_length": args.max_length}
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "conversations.jsonl"
        with path.open("w", encoding="utf-8") as fh:
            for row in synthetic(args.n):
                fh.write(json.dumps(row) + "\n")
        datasets.load_dataset("json", data_files=str(path), split="train")  # warm the Arrow conversion
        base_t, audit_t = [], []
        report = {}
        for i in range(args.repeat):
            base_t.append(baseline(path, tok, sft))
            t, report = audit(path, tok, sft)
            audit_t.append(t)
            print(f"run {i + 1}: TRL preparation {base_t[-1]:.2f} s, audit {audit_t[-1]:.2f} s "
                  f"(audit stages: {report['seconds']})", flush=True)
    b, a = statistics.median(base_t), statistics.median(audit_t)
    tot = report["totals"]
    print(f"{args.n} conversations, {tot['target_tokens']:,} target tokens, {tot['supervised_tokens']:,} supervised, "
          f"verdict {report['verdict']}")
    print(f"ratio audit / plain TRL preparation = {a / b:.3f} (median {a:.2f} s / {b:.2f} s; target <= 1.25)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
