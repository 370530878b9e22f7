"""Shared fixtures: tiny random causal LMs of many architectures, built in code (never downloaded)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from tiny_models import MASK_ID, VOCAB_SIZE, build_tiny_causal_lm, tiny_config  # noqa: F401 (re-exported)

from peft_diffusion.architectures import VERIFIED_ARCHITECTURES

# A small representative set for the per-feature matrices (tests/test_attention.py, test_generation.py); the whole
# verified table is checked by tests/test_architectures.py (ALL_VERIFIED_ARCHITECTURES).
ARCHITECTURES = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3_text",
    "phi3",
    "gpt2",
    "gpt_neox",
    "olmo2",
    "stablelm",
    "granite",
    "starcoder2",
)
ALL_VERIFIED_ARCHITECTURES = VERIFIED_ARCHITECTURES
BACKENDS = ("eager", "sdpa")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
STORIES_260K = SHARED / "models" / "stories260K"
DATA = SHARED / "data"


def tiny_causal_lm(model_type: str = "llama", attn_implementation: str = "eager", seed: int = 0, **overrides):
    """A tiny random model of `model_type` (tests/tiny_models.py); skips when transformers has no such backend."""
    try:
        return build_tiny_causal_lm(model_type, attn_implementation, seed, **overrides)
    except ValueError as error:
        if "does not support" not in str(error):
            raise
        pytest.skip(f"transformers has no {attn_implementation} path for {model_type}")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread: intra-op threads only contend on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
