"""DeepSpeed ZeRO-2 / ZeRO-3 (CPU accelerator, gloo) under the real ``Trainer``: several scenarios per launch.

Usage:
  DS_ACCELERATOR=cpu torchrun --nproc_per_node=2 tests/scripts/train_deepspeed.py OUT_DIR STAGE:SCENARIO ...
  python tests/scripts/train_deepspeed.py OUT_DIR --single          # the one-process reference (no DeepSpeed)

Scenarios (every one a fresh model, Trainer and DeepSpeed engine in the same processes):
  healthy      assistant-only labels, 4 optimizer steps: the counts must equal the one-process run
  all_masked   every label -100: every rank must abort at step 1, before the engine's first step
  nan_rank1    rank 1's loss turns NaN at step 2 (a NaN hidden state): both ranks abort at step 2
  zero_loss    rank 0's loss is exactly 0 at step 2 (supervised tokens present): both ranks abort at step 2
  nan_rank1_ga2  gradient_accumulation_steps=2; rank 1's FIRST micro-batch of step 2 is NaN (its backward
               runs: its gradient is accumulated), the step is judged at its last micro-batch: abort at 2
  zero_loss_late the control: zero_loss with the step judged only at ``on_pre_optimizer_step`` (the
               callback is told no micro-batch is the last one, as before the fix): the engine has stepped
               by then (Adam moves the weights on a zero gradient), which the snapshots must show: proves
               the comparison can fail

Why ``Trainer`` and not ``SFTTrainer``: TRL >= 1 drops fully masked rows while preparing the dataset (the
all_masked scenario would stop at construction, before any engine exists); the plain Trainer feeds them.

For each aborting scenario each rank snapshots, when the dead step begins, its own parameter partition
(``ds_tensor`` under ZeRO-3, the full parameter under ZeRO-2) and the ZeRO optimizer's full
``state_dict()`` (fp32 master partition, Adam moments, step counts); after the abort it compares them
with the same objects then. ``engine.global_steps`` is read at the snapshot and after the abort.
Each rank writes OUT_DIR/result-rank<R>.json: {"z2:healthy": {...}, ...}; exit code 0.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import torch

# DeepSpeed's CPU communication backend compiles an optional shared-memory all-reduce kernel with gcc on
# first use (about 110 s on a fresh 2-core machine); it only speeds up inference all-reduces, and ZeRO's
# training collectives run on gloo without it. CI machines start fresh, so the tests skip that build
# (set MM_DS_SHM_COMM=1 to exercise it).
if os.environ.get("MM_DS_SHM_COMM") != "1":
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from trainer_utils import exit_worker, rows, tiny_llama  # noqa: E402
from transformers import (  # noqa: E402
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from mask_monitor import MaskMonitorAbort, MaskMonitorCallback  # noqa: E402

FIXTURES = HERE.parents[2] / "shared" / "fixtures"
DEAD_STEP = {"all_masked": 1, "nan_rank1": 2, "zero_loss": 2, "nan_rank1_ga2": 2, "zero_loss_late": 2}


class LateCallback(MaskMonitorCallback):
    """The monitor judging each step at ``on_pre_optimizer_step`` only (its fallback): the control."""

    def _on_micro_batch(self, mb):
        mb.last = None
        super()._on_micro_batch(mb)


def ds_config(stage: int) -> dict[str, Any]:
    return {
        "zero_optimization": {"stage": stage},
        "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto", "torch_adam": True}},
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
        "zero_allow_untested_optimizer": True,
        "wall_clock_breakdown": False,
    }


def _clone(obj: Any) -> Any:
    """A deep copy whose tensors are detached clones (the optimizer's state_dict holds live tensors)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_clone(v) for v in obj)
    if isinstance(obj, int | float | str | bool | type(None)):
        return obj
    try:
        return copy.deepcopy(obj)
    except Exception:  # noqa: BLE001 - an object we cannot copy is compared by repr
        return repr(obj)


def _diff(a: Any, b: Any, path: str = "") -> list[str]:
    """Paths where two snapshots differ; tensors compared exactly (NaN equal to NaN)."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        same = a.shape == b.shape and a.dtype == b.dtype and torch.equal(
            torch.nan_to_num(a, nan=1.2345e6), torch.nan_to_num(b, nan=1.2345e6))
        return [] if same else [path]
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{path}: keys {sorted(map(str, a))} != {sorted(map(str, b))}"]
        return [d for k in a for d in _diff(a[k], b[k], f"{path}/{k}")]
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        if len(a) != len(b):
            return [f"{path}: length {len(a)} != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in _diff(x, y, f"{path}[{i}]")]
    if isinstance(a, int | float | str | bool | type(None)):
        return [] if a == b else [f"{path}: {a!r} != {b!r}"]
    return [] if repr(a) == repr(b) else [f"{path}: {type(a).__name__} changed"]


def _tensors(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return 1
    if isinstance(obj, dict):
        return sum(_tensors(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(_tensors(v) for v in obj)
    return 0


def engine_state(trainer: Trainer, stage: int) -> dict[str, Any]:
    """This rank's parameter partition and the ZeRO optimizer's state, detached clones."""
    engine = trainer.model_wrapped
    params = {}
    for name, p in engine.module.named_parameters():
        local = p.ds_tensor if stage == 3 else p.data  # ZeRO-3: the rank's partition of the parameter
        params[name] = local.detach().clone()
    return {"params": params, "optimizer": _clone(engine.optimizer.state_dict()),
            "global_steps": int(engine.global_steps)}


class Pathology(TrainerCallback):
    """Injects the scenario's pathology; snapshots the engine when the dead step begins."""

    def __init__(self, scenario: str, stage: int, rank: int, model: torch.nn.Module) -> None:
        self.scenario, self.stage, self.rank = scenario, stage, rank
        self.trainer: Trainer | None = None
        self.step = 0
        self.micro = 0  # micro-batch index within the current step
        self.before: dict[str, Any] | None = None
        self.dead = DEAD_STEP.get(scenario)
        if scenario.startswith("nan_rank1") and rank == 1:
            model.model.norm.register_forward_hook(self._nan)
        if scenario.startswith("zero_loss") and rank == 0:
            model.register_forward_hook(self._zero)

    def _nan(self, module, args, output):
        first_only = self.scenario.endswith("_ga2")
        if module.training and self.step == self.dead and (self.micro == 0 or not first_only):
            return output * float("nan")
        return None

    def _zero(self, module, args, output):
        if module.training and self.step == self.dead and getattr(output, "loss", None) is not None:
            output["loss"] = output.loss * 0.0
            return output
        return None

    def on_step_begin(self, args, state, control, **kw):
        self.step, self.micro = state.global_step + 1, 0
        if self.step == self.dead:
            self.before = engine_state(self.trainer, self.stage)

    def on_substep_end(self, args, state, control, **kw):
        self.micro += 1


def run(scenario: str, stage: int | None, rank: int, tok, out_dir: Path) -> dict[str, Any]:
    mode = "all" if scenario == "all_masked" else "assistant"
    from datasets import Dataset

    data = Dataset.from_list(rows(tok, mode))
    model = tiny_llama(len(tok))
    cb = (LateCallback if scenario.endswith("_late") else MaskMonitorCallback)(template=None, wandb=False)
    patho = Pathology(scenario, stage or 0, rank, model)
    extra: dict[str, Any] = {}
    if stage is not None:
        extra["deepspeed"] = ds_config(stage)
    args = TrainingArguments(
        output_dir=str(out_dir / f"out-{stage}-{scenario}"),
        per_device_train_batch_size=1 if stage is not None else 2, num_train_epochs=1,
        gradient_accumulation_steps=2 if scenario.endswith("_ga2") else 1,
        report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True, logging_steps=1, seed=0,
        learning_rate=1e-2, dataloader_num_workers=0, **extra,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data, processing_class=tok,
                      data_collator=DataCollatorForSeq2Seq(tok, padding=True), callbacks=[patho, cb])
    patho.trainer = trainer
    res: dict[str, Any] = {"scenario": scenario, "stage": stage}
    t0 = time.monotonic()
    try:
        out = trainer.train()
        res.update(outcome="completed", global_step=out.global_step)
    except MaskMonitorAbort as err:
        res.update(outcome="aborted", reason=err.reason, step=err.step, abort_rank=err.rank,
                   global_step=trainer.state.global_step, evidence=err.evidence_path)
    res["seconds"] = round(time.monotonic() - t0, 2)
    if stage is not None:
        engine = trainer.model_wrapped
        res["engine"] = type(engine).__name__
        res["zero_stage"] = int(engine.zero_optimization_stage())
        res["engine_global_steps"] = int(engine.global_steps)
        if patho.before is not None:
            after = engine_state(trainer, stage)
            res["global_steps_at_dead_step_begin"] = patho.before["global_steps"]
            res["param_diff"] = _diff(patho.before["params"], after["params"])
            res["optimizer_diff"] = _diff(patho.before["optimizer"], after["optimizer"])
            res["params_compared"] = len(after["params"])
            res["optimizer_tensors_compared"] = _tensors(after["optimizer"])
            res["param_elements"] = sum(int(t.numel()) for t in after["params"].values())
    res["summary"] = {k: v for k, v in cb.summary().items() if not isinstance(v, dict) or k == "findings"}
    res["per_rank"] = [t.as_dict() for t in cb.auditor.run_per_rank]
    return res


def main() -> NoReturn:
    out_dir = Path(sys.argv[1])
    out_dir.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ.get("RANK", 0))
    tok = AutoTokenizer.from_pretrained(FIXTURES / "tokenizers" / "TinyLlama-1.1B-Chat-v1.0__composed")
    tok.pad_token = tok.pad_token or tok.unk_token
    results: dict[str, Any] = {}
    if sys.argv[2:] == ["--single"]:
        results["single:healthy"] = run("healthy", None, rank, tok, out_dir)
    else:
        for spec in sys.argv[2:]:
            stage, scenario = spec.split(":")
            results[spec] = run(scenario, int(stage.lstrip("z")), rank, tok, out_dir)
            (out_dir / f"result-rank{rank}.json").write_text(json.dumps(results, default=str))
    (out_dir / f"result-rank{rank}.json").write_text(json.dumps(results, default=str))
    exit_worker(0)  # no destroy_process_group, no return: see exit_worker


if __name__ == "__main__":
    main()
