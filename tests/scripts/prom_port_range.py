"""Two-rank DDP training (torchrun, gloo, CPU) whose Prometheus port range ends past 65535.

Usage: torchrun --nproc_per_node=2 tests/scripts/prom_port_range.py OUT_DIR BASE_PORT

Every rank must refuse to train before step 1 with the same SinkConfigError (LOCAL_WORLD_SIZE=2, so
BASE_PORT=65535 needs 65535..65536). Each rank writes OUT_DIR/result-rank<R>.json: the error type and
message, and how many optimizer steps ran (none is expected). Exits 0 either way, so that torchrun never
kills a rank that is still writing its result.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import NoReturn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from trainer_utils import exit_worker, rows, tiny_llama  # noqa: E402
from transformers import AutoTokenizer, TrainerCallback  # noqa: E402

from mask_monitor import MaskMonitorCallback  # noqa: E402
from mask_monitor.sinks.prometheus import PrometheusSink  # noqa: E402

FIXTURES = HERE.parents[2] / "shared" / "fixtures"


class CountSteps(TrainerCallback):
    def __init__(self) -> None:
        self.steps = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1


def main() -> NoReturn:
    out_dir, base_port = Path(sys.argv[1]), int(sys.argv[2])
    import trl
    from datasets import Dataset

    rank = int(os.environ["RANK"])
    tok = AutoTokenizer.from_pretrained(FIXTURES / "tokenizers" / "TinyLlama-1.1B-Chat-v1.0__composed")
    tok.pad_token = tok.pad_token or tok.unk_token
    counter = CountSteps()
    config = trl.SFTConfig(
        output_dir=str(out_dir / "out"),
        per_device_train_batch_size=1,
        max_steps=2,
        max_length=None,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        ddp_backend="gloo",
        seed=0,
    )
    trainer = trl.SFTTrainer(
        model=tiny_llama(len(tok)),
        args=config,
        train_dataset=Dataset.from_list(rows(tok, "assistant")),
        processing_class=tok,
        callbacks=[MaskMonitorCallback(sinks=[PrometheusSink(port=base_port, addr="127.0.0.1")]), counter],
    )
    result: dict = {"rank": rank, "error": None, "message": None}
    try:
        trainer.train()
    except Exception as exc:  # noqa: BLE001 - recorded for the test
        result.update(error=type(exc).__name__, message=str(exc))
    result["steps"] = counter.steps
    result["global_step"] = trainer.state.global_step
    (out_dir / f"result-rank{rank}.json").write_text(json.dumps(result))
    exit_worker(0)


if __name__ == "__main__":
    main()
