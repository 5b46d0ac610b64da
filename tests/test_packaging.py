"""mask-monitor installs and imports like a library: a light ``import mask_monitor``, sinks as extras (the
callback trains without prometheus-client, saying so once when Prometheus export was asked for), a wheel
that ships ``py.typed`` and declares the extras."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("transformers", "prometheus_client", "wandb", "trl", "datasets")


def run_python(code: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MASK_MONITOR_")}
    env.update({"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true",
                "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"})
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_import_pulls_no_framework_and_no_sink():
    proc = run_python(f"""
        import json, sys
        import mask_monitor
        from mask_monitor import MaskAuditor, Policy, MonitorConfig, batch_stats, Totals, MaskMonitorAbort
        before = sorted({{m.split(".")[0] for m in sys.modules}} & set({HEAVY!r}))
        mask_monitor.MaskMonitorCallback  # the lazy name: imports the callback (and transformers) now
        after = sorted({{m.split(".")[0] for m in sys.modules}} & set({HEAVY!r}))
        print(json.dumps({{"file": mask_monitor.__file__, "before": before, "after": after}}))
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(out["file"]).resolve() == REPO / "mask_monitor" / "__init__.py"
    assert out["before"] == []
    # the callback needs transformers, still no sink package until a sink is set up at train begin
    assert out["after"] == ["transformers"]


# A plain transformers.Trainer run of a tiny random Llama, with prometheus_client made unimportable by a
# meta-path finder installed before anything else is imported. Labels: 4 rows of 10 tokens, the first 4
# labels of each row -100, so the shifted loss sees 9 target slots per row, 6 of them supervised.
_BLOCKED_TRAINING = """
import importlib.abc, json, logging, os, socket, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "prometheus_client" or name.startswith("prometheus_client."):
            raise ImportError(f"No module named {name!r} (blocked by the test)", name=name)
        return None

sys.meta_path.insert(0, Block())
try:
    import prometheus_client  # noqa: F401
    sys.exit("prometheus_client is still importable")
except ImportError:
    pass

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments
from mask_monitor import MaskMonitorCallback

records = []
class Keep(logging.Handler):
    def emit(self, record):
        records.append((record.levelname, record.getMessage()))
log = logging.getLogger("mask_monitor")
log.addHandler(Keep())
log.setLevel(logging.DEBUG)

with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]

torch.manual_seed(0)
rows = []
for i in range(4):
    ids = [(7 * i + j) % 60 + 2 for j in range(10)]
    rows.append({"input_ids": ids, "labels": [-100] * 4 + ids[4:]})

def collate(batch):
    return {k: torch.tensor([r[k] for r in batch]) for k in ("input_ids", "labels")}

results = {}
for case, kwargs in (("asked", {"prometheus_port": port}), ("not_asked", {})):
    records.clear()
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    cb = MaskMonitorCallback(**kwargs)
    args = TrainingArguments(output_dir=os.path.join(os.getcwd(), case), per_device_train_batch_size=2,
                             max_steps=2, save_strategy="no", report_to="none", use_cpu=True,
                             disable_tqdm=True, logging_steps=1)
    out = Trainer(model=model, args=args, train_dataset=rows, data_collator=collate, callbacks=[cb]).train()
    with socket.socket() as s:
        listening = s.connect_ex(("127.0.0.1", port)) == 0
    s = cb.summary()
    results[case] = {"steps": out.global_step, "target": s["target_tokens"], "supervised": s["supervised_tokens"],
                     "aborted": s["aborted"], "listening": listening,
                     "warnings": [m for lvl, m in records if lvl == "WARNING"],
                     "prometheus_lines": [m for lvl, m in records if "rometheus" in m]}
print(json.dumps(results))
"""


@pytest.mark.slow
def test_callback_trains_without_prometheus_client(tmp_path: Path):
    proc = run_python(_BLOCKED_TRAINING, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    for case in ("asked", "not_asked"):
        r = res[case]
        # training ran to the end and every micro-batch was audited: 2 steps x 2 rows x (9 | 6) slots
        assert (r["steps"], r["target"], r["supervised"], r["aborted"]) == (2, 36, 24, None), r
        assert r["listening"] is False
    asked = res["asked"]
    notice = [m for m in asked["warnings"] if "rometheus" in m]
    assert len(notice) == 1, asked["warnings"]  # one line, once, although the sinks are set up per train()
    assert "prometheus_port=" in notice[0] and "pip install 'mask-monitor[prometheus]'" in notice[0]
    assert "prometheus_client" in notice[0]  # the import error itself, for a broken install
    assert "Training goes on" in notice[0]
    # nobody asked for Prometheus: not a word at warning level
    assert not [m for m in res["not_asked"]["warnings"] if "rometheus" in m], res["not_asked"]


def _metadata(wheel: Path) -> tuple[list[str], str]:
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
        return names, z.read(meta).decode()


@pytest.mark.slow
def test_wheel_ships_py_typed_and_declares_the_extras(tmp_path: Path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "mask_monitor", src / "mask_monitor", ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("mask_monitor-*.whl")
    names, meta = _metadata(wheel)
    assert "mask_monitor/py.typed" in names
    assert {"mask_monitor/templates/__init__.py", "mask_monitor/sinks/prometheus/sink.py",
            "mask_monitor/sinks/wandb/sink.py"} <= set(names)
    extras = {line.split(":", 1)[1].strip() for line in meta.splitlines() if line.startswith("Provides-Extra:")}
    assert {"prometheus", "wandb", "report", "trl", "audit", "all", "docs", "test", "dev"} <= extras
    requires = [line.split(":", 1)[1].strip() for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    core = [r for r in requires if "extra ==" not in r]
    assert sorted(r.split(">")[0].split("=")[0].strip() for r in core) == ["torch", "transformers"]
    prom = [r for r in requires if r.startswith("prometheus-client")]
    assert prom and all("extra ==" in r for r in prom)
    assert any('extra == "prometheus"' in r for r in prom)
    # [all] brings every sink and tool
    all_reqs = [r for r in requires if 'extra == "all"' in r]
    assert any("prometheus" in r for r in all_reqs) and any("wandb" in r for r in all_reqs)
    assert any("audit" in r or r.startswith("trl") for r in all_reqs)
