"""What a user sees: one real training run with NO logging configured (no basicConfig, no handler).

Usage: python tests/scripts/user_view.py SCENARIO TOKENIZER_DIR OUT_DIR

Scenarios (tiny random Llama, the real TinyLlama tokenizer, TRL's SFTTrainer unless said otherwise):
  healthy       assistant-only labels, TRL defaults: trains to the end
  dropped       every label -100, TRL defaults: TRL drops every row; the monitor stops SFTTrainer(...)
  dead          every label -100 with max_length=None (nothing dropped): the monitor stops train() at step 1
  plain         plain-text prompt/completion data (no chat render) with prompt_leakage="abort": trains
  unreadable    plain Trainer, a model whose labels travel under another name: masking not auditable
Exit code: 0 trained to the end, 3 MaskMonitorAbort (its reason and step on stdout).
USER_VIEW_BASICCONFIG=1: the application calls ``logging.basicConfig()`` first (records must not double).
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402
from trainer_utils import CONVERSATIONS, dataset, rows, tiny_llama  # noqa: E402
from transformers import AutoTokenizer, Trainer, TrainingArguments  # noqa: E402

from mask_monitor import MaskMonitorAbort, MaskMonitorCallback  # noqa: E402


class OwnLabels(torch.nn.Module):
    """A model that takes its targets as ``targets=``: no labels the monitor can find."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.inner = tiny_llama(vocab)

    def forward(self, input_ids=None, attention_mask=None, targets=None):
        return {"loss": self.inner(input_ids=input_ids, attention_mask=attention_mask, labels=targets).loss}


def main(scenario: str, tok_dir: str, out: str) -> int:
    import logging
    import os

    import trl

    if os.environ.get("USER_VIEW_BASICCONFIG") == "1":
        logging.basicConfig()

    tok = AutoTokenizer.from_pretrained(tok_dir)
    tok.pad_token = tok.pad_token or tok.unk_token
    common = dict(output_dir=out, per_device_train_batch_size=2, num_train_epochs=1, report_to="none",
                  use_cpu=True, save_strategy="no", disable_tqdm=True, logging_steps=2, seed=0)
    cb = MaskMonitorCallback(prompt_leakage="abort") if scenario == "plain" else MaskMonitorCallback()
    try:
        if scenario == "unreadable":
            data = [{"input_ids": e["input_ids"], "targets": e["labels"]} for e in rows(tok, "assistant")]

            def collate(feats):
                n = max(len(f["input_ids"]) for f in feats)
                pad = [n - len(f["input_ids"]) for f in feats]
                pairs = list(zip(feats, pad, strict=True))
                return {"input_ids": torch.tensor([f["input_ids"] + [0] * p for f, p in pairs]),
                        "attention_mask": torch.tensor([[1] * len(f["input_ids"]) + [0] * p
                                                        for f, p in pairs]),
                        "targets": torch.tensor([f["targets"] + [-100] * p for f, p in pairs])}

            trainer = Trainer(model=OwnLabels(len(tok)), args=TrainingArguments(remove_unused_columns=False, **common),
                              train_dataset=dataset(data), data_collator=collate, callbacks=[cb])
        else:
            if scenario == "plain":
                data = [{"prompt": q, "completion": " " + a} for q, a in CONVERSATIONS]
            else:
                data = rows(tok, {"healthy": "assistant", "dropped": "all", "dead": "all"}[scenario])
            extra = {"max_length": None} if scenario == "dead" else {}
            trainer = trl.SFTTrainer(model=tiny_llama(len(tok)), args=trl.SFTConfig(**common, **extra),
                                     train_dataset=dataset(data), processing_class=tok, callbacks=[cb])
        result = trainer.train()
    except MaskMonitorAbort as err:
        print(f"ABORT reason={err.reason} step={err.step}")
        return 3
    print(f"TRAINED steps={result.global_step}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
