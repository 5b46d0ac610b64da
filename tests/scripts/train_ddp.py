"""Two-rank DDP training (torchrun, gloo, CPU) where only rank 1 sees a pathology.

Usage: torchrun --nproc_per_node=2 tests/scripts/train_ddp.py SCENARIO OUT_DIR [PROM_PORT]
  nan_rank1          rank 1's weights turn NaN when step 2 begins (its loss goes NaN)
  masked_rank1       rank 1's micro-batch of step 2 is all -100 (default policy: counted, trains)
  masked_rank1_strict the same under the strict micro-batch policy (abort)
  fail_rank1         rank 1 cannot close step 2 (a malformed micro-batch vector injected into its pending
                     step): both ranks must stop with RankFailure naming rank 1, in step 2, before its update
  settings_rank1     rank 1 alone runs with MASK_MONITOR_ALL_MASKED_MICRO_BATCH=abort (a variable set on one
                     node only): both ranks must stop at step 1 with RankFailure naming the settings
  healthy            no pathology
Each rank writes OUT_DIR/result-rank<R>.json: outcome, step, summary.
With MM_CUDA=1 each rank trains on its own GPU over NCCL (the 2-GPU check, scripts/gpu_check.sh).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import NoReturn

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from trainer_utils import exit_worker, rows, tiny_llama  # noqa: E402
from transformers import AutoTokenizer, TrainerCallback  # noqa: E402

from mask_monitor import MaskMonitorAbort, MaskMonitorCallback, RankFailure  # noqa: E402

FIXTURES = HERE.parents[2] / "shared" / "fixtures"


class Pathology(TrainerCallback):
    def __init__(self, scenario: str, rank: int, model: torch.nn.Module, monitor: MaskMonitorCallback):
        self.scenario = scenario
        self.rank = rank
        self.monitor = monitor
        self.step = 0
        if scenario.startswith("masked") and rank == 1:
            model.register_forward_pre_hook(self._mask_labels, with_kwargs=True)

    def _mask_labels(self, module, args, kwargs):
        if module.training and self.step == 2 and kwargs.get("labels") is not None:
            kwargs["labels"] = torch.full_like(kwargs["labels"], -100)
        return args, kwargs

    def on_step_begin(self, args, state, control, model=None, **kw):
        self.step = state.global_step + 1
        if self.scenario == "nan_rank1" and self.rank == 1 and self.step == 2:
            with torch.no_grad():
                model.model.norm.weight.fill_(float("nan"))
        if self.scenario == "fail_rank1" and self.rank == 1 and self.step == 2:
            self.monitor.auditor._pending.append(torch.zeros(3, dtype=torch.float64))  # cannot be stacked


def main() -> NoReturn:
    scenario, out_dir = sys.argv[1], Path(sys.argv[2])
    port = int(sys.argv[3]) if len(sys.argv) > 3 else None
    import trl

    rank = int(os.environ["RANK"])
    cuda = os.environ.get("MM_CUDA") == "1"
    tok = AutoTokenizer.from_pretrained(FIXTURES / "tokenizers" / "TinyLlama-1.1B-Chat-v1.0__composed")
    tok.pad_token = tok.pad_token or tok.unk_token
    from datasets import Dataset

    data = Dataset.from_list(rows(tok, "assistant"))
    model = tiny_llama(len(tok))
    if scenario == "settings_rank1" and rank == 1:
        os.environ["MASK_MONITOR_ALL_MASKED_MICRO_BATCH"] = "abort"
    cb = MaskMonitorCallback(strict=scenario.endswith("_strict"), prometheus_port=port,
                             prometheus_linger_seconds=float(os.environ.get("LINGER", "0")))
    config = trl.SFTConfig(
        output_dir=str(out_dir / "out"), per_device_train_batch_size=1, num_train_epochs=1, max_length=None,
        report_to="none", use_cpu=not cuda, save_strategy="no", disable_tqdm=True, logging_steps=1,
        ddp_backend="nccl" if cuda else "gloo", seed=0, learning_rate=1e-2,
    )
    trainer = trl.SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tok,
                             callbacks=[Pathology(scenario, rank, model, cb), cb])
    result: dict = {"rank": rank, "scenario": scenario, "device": str(trainer.args.device),
                    "backend": str(torch.distributed.get_backend()) if torch.distributed.is_initialized() else None}
    try:
        out = trainer.train()
        result.update(outcome="completed", global_step=out.global_step)
        code = 0
    except MaskMonitorAbort as err:
        result.update(outcome="aborted", reason=err.reason, step=err.step, abort_rank=err.rank,
                      global_step=trainer.state.global_step, evidence=err.evidence_path)
        code = 3
    except RankFailure as err:
        result.update(outcome="rank_failure", step=err.step, failures=err.failures, message=str(err),
                      global_step=trainer.state.global_step)
        code = 4
    result["summary"] = {k: v for k, v in cb.summary().items() if not isinstance(v, dict) or k == "findings"}
    (out_dir / f"result-rank{rank}.json").write_text(json.dumps(result, default=str))
    exit_worker(code)  # no destroy_process_group, no return: see exit_worker


if __name__ == "__main__":
    main()
