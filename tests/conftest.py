"""Shared fixtures: tiny random causal LMs of many architectures, built in code (never downloaded)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from peft_diffusion.architectures import VERIFIED_ARCHITECTURES

# The verified table is the test matrix: an architecture added there is tested on every pattern and backend.
ARCHITECTURES = VERIFIED_ARCHITECTURES
BACKENDS = ("eager", "sdpa")
VOCAB_SIZE = 128
MASK_ID = 127

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
STORIES_260K = SHARED / "models" / "stories260K"
DATA = SHARED / "data"


def tiny_config(model_type: str, attn_implementation: str = "eager", **overrides):
    """A small config of `model_type` (special ids inside the vocabulary, kv heads dividing heads, no dropout)."""
    kwargs = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        head_dim=8,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    kwargs.update(overrides)
    config = AutoConfig.for_model(model_type, **kwargs)
    if getattr(config, "sliding_window", None) is not None and "sliding_window" not in overrides:
        config.sliding_window = 4096  # the window is tested on its own (tests/test_attention.py)
    for name in ("attention_dropout", "hidden_dropout", "attn_pdrop", "resid_pdrop", "embd_pdrop", "embed_dropout"):
        if hasattr(config, name):
            setattr(config, name, 0.0)
    config._attn_implementation = attn_implementation
    return config


def tiny_causal_lm(model_type: str = "llama", attn_implementation: str = "eager", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    try:
        model = AutoModelForCausalLM.from_config(tiny_config(model_type, attn_implementation, **overrides))
    except ValueError as error:
        if "does not support" not in str(error):
            raise
        pytest.skip(f"transformers has no {attn_implementation} path for {model_type}")
    return model.eval()


@pytest.fixture
def stories_path():
    if not STORIES_260K.is_dir():
        pytest.skip("../shared/models/stories260K is not available")
    return str(STORIES_260K)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


# Under pytest-xdist every worker is one process: one thread each avoids oversubscribing the cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
