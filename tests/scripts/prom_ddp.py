"""Two-rank DDP training (torchrun, gloo, CPU) exporting to Prometheus, one endpoint per rank.

Usage: torchrun --nproc_per_node=2 tests/scripts/prom_ddp.py OUT_DIR BASE_PORT
Rank r serves on BASE_PORT + LOCAL_RANK; each step is paced (PACE_SECONDS, default 0.4) so that a
Prometheus scraping every second sees the run while it trains. Rank 1's micro-batch of step 2 has
every label set to -100: under the default policy that is a warning (counted, training goes on), so
the job shows a per-rank pathology. Each rank writes OUT_DIR/result-rank<R>.json with its outcome
and the callback's summary (all ranks' totals).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import NoReturn

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from trainer_utils import exit_worker, rows, tiny_llama  # noqa: E402
from transformers import AutoTokenizer, TrainerCallback  # noqa: E402

from mask_monitor import MaskMonitorCallback  # noqa: E402
from mask_monitor.sinks.prometheus import PrometheusSink  # noqa: E402

FIXTURES = HERE.parents[2] / "shared" / "fixtures"


class PaceAndMask(TrainerCallback):
    """Sleeps after each step; on rank 1, masks every label of step 2's micro-batch."""

    def __init__(self, seconds: float, rank: int, model: torch.nn.Module):
        self.seconds = seconds
        self.step = 0
        if rank == 1:
            model.register_forward_pre_hook(self._mask_labels, with_kwargs=True)

    def _mask_labels(self, module, args, kwargs):
        if module.training and self.step == 2 and kwargs.get("labels") is not None:
            kwargs["labels"] = torch.full_like(kwargs["labels"], -100)
        return args, kwargs

    def on_step_begin(self, args, state, control, **kwargs):
        self.step = state.global_step + 1

    def on_step_end(self, args, state, control, **kwargs):
        time.sleep(self.seconds)


def main() -> NoReturn:
    out_dir, base_port = Path(sys.argv[1]), int(sys.argv[2])
    import trl
    from datasets import Dataset

    rank = int(os.environ["RANK"])
    tok = AutoTokenizer.from_pretrained(FIXTURES / "tokenizers" / "TinyLlama-1.1B-Chat-v1.0__composed")
    tok.pad_token = tok.pad_token or tok.unk_token
    sink = PrometheusSink(port=base_port, addr="127.0.0.1", linger_seconds=float(os.environ.get("LINGER", "5")))
    cb = MaskMonitorCallback(sinks=[sink])
    config = trl.SFTConfig(
        output_dir=str(out_dir / "out"),
        per_device_train_batch_size=1,
        num_train_epochs=1,
        max_length=None,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=1,
        ddp_backend="gloo",
        seed=0,
        learning_rate=1e-2,
    )
    model = tiny_llama(len(tok))
    pace = PaceAndMask(float(os.environ.get("PACE_SECONDS", "0.4")), rank, model)
    trainer = trl.SFTTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(rows(tok, "assistant")),
        processing_class=tok,
        callbacks=[pace, cb],
    )
    out = trainer.train()
    summary = {k: v for k, v in cb.summary().items() if not isinstance(v, dict) or k == "findings"}
    result = {"rank": rank, "global_step": out.global_step, "summary": summary}
    (out_dir / f"result-rank{rank}.json").write_text(json.dumps(result, default=str))
    exit_worker(0)  # no destroy_process_group, no return: see exit_worker


if __name__ == "__main__":
    main()
