"""The HTML report opened in headless Chromium: it renders with no console message and shows the
coloured tokens (checked on the DOM Chromium built and on the pixels of its screenshot)."""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("trl")
pytestmark = pytest.mark.slow

IGNORE = -100
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--enable-logging=stderr", "--v=0"]
# token background colours of the page's stylesheet
LEAKAGE_RGB = (0xD3, 0x2F, 0x2F)
SUPERVISED_RGB = (0xC8, 0xF7, 0xC5)
MASKED_RGB = (0xF2, 0xF2, 0xF2)


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if exe is None:
        pytest.skip("headless Chromium not installed (Debian: apt-get install -y chromium)")
    return exe


def run_chromium(tmp_path: Path, page: Path, *mode: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile-{len(list(tmp_path.iterdir()))}"
    cmd = [chromium(), *FLAGS, f"--user-data-dir={profile}", *mode, page.as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def console_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


def png_pixels(path: Path) -> np.ndarray:
    """Decode an 8-bit, non-interlaced RGB/RGBA PNG (what Chromium writes) into an (h, w, 3) array."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat = 8, b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", body)
            assert depth == 8 and color in (2, 6) and interlace == 0
            ch = 3 if color == 2 else 4
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    raw = np.frombuffer(zlib.decompress(idat), dtype=np.uint8).reshape(height, width * ch + 1)
    out = np.zeros((height, width * ch), dtype=np.uint8)
    prev = np.zeros(width * ch, dtype=np.int64)
    for y in range(height):
        f, line = raw[y, 0], raw[y, 1:].astype(np.int64)
        if f == 1:  # Sub: running sum per channel
            line = np.cumsum(line.reshape(width, ch), axis=0).reshape(-1) % 256
        elif f == 2:  # Up
            line = (line + prev) % 256
        elif f in (3, 4):  # Average / Paeth: sequential
            line = line.copy()
            for i in range(width * ch):
                a = line[i - ch] if i >= ch else 0
                b, c = prev[i], prev[i - ch] if i >= ch else 0
                if f == 3:
                    line[i] = (line[i] + (a + b) // 2) % 256
                else:
                    p = a + b - c
                    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                    line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) % 256
        out[y] = line
        prev = line
    return out.reshape(height, width, ch)[:, :, :3]


def count_rgb(pixels: np.ndarray, rgb: tuple[int, int, int]) -> int:
    return int((pixels == np.array(rgb, dtype=np.uint8)).all(axis=2).sum())


@pytest.fixture(scope="module")
def page(tmp_path_factory, tokenizers_dir):
    """A report over pre-tokenized rows: masked prompts, a row trained on its prompt, a fully masked row."""
    from transformers import AutoTokenizer

    from mask_monitor.audit.pipeline import AuditOptions, run_audit
    from mask_monitor.audit.report import render_html
    from mask_monitor.config import MonitorConfig

    tok_path = str(tokenizers_dir / "TinyLlama-1.1B-Chat-v1.0__composed")
    tok = AutoTokenizer.from_pretrained(tok_path)
    rows = []
    for i in range(6):
        msgs = [{"role": "user", "content": f"Question {i}: what does this rather long prompt sentence mean?"},
                {"role": "assistant", "content": f"Answer <{i}> & done."}]
        ids = tok.apply_chat_template(msgs, tokenize=True, return_dict=False)
        n_prompt = len(tok.apply_chat_template(msgs[:1], tokenize=True, return_dict=False, add_generation_prompt=True))
        # rows 0 and 2 trained on their prompt, row 1 fully masked, the others masked up to the answer
        labels = list(ids) if i in (0, 2) else [IGNORE] * len(ids) if i == 1 else [IGNORE] * n_prompt + ids[n_prompt:]
        rows.append({"input_ids": ids, "labels": labels})
    d = tmp_path_factory.mktemp("html")
    (d / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = run_audit(AuditOptions(tokenizer=tok_path, data=str(d / "rows.jsonl"), sft={"max_length": None},
                                    show=4, monitor=MonitorConfig(prompt_leakage="abort")), tokenizer=tok)
    out = d / "report.html"
    out.write_text(render_html(result, show=4), encoding="utf-8")
    return out, result


def test_page_is_self_contained(page):
    path, result = page
    text = path.read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", text)  # no external resource
    assert "<script" not in text
    assert f"{int(result.totals.supervised_tokens):,}" in text


def test_renders_without_console_messages_and_with_coloured_tokens(page, tmp_path):
    path, result = page
    dom = run_chromium(tmp_path, path, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert console_lines(dom.stderr) == []
    # Chromium parsed the page: verdict, histogram and every token status are in its DOM
    assert 'id="verdict"' in dom.stdout and "BLOCKED (exit 1)" in dom.stdout
    assert '<svg id="histogram"' in dom.stdout
    statuses = re.findall(r'data-status="(\w+)"', dom.stdout)
    assert {"masked", "supervised", "leakage", "start"} <= set(statuses)
    # the escaped answer text survived as text, not markup
    assert "Answer &lt;" in dom.stdout or "&lt;" in dom.stdout

    shot_path = tmp_path / "shot.png"
    shot = run_chromium(tmp_path, path, "--window-size=1200,2400", f"--screenshot={shot_path}")
    assert shot.returncode == 0 and shot_path.is_file(), shot.stderr[-2000:]
    assert console_lines(shot.stderr) == []
    pixels = png_pixels(shot_path)
    # the legend alone paints under 2,000 pixels of each colour; the coloured example tokens paint more
    assert count_rgb(pixels, LEAKAGE_RGB) > 5000  # red prompt-leakage tokens (the verdict bar is another red)
    assert count_rgb(pixels, SUPERVISED_RGB) > 5000
    assert count_rgb(pixels, MASKED_RGB) > 5000


def test_console_check_can_fail(tmp_path):
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><script>missing_function();</script></body></html>")
    proc = run_chromium(tmp_path, bad, "--dump-dom")
    assert any("missing_function" in line for line in console_lines(proc.stderr))
