"""What the monitor costs a real training run: the same Trainer run without and with the callback.

Arms, interleaved in one process (round 1: A B C, round 2: B C A, round 3: C A B, ...) so that load from
other processes, drift and order effects hit every arm alike:

* ``baseline``: ``transformers.Trainer`` with a step timer only;
* ``monitor``: + ``MaskMonitorCallback(template=None)`` (masked-fraction audit);
* ``template``: + ``MaskMonitorCallback(template=detect_template(tok))``: the prompt-leakage audit too
  (needs the fixture tokenizer and ``mask_monitor.templates``; skipped, with the reason, otherwise).

Also reported, per arm: the wall time spent inside the monitor's own code per step (its forward hook,
step close and log handler, timed by a subclass of the real callback): on a shared, noisy machine this
in-line cost is the low-noise measure, the step-time ratio the end-to-end one.

Per-step time is ``on_step_begin`` -> ``on_step_end`` of a ``TrainerCallback`` (forward, backward and
optimizer step of every micro-batch, the monitor's hook and step close included); the first step of each
``train()`` call is a warm-up and not counted. Reported: median step time per arm, the ratio of medians
to the baseline, and the peak memory delta (CUDA: ``max_memory_allocated`` per arm in this process;
CPU: the peak RSS of one fresh subprocess per arm, ``--memory``).

Configurations::

    tiny    hidden 16, 1 layer, seq 128, batch 4   (worst case: the model costs nothing, the audit shows)
    small   hidden 512, 8 layers, seq 1024, batch 8 (~58M parameters with a 32k vocabulary)
    cuda    hidden 768, 12 layers, seq 2048, batch 8, bf16 (~125M parameters; CUDA only)

Run::

    python benchmarks/overhead.py --config tiny --rounds 5 --steps 6
    python benchmarks/overhead.py --config small --rounds 2 --steps 2      # minutes per step on 2 cores
    python benchmarks/overhead.py --config cuda --rounds 5 --steps 10      # needs a GPU
    python benchmarks/overhead.py --config small --paired 6                 # paired A B B A steps, one train()

``--paired N`` is the low-noise end-to-end measure on a shared machine: one ``train()`` per monitor arm,
the monitor switched off and on per step in N blocks of A B B A, reporting the ratio of medians and the
median per-block ratio with a bootstrap 95% interval, on the wall clock and on the process CPU clock
(CPU seconds of all threads: time the VM's other tenants steal from this process does not count).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from stats_speed import machine  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments  # noqa: E402
from transformers.trainer_callback import PrinterCallback  # noqa: E402

from mask_monitor import MaskMonitorCallback  # noqa: E402

TOKENIZER = REPO.parent / "shared" / "fixtures" / "tokenizers" / "TinyLlama-1.1B-Chat-v1.0__composed"
CONFIGS: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden=16, inter=32, layers=1, heads=2, seq=128, batch=4, device="cpu", bf16=False),
    "small": dict(hidden=512, inter=1376, layers=8, heads=8, seq=1024, batch=8, device="cpu", bf16=False),
    "cuda": dict(hidden=768, inter=2048, layers=12, heads=12, seq=2048, batch=8, device="cuda", bf16=True),
}
ARMS = ("baseline", "monitor", "template")


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step, on_step_begin -> on_step_end (device synchronised on CUDA)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.cpu_times: list[float] = []  # process CPU seconds (all threads) per step: blind to CPU steal
        self._t0 = 0.0
        self._c0 = 0.0

    def _sync(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_step_begin(self, args, state, control, **kw):
        self._sync()
        self._t0 = time.perf_counter()
        self._c0 = time.process_time()

    def on_step_end(self, args, state, control, **kw):
        self._sync()
        self.times.append(time.perf_counter() - self._t0)
        self.cpu_times.append(time.process_time() - self._c0)


class TimedMonitor(MaskMonitorCallback):
    """The real callback, with the wall time spent in its own code (hook, step close, log) accumulated.

    On a shared machine the A/B step-time ratio carries the noise of every other process; the time the
    monitor itself spends in line with training is a direct, low-noise measure of the same overhead
    (on CUDA it excludes kernels queued by the hook that overlap with the model's own work).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.own_seconds = 0.0

    def _timed(self, fn, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.own_seconds += time.perf_counter() - t0

    def _forward_hook(self, *args: Any) -> None:
        return self._timed(super()._forward_hook, *args)

    def _close_step(self, step: int) -> None:
        return self._timed(super()._close_step, step)

    def on_log(self, *args: Any, **kwargs: Any):
        return self._timed(super().on_log, *args, **kwargs)


class GatedMonitor(TimedMonitor):
    """The timed callback, switched off for the baseline steps of a paired run (``--paired``).

    Off, its hook returns at once (one Python call per forward, about a microsecond: it makes the
    baseline a hair slower, so the measured overhead is, if anything, understated by that much) and the
    step close is skipped; on, it is exactly the real callback. ``own_seconds`` counts on-steps only.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate_on = True
        self.active_steps = 0

    def _forward_hook(self, *args: Any) -> None:
        if self.gate_on:
            return super()._forward_hook(*args)
        return None

    def _close_step(self, step: int) -> None:
        if self.gate_on:
            self.active_steps += 1
            return super()._close_step(step)
        self._audited_step = step  # nothing to close: this step ran without the monitor


class PairedSchedule(StepTimer):
    """Times every step and switches the monitor per step in A B B A blocks (A = off, B = on).

    Adjacent steps of one ``train()`` see the same machine state, so slow drift and the load of other
    processes cancel within each block of four; the order within a block is mirrored so a linear trend
    cancels too.
    """

    PATTERN = (False, True, True, False)

    def __init__(self, monitor: GatedMonitor, warmup: int) -> None:
        super().__init__()
        self.monitor = monitor
        self.warmup = warmup
        self.on: list[bool] = []

    def on_step_begin(self, args, state, control, **kw):
        k = state.global_step - self.warmup
        self.monitor.gate_on = True if k < 0 else self.PATTERN[k % 4]
        self.on.append(self.monitor.gate_on)
        super().on_step_begin(args, state, control, **kw)


def run_paired(arm: str, model, data, tok, cfg: dict[str, Any], blocks: int, warmup: int, out_dir: str,
               seed: int = 0) -> dict[str, Any]:
    """One ``train()`` of ``warmup + 4 * blocks`` steps, the monitor on in the B steps of each A B B A block.

    Returns the median step time with and without the monitor, their ratio, the ratio of every block
    ((B1 + B2) / (A1 + A2)) with their median and a bootstrap 95% interval of that median, and the
    monitor's own time per on-step.
    """
    import random

    cb = make_callback(arm, tok, GatedMonitor)
    timer = PairedSchedule(cb, warmup)
    build_trainer(model, data, cfg, warmup + 4 * blocks, out_dir, [timer, cb]).train()
    if cb.summary()["micro_batches"] != warmup + 2 * blocks:
        raise RuntimeError(f"the monitor audited {cb.summary()['micro_batches']} micro-batches, expected "
                           f"{warmup + 2 * blocks} (warm-up + the on-steps)")
    on = timer.on[warmup:]
    rng = random.Random(seed)
    out: dict[str, Any] = {"arm": arm, "blocks": blocks,
                           "monitor_ms_per_on_step": cb.own_seconds / max(cb.active_steps, 1) * 1e3}
    for clock, series in (("wall", timer.times[warmup:]), ("cpu", timer.cpu_times[warmup:])):
        off_t = [t for t, o in zip(series, on, strict=True) if not o]
        on_t = [t for t, o in zip(series, on, strict=True) if o]
        ratios = [(series[4 * i + 1] + series[4 * i + 2]) / (series[4 * i] + series[4 * i + 3]) for i in range(blocks)]
        boot = sorted(statistics.median(rng.choices(ratios, k=blocks)) for _ in range(2000))
        out[clock] = {
            "step_ms_off": [t * 1e3 for t in off_t], "step_ms_on": [t * 1e3 for t in on_t],
            "median_ms_off": statistics.median(off_t) * 1e3, "median_ms_on": statistics.median(on_t) * 1e3,
            "ratio_of_medians": statistics.median(on_t) / statistics.median(off_t),
            "block_ratios": ratios, "median_block_ratio": statistics.median(ratios),
            "block_ratio_ci95": [boot[int(0.025 * len(boot))], boot[int(0.975 * len(boot)) - 1]],
        }
    return out


def load_tokenizer():
    if not TOKENIZER.is_dir():
        return None
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    tok.pad_token = tok.pad_token or tok.unk_token
    return tok


def make_rows(tok, n: int, seq: int, vocab: int) -> list[dict[str, list[int]]]:
    """n chat-formatted rows of exactly `seq` tokens, prompt tokens masked (-100) in the labels.

    With the fixture tokenizer each row is a rendered multi-turn conversation, so the template audit's
    role tagger does its real work; without it, random ids with the first quarter masked.
    """
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        if tok is None:
            ids = torch.randint(3, vocab, (seq,), generator=g).tolist()
            labels = [-100] * (seq // 4) + ids[seq // 4 :]
        else:
            ids, labels = [], []
            turn = 0
            while len(ids) < seq:
                q = f"Question {i}.{turn}: " + " ".join(f"w{(i * 7 + turn * 3 + k) % 97}" for k in range(20))
                a = f"Answer {i}.{turn}: " + " ".join(f"v{(i * 5 + turn + k) % 89}" for k in range(30))
                msgs = [{"role": "user", "content": q}]
                p = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
                full = tok.apply_chat_template(msgs + [{"role": "assistant", "content": a}], tokenize=True,
                                               return_dict=False)
                ids += list(full)
                labels += [-100] * len(p) + list(full[len(p):])
                turn += 1
            ids, labels = ids[:seq], labels[:seq]
        out.append({"input_ids": ids, "labels": labels, "attention_mask": [1] * seq})
    return out


def build_model(cfg: dict[str, Any], vocab: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=cfg["hidden"], intermediate_size=cfg["inter"],
                         num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"],
                         num_key_value_heads=cfg["heads"], max_position_embeddings=cfg["seq"])
    model = LlamaForCausalLM(config)
    if cfg["device"] == "cuda":
        model = model.to("cuda", dtype=torch.bfloat16 if cfg["bf16"] else torch.float32)
    return model


def make_callback(arm: str, tok, cls: type[TimedMonitor] = TimedMonitor) -> TimedMonitor | None:
    if arm == "baseline":
        return None
    if arm == "monitor":
        return cls(template=None, wandb=False)
    from mask_monitor.templates import detect_template

    return cls(template=detect_template(tok), tokenizer=tok, wandb=False)


def build_trainer(model, data, cfg: dict[str, Any], steps: int, out_dir: str,
                  callbacks: list[TrainerCallback]) -> Trainer:
    """The benchmark's Trainer: `steps` optimizer steps, no logging, saving or progress bar of its own."""
    from datasets import Dataset

    args = TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=cfg["batch"], max_steps=steps, learning_rate=1e-5,
        report_to="none", save_strategy="no", logging_steps=10**6, disable_tqdm=True, seed=0,
        use_cpu=cfg["device"] == "cpu", bf16=cfg["bf16"], dataloader_num_workers=0, remove_unused_columns=False,
    )
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_list(data), callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)
    return trainer


