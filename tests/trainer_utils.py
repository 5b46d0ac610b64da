"""Tiny real models and datasets for trainer-level tests (no downloads, CPU, seconds)."""

from __future__ import annotations

import os
import sys
from typing import NoReturn

import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM

IGNORE = -100


def exit_worker(code: int) -> NoReturn:
    """End a torchrun worker script right here: flush, then ``os._exit`` with no teardown at all.

    Not even returning from ``main``: releasing its locals (trainer, DDP/FSDP model) runs torch's gloo
    ProcessGroup destructor, which can deadlock against the group's own runloop thread over the GIL (seen
    here in 3 of 16 runs: the worker stuck on the line that called ``main``, both results already on
    disk, torchrun waiting forever). Nothing of the monitor runs at that point; the test would only time out.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def tiny_llama(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(config)


CONVERSATIONS = [
    ("What is the capital of France?", "Paris is the capital of France."),
    ("Name a prime number.", "Seven is a prime number."),
    ("Say hello.", "Hello there, friend!"),
    ("What colour is the sky?", "The sky is usually blue."),
    ("Count to three.", "One, two, three."),
    ("Give me a fruit.", "An apple a day."),
    ("What is two plus two?", "Two plus two is four."),
    ("Name an ocean.", "The Pacific Ocean."),
]


def encode_pair(tokenizer, prompt: str, response: str) -> tuple[list[int], list[int], int]:
    """input_ids of the rendered conversation and the number of prompt tokens (assistant header included)."""
    msgs = [{"role": "user", "content": prompt}]
    prompt_ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
    full_ids = tokenizer.apply_chat_template(
        msgs + [{"role": "assistant", "content": response}], tokenize=True, return_dict=False
    )
    assert full_ids[: len(prompt_ids)] == prompt_ids
    return list(full_ids), list(prompt_ids), len(prompt_ids)


def rows(tokenizer, mode: str = "assistant", n: int | None = None) -> list[dict]:
    """Pre-tokenized examples. mode: assistant (prompt masked), none (labels == input_ids), all (-100)."""
    out = []
    for prompt, response in CONVERSATIONS[:n]:
        ids, _, n_prompt = encode_pair(tokenizer, prompt, response)
        if mode == "assistant":
            labels = [IGNORE] * n_prompt + ids[n_prompt:]
        elif mode == "none":
            labels = list(ids)
        elif mode == "all":
            labels = [IGNORE] * len(ids)
        else:
            raise ValueError(mode)
        out.append({"input_ids": ids, "labels": labels})
    return out


def dataset(examples: list[dict]) -> Dataset:
    return Dataset.from_list(examples)


def expected_counts(examples: list[dict]) -> dict[str, int]:
    """Independent count, example by example, in plain Python: what the shifted loss sees."""
    target = sum(len(e["input_ids"]) - 1 for e in examples)
    supervised = sum(sum(1 for t in e["labels"][1:] if t != IGNORE) for e in examples)
    fully = sum(1 for e in examples if all(t == IGNORE for t in e["labels"][1:]))
    unmasked = sum(1 for e in examples if all(t != IGNORE for t in e["labels"][1:]))
    return {
        "sequences": len(examples),
        "target_tokens": target,
        "supervised_tokens": supervised,
        "masked_tokens": target - supervised,
        "fully_masked_sequences": fully,
        "unmasked_sequences": unmasked,
    }


def params_snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_params_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], skip: tuple[str, ...] = ()) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if any(s in k for s in skip):
            continue
        assert torch.equal(a[k], b[k]), f"parameter {k} changed"


def launch(cmd: list[str], timeout: float, env: dict[str, str] | None = None):
    """Run ``cmd`` (e.g. torchrun) in its own session; past ``timeout`` kill the whole group (torchrun's
    workers too) and fail the test: a hang. Returns ``(CompletedProcess, seconds)``."""
    import signal
    import subprocess
    import time

    import pytest

    base = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, env={**base, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(cmd[-3:])} hung for {timeout} s (killed):\n{out[-3000:]}\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), time.monotonic() - t0
