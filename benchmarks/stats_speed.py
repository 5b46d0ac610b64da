"""Microseconds per ``batch_stats`` call against batch shape, next to the memory-bandwidth floor.

The floor is one read of ``labels`` and ``input_ids`` (``labels.sum() + input_ids.sum()``): no audit of
a micro-batch can cost less than reading its labels once. Measured on the CPU, and on CUDA when a device
is present. With ``--compile`` it also times ``torch.compile(batch_stats, dynamic=True)`` and checks,
with dynamo's own counters, that steps of varying sequence length do not recompile.

Run (prints one table per device and variant, then the machine)::

    python benchmarks/stats_speed.py                 # eager only
    python benchmarks/stats_speed.py --compile       # eager and compiled
    python benchmarks/stats_speed.py --shapes 8x2048 64x8192 --variants plain

Variants: ``plain`` (labels only), ``padded`` (+ attention_mask), ``packed`` (+ position_ids, packed
documents), ``roles`` (+ a role tensor, the template audit's extra columns).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mask_monitor.stats import ROLE_ASSISTANT_CONTENT, ROLE_USER, batch_stats  # noqa: E402

DEFAULT_SHAPES = ("8x2048", "16x4096", "32x4096", "64x8192")
VARIANTS = ("plain", "padded", "packed", "roles")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    parts = [
        f"{cpu}, {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}",
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}",
        f"python {platform.python_version()}, torch {torch.__version__}",
    ]
    if torch.cuda.is_available():
        parts.append(f"CUDA {torch.cuda.get_device_name()} (torch.version.cuda {torch.version.cuda})")
    return "; ".join(parts)


def make_batch(b: int, s: int, variant: str, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """A realistic SFT micro-batch: a masked prompt then supervised response per row, right padding."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, 32000, (b, s), generator=g)
    labels = input_ids.clone()
    prompt = torch.randint(s // 8, s // 2, (b, 1), generator=g)
    length = torch.randint(s // 2, s + 1, (b, 1), generator=g)
    pos = torch.arange(s).unsqueeze(0)
    labels[pos < prompt] = -100
    batch: dict[str, torch.Tensor] = {"labels": labels, "input_ids": input_ids}
    if variant == "padded":
        labels[pos >= length] = -100
        batch["attention_mask"] = (pos < length).long().expand(b, s).contiguous()
    elif variant == "packed":  # documents of ~s/4 tokens restarting position_ids at 0
        doc = max(s // 4, 2)
        batch["position_ids"] = (pos % doc).expand(b, s).contiguous()
    elif variant == "roles":
        roles = torch.full((b, s), ROLE_USER, dtype=torch.long)
        roles[pos.expand(b, s) >= prompt] = ROLE_ASSISTANT_CONTENT
        batch["roles"] = roles
    return {k: v.to(device) for k, v in batch.items()}


def stats_call(fn: Callable[..., torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return fn(batch["labels"], attention_mask=batch.get("attention_mask"),
              position_ids=batch.get("position_ids"), roles=batch.get("roles"))


def floor_call(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return batch["labels"].sum() + batch["input_ids"].sum()


def time_interleaved(fns: dict[str, Callable[[], object]], device: torch.device, repeats: int,
                     block_s: float = 0.05) -> dict[str, tuple[float, float]]:
    """Microseconds per call of each function: (median, min) over `repeats` rounds.

    Each round times one block of calls of every function in turn (A/B/C, A/B/C, ...), so load from
    other processes on a shared machine hits all of them alike; the minimum is the least disturbed.
    """
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sizes = {}
    for name, fn in fns.items():
        for _ in range(3):
            fn()
        sync()
        n = 1
        while True:  # calibrate the block size to ~block_s
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            sync()
            if time.perf_counter() - t0 >= block_s or n >= 1 << 14:
                break
            n *= 2
        sizes[name] = n
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            n = sizes[name]
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            sync()
            samples[name].append((time.perf_counter() - t0) / n * 1e6)
    return {name: (statistics.median(v), min(v)) for name, v in samples.items()}


def compiled_stats() -> Callable[..., torch.Tensor]:
    return torch.compile(batch_stats, dynamic=True)


def recompile_check(fn: Callable[..., torch.Tensor], device: torch.device, variant: str) -> dict[str, int]:
    """Call the compiled function on steps of varying length; report dynamo's compile counters."""
    from torch._dynamo.utils import counters

    counters.clear()
    lengths = [1000, 1024, 777, 2048, 1500, 3001]
    for i, s in enumerate(lengths):
        batch = make_batch(4 + (i % 3), s, variant, device, seed=i)
        got = stats_call(fn, batch)
        want = stats_call(batch_stats, batch)
        if not torch.equal(got, want):
            raise AssertionError(f"compiled and eager disagree at {tuple(batch['labels'].shape)}: {got} vs {want}")
    return {"calls": len(lengths), "frames_compiled": int(counters["stats"]["unique_graphs"]),
            "recompiles": int(sum(counters["recompiles"].values()))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES), help="BATCHxSEQ, e.g. 8x2048")
    ap.add_argument("--variants", nargs="+", default=["plain", "padded"], choices=VARIANTS)
    ap.add_argument("--devices", nargs="+", default=None, help="cpu and/or cuda (default: all available)")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile(batch_stats, dynamic=True)")
    args = ap.parse_args(argv)
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    print(f"machine: {machine()}")
    if "cuda" not in devices:
        print("cuda: not available on this machine; CUDA rows skipped")
    for dev_name in devices:
        device = torch.device(dev_name)
        fns: dict[str, Callable[..., torch.Tensor]] = {"eager": batch_stats}
        if args.compile:
            fns["compiled"] = compiled_stats()
        for variant in args.variants:
            if args.compile:
                print(f"[{dev_name}/{variant}] recompile check: {recompile_check(fns['compiled'], device, variant)}")
            head = f"{'shape':>10} {'floor us':>10}" + "".join(f" {k + ' us':>12} {'x floor':>8}" for k in fns)
            print(f"\n[{dev_name}] variant={variant}: median us per call (min in brackets)\n{head}")
            for shape in args.shapes:
                b, s = (int(x) for x in shape.lower().split("x"))
                batch = make_batch(b, s, variant, device)
                calls: dict[str, Callable[[], object]] = {"floor": lambda batch=batch: floor_call(batch)}
                for name, fn in fns.items():
                    calls[name] = lambda fn=fn, batch=batch: stats_call(fn, batch)
                t = time_interleaved(calls, device, args.repeats)
                floor = t["floor"][0]
                line = f"{shape:>10} {floor:>10.1f}"
                for name in fns:
                    med, best = t[name]
                    line += f" {med:>12.1f} {med / floor:>8.1f}"
                    line += f"  [{best:.1f} us, {best / t['floor'][1]:.1f}x]"
                print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
