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
def tok_path(tokenizers_dir: Path) -> str:
    """Folder of TinyLlama-1.1B-Chat's real tokenizer (Llama vocabulary, Zephyr chat template)."""
    return str(tokenizers_dir / "TinyLlama-1.1B-Chat-v1.0__composed")


@pytest.fixture(scope="session")
def tok(tok_path: str):
    """That tokenizer exactly as ``AutoTokenizer`` loads it (no pad token), as the audit CLI sees it."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tok_path)


@pytest.fixture(scope="session")
def zephyr_tokenizer(tok_path: str):
    """That tokenizer, its own copy, with a pad token (unk) for training."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_path)
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token
    return tok


@pytest.fixture(autouse=True)
def _mask_monitor_logs(caplog):
    caplog.set_level(logging.INFO, logger="mask_monitor")
    yield