def run_arm(arm: str, model, data, tok, cfg: dict[str, Any], steps: int, out_dir: str,
            warmup: int = 1) -> tuple[list[float], int, float]:
    """One train() of `warmup + steps` steps: the timed steps, the CUDA peak bytes, the monitor's own
    seconds per step (over all steps, warm-up included)."""
    timer = StepTimer()
    callbacks: list[TrainerCallback] = [timer]
    cb = make_callback(arm, tok)
    if cb is not None:
        callbacks.append(cb)
    trainer = build_trainer(model, data, cfg, steps + warmup, out_dir, callbacks)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    if cb is not None and cb.summary()["micro_batches"] != steps + warmup:
        raise RuntimeError(f"{arm}: the monitor audited {cb.summary()['micro_batches']} micro-batches, "
                           f"expected {steps + warmup}")
    own = cb.own_seconds / (steps + warmup) if cb is not None else 0.0
    return timer.times[warmup:], peak, own


def peak_rss_subprocess(config: str, arm: str, steps: int) -> int:
    """Peak resident memory (bytes) of a fresh process running one arm (CPU memory figure)."""
    cmd = [sys.executable, __file__, "--config", config, "--child-arm", arm, "--steps", str(steps),
           "--warmup", "0"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return int(json.loads(out.stdout.strip().splitlines()[-1])["peak_rss"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (each runs every arm once)")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per arm per round (+1 warm-up)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps at the start of each train()")
    ap.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    ap.add_argument("--memory", action="store_true", help="CPU: also the peak RSS of one subprocess per arm")
    ap.add_argument("--json", type=Path, help="write the figures here too")
    ap.add_argument("--paired", type=int, metavar="BLOCKS",
                    help="instead of separate train() calls per arm: ONE train() per monitor arm with the monitor "
                         "switched per step in BLOCKS blocks of A B B A (off on on off); the low-noise end-to-end "
                         "ratio on a shared machine")
    ap.add_argument("--child-arm", choices=ARMS, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    logging.getLogger("mask_monitor").setLevel(logging.ERROR)  # the benchmark data trips warn checks
    cfg = CONFIGS[a.config]
    if cfg["device"] == "cuda" and not torch.cuda.is_available():
        print(f"config {a.config}: CUDA is not available on this machine; nothing measured")
        return 0
    tok = load_tokenizer()
    vocab = len(tok) if tok is not None else 32000
    arms = list(a.arms)
    skipped: dict[str, str] = {}
    if "template" in arms:
        try:
            from mask_monitor.templates import detect_template

            if tok is None:
                raise LookupError(f"fixture tokenizer not found at {TOKENIZER}")
            if detect_template(tok) is None:
                raise LookupError("detect_template found no template for the fixture tokenizer")
        except (ImportError, LookupError) as exc:
            skipped["template"] = f"{type(exc).__name__}: {exc}"
            arms.remove("template")
    n_steps = a.warmup + 4 * a.paired if a.paired else a.steps + a.warmup
    data = make_rows(tok, cfg["batch"] * n_steps, cfg["seq"], vocab)
    model = build_model(cfg, vocab)
    if a.paired:
        return paired_main(a, cfg, arms, skipped, model, data, tok)
    with tempfile.TemporaryDirectory() as tmp:
        if a.child_arm:
            run_arm(a.child_arm, model, data, tok, cfg, a.steps, tmp, warmup=0)
            print(json.dumps({"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
            return 0
        n_params = sum(p.numel() for p in model.parameters())
        print(f"machine: {machine()}")
        print(f"config {a.config}: {n_params / 1e6:.1f}M parameters, batch {cfg['batch']} x seq {cfg['seq']}, "
              f"device {cfg['device']}, {a.rounds} rounds x {a.steps} timed steps per arm "
              f"(+{a.warmup} warm-up), arms {arms}")
        for arm, why in skipped.items():
            print(f"arm {arm} skipped: {why}")
        times: dict[str, list[float]] = {arm: [] for arm in arms}
        peaks: dict[str, int] = {arm: 0 for arm in arms}
        own: dict[str, list[float]] = {arm: [] for arm in arms}
        for r in range(a.rounds):
            for arm in arms[r % len(arms):] + arms[: r % len(arms)]:  # rotate the order: no arm always first
                t, peak, own_s = run_arm(arm, model, data, tok, cfg, a.steps, tmp, a.warmup)
                times[arm].extend(t)
                own[arm].append(own_s)
                peaks[arm] = max(peaks[arm], peak)
                print(f"  round {r + 1} {arm:>9}: " + " ".join(f"{x * 1e3:.1f}" for x in t) + " ms", flush=True)
    base = statistics.median(times["baseline"]) if "baseline" in times else None
    result: dict[str, Any] = {"machine": machine(), "config": a.config, "params": n_params, "skipped": skipped,
                              "arms": {}}
    for arm in arms:
        med = statistics.median(times[arm])
        own_ms = statistics.median(own[arm]) * 1e3
        entry = {"median_step_ms": med * 1e3, "steps": len(times[arm]),
                 "ratio": (med / base) if base else None,
                 "monitor_ms_per_step": own_ms,
                 "monitor_fraction_of_baseline_step": (own_ms / (base * 1e3)) if base else None}
        if torch.cuda.is_available():
            entry["peak_cuda_bytes"] = peaks[arm]
            entry["peak_delta_bytes"] = peaks[arm] - peaks.get("baseline", 0)
        result["arms"][arm] = entry
    if a.memory and cfg["device"] == "cpu":
        rss = {arm: peak_rss_subprocess(a.config, arm, 1) for arm in arms}
        for arm in arms:
            result["arms"][arm]["peak_rss_bytes"] = rss[arm]
            result["arms"][arm]["peak_rss_delta_bytes"] = rss[arm] - rss.get("baseline", 0)
    print("\n      arm   median step ms   ratio   peak delta   monitor ms/step   monitor / baseline step")
    for arm, e in result["arms"].items():
        delta = e.get("peak_delta_bytes", e.get("peak_rss_delta_bytes"))
        ratio = f"{e['ratio']:.4f}" if e["ratio"] is not None else "-"
        mem = f"{delta / 2**20:+.1f} MiB" if delta is not None else "-"
        frac = e["monitor_fraction_of_baseline_step"]
        frac_s = f"{frac * 100:.3f}%" if frac is not None else "-"
        print(f"{arm:>9} {e['median_step_ms']:>16.2f} {ratio:>7} {mem:>12} {e['monitor_ms_per_step']:>17.3f} "
              f"{frac_s:>25}")
    if a.json:
        a.json.write_text(json.dumps(result, indent=2))
    return 0


def paired_main(a: argparse.Namespace, cfg: dict[str, Any], arms: list[str], skipped: dict[str, str], model, data,
                tok) -> int:
    n_params = sum(p.numel() for p in model.parameters())
    print(f"machine: {machine()}")
    print(f"config {a.config}: {n_params / 1e6:.1f}M parameters, batch {cfg['batch']} x seq {cfg['seq']}, "
          f"device {cfg['device']}; paired: one train() per arm, {a.paired} blocks of A B B A "
          f"(+{a.warmup} warm-up step(s))")
    for arm, why in skipped.items():
        print(f"arm {arm} skipped: {why}")
    results = []
    for arm in [x for x in arms if x != "baseline"]:
        with tempfile.TemporaryDirectory() as tmp:
            r = run_paired(arm, model, data, tok, cfg, a.paired, a.warmup, tmp)
        results.append(r)
        for clock in ("wall", "cpu"):
            for side in ("off", "on"):
                print(f"  {arm:>9} {clock:>4} {side:>3}: " + " ".join(f"{x:.1f}" for x in r[clock][f"step_ms_{side}"])
                      + " ms", flush=True)
    print("\n      arm clock   median off ms   median on ms   ratio of medians   median block ratio [95% CI]"
          "   monitor ms/on-step")
    for r in results:
        for clock in ("wall", "cpu"):
            c = r[clock]
            lo, hi = c["block_ratio_ci95"]
            print(f"{r['arm']:>9} {clock:>5} {c['median_ms_off']:>15.2f} {c['median_ms_on']:>14.2f} "
                  f"{c['ratio_of_medians']:>18.4f} {c['median_block_ratio']:>12.4f} [{lo:.4f}, {hi:.4f}] "
                  f"{r['monitor_ms_per_on_step']:>14.3f}")
    if a.json:
        a.json.write_text(json.dumps({"machine": machine(), "config": a.config, "params": n_params,
                                      "skipped": skipped, "paired": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
