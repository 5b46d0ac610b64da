"""Two-rank FSDP training (torchrun, gloo, CPU) of a tiny Llama under the real SFTTrainer.

Usage: torchrun --nproc_per_node=2 tests/scripts/train_fsdp.py SCENARIO OUT_DIR [--single|--ddp|--accelerate-fsdp]
  healthy      assistant-only labels, one epoch over the 8 conversations of trainer_utils
  all_masked   every label -100 (the classic failure): every rank must abort in the same step

Without torchrun (``python tests/scripts/train_fsdp.py SCENARIO OUT_DIR --single``) the same data is
trained in one process with twice the per-device batch, the reference the two-rank counts must equal.

Each rank writes OUT_DIR/result-rank<R>.json: outcome, step, reason, the monitor's summary, and whether
the model really was sharded (``fsdp_wrapped``: the class name of the model the Trainer trained). On an
abort a rank first waits at a monitored barrier for the other rank (30 s; ``barrier`` in the file says
whether it passed): a rank that aborted alone fails that barrier instead of hanging. Exit code 3 on an abort.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import NoReturn

import torch.distributed as dist

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from trainer_utils import exit_worker, rows, tiny_llama  # noqa: E402
from transformers import AutoTokenizer, TrainerCallback  # noqa: E402

from mask_monitor import MaskMonitorAbort, MaskMonitorCallback  # noqa: E402

FIXTURES = HERE.parents[2] / "shared" / "fixtures"


class SeenModel(TrainerCallback):
    """Records the class of the model object the Trainer hands its callbacks (the FSDP root under FSDP)."""

    def __init__(self) -> None:
        self.model_classes: list[str] = []
        self.param_shapes: dict[str, list[int]] = {}

    def on_train_begin(self, args, state, control, model=None, **kw):
        self.model_classes.append(type(model).__name__)
        for name, p in model.named_parameters():
            local = getattr(p, "_local_tensor", p)  # FSDP2 DTensor: this rank's shard
            self.param_shapes[name] = list(local.shape)


def shard(model) -> None:
    """torch FSDP2: each decoder layer, then the root; the Trainer then leaves placement to the model."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    # Tell the Trainer the model owns placement and gradient reduction (what transformers sets for a model
    # it sharded at load time): no DDP wrap on top, no second sharding by accelerate.
    model._is_distributed_loading_by_transformers = True


def main() -> NoReturn:
    ap = argparse.ArgumentParser()
    ap.add_argument("scenario", choices=["healthy", "all_masked"])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--ddp", action="store_true", help="plain DDP instead of FSDP")
    ap.add_argument("--single", action="store_true", help="one process, batch 2 (the reference run)")
    ap.add_argument("--accelerate-fsdp", action="store_true",
                    help="TrainingArguments(fsdp=...) instead of torch fully_shard (on CPU: silently DDP)")
    a = ap.parse_args()
    import trl
    from datasets import Dataset

    rank = int(os.environ.get("RANK", 0))
    tok = AutoTokenizer.from_pretrained(FIXTURES / "tokenizers" / "TinyLlama-1.1B-Chat-v1.0__composed")
    tok.pad_token = tok.pad_token or tok.unk_token
    data = Dataset.from_list(rows(tok, "assistant" if a.scenario == "healthy" else "all"))
    model = tiny_llama(len(tok))
    cb = MaskMonitorCallback(template=None)
    seen = SeenModel()
    extra: dict = {}
    if a.accelerate_fsdp:
        extra = {
            "fsdp": "full_shard",
            "fsdp_config": {"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]},
        }
    if not a.single:
        extra["ddp_backend"] = "gloo"
    config = trl.SFTConfig(
        output_dir=str(a.out_dir / "out"), per_device_train_batch_size=2 if a.single else 1,
        num_train_epochs=1, max_length=None, report_to="none", use_cpu=True, save_strategy="no",
        disable_tqdm=True, logging_steps=1, seed=0, learning_rate=1e-2, dataloader_num_workers=0,
        **extra,
    )
    if not (a.single or a.ddp or a.accelerate_fsdp):
        shard(model)  # the process group exists now: SFTConfig's post-init started it
    trainer = trl.SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tok,
                             callbacks=[seen, cb])
    result: dict = {"rank": rank, "scenario": a.scenario, "world_size": int(os.environ.get("WORLD_SIZE", 1))}
    code = 0
    try:
        out = trainer.train()
        result.update(outcome="completed", global_step=out.global_step)
    except MaskMonitorAbort as err:
        result.update(outcome="aborted", reason=err.reason, step=err.step, abort_rank=err.rank,
                      global_step=trainer.state.global_step)
        code = 3
    result["fsdp_wrapped"] = seen.model_classes
    result["accelerate_distributed_type"] = str(trainer.accelerator.state.distributed_type)
    result["param_shapes"] = seen.param_shapes
    result["summary"] = {k: v for k, v in cb.summary().items() if not isinstance(v, dict) or k == "findings"}
    result["per_rank"] = [t.as_dict() for t in cb.auditor.run_per_rank]
    result["vocab_size"] = len(tok)
    if dist.is_initialized() and code:
        try:  # both ranks aborted in the same step iff both reach this barrier; a lone abort fails here
            dist.monitored_barrier(timeout=timedelta(seconds=30))
            result["barrier"] = "passed"
        except RuntimeError as exc:
            result["barrier"] = f"failed: {exc}"
    (a.out_dir / f"result-rank{rank}.json").write_text(json.dumps(result, default=str))
    exit_worker(code)  # no destroy_process_group, no return: see exit_worker


if __name__ == "__main__":
    main()
