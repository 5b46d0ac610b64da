"""Shared fixtures: the third-party fixture folder (read in place), real tokenizers, tiny models."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO.parent / "shared" / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        pytest.skip(f"third-party fixtures not found at {FIXTURES} (they live in ../shared/fixtures beside the repo)")
    return FIXTURES


@pytest.fixture(scope="session")
def tokenizers_dir(fixtures_dir: Path) -> Path:
    return fixtures_dir / "tokenizers"


@pytest.fixture(scope="session")
def zephyr_tokenizer(tokenizers_dir: Path):
    """TinyLlama-1.1B-Chat's real tokenizer (Llama vocabulary, Zephyr chat template)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizers_dir / "TinyLlama-1.1B-Chat-v1.0__composed")
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token
    return tok


@pytest.fixture(autouse=True)
def _mask_monitor_logs(caplog):
    caplog.set_level(logging.INFO, logger="mask_monitor")
    yield
