"""The architecture table: complete for the installed transformers, verified types follow every pattern exactly,
refused types are refused with their reason.

Expected dependencies are written here with plain loops, independently of `architectures.py` and `attention.py`.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch
from conftest import ALL_VERIFIED_ARCHITECTURES, BACKENDS, tiny_causal_lm
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from peft_diffusion.architectures import (
    REFUSAL_CATEGORIES,
    REFUSED_ARCHITECTURES,
    VERIFIED_ARCHITECTURES,
    check_architecture,
)
from peft_diffusion.attention import AttentionLayout, diffusion_attention, non_causal, two_stream_layout
from peft_diffusion.probe import per_expert_loop, probe_architecture

LENGTH = 12
BLOCK = 4
INSTALLED_VERIFIED = [name for name in ALL_VERIFIED_ARCHITECTURES if name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES]


def test_every_installed_causal_lm_is_in_the_table():
    missing = sorted(set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) - set(VERIFIED_ARCHITECTURES) - set(REFUSED_ARCHITECTURES))
    assert not missing, (
        f"{len(missing)} causal-LM model types of the installed transformers are not in peft_diffusion/architectures.py: "
        f"{missing}. Run `python benchmarks/classify_architectures.py` and add its verdicts to the table."
    )
    assert not set(VERIFIED_ARCHITECTURES) & set(REFUSED_ARCHITECTURES)
    assert {category for category, _ in REFUSED_ARCHITECTURES.values()} <= set(REFUSAL_CATEGORIES)


# ----------------------------------------------------------------------------------------------------------------
# Hand rules
# ----------------------------------------------------------------------------------------------------------------


def test_the_readme_counts_are_the_table_s():
    """README.md's verdict table gives the count of each verdict of the table in `architectures.py`."""
    import re
    from collections import Counter
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    written = {
        label: int(count) for label, count in re.findall(r"^\| (verified|refused: [^|]+?) \| (\d+) \|", readme, re.M)
    }
    refused = Counter(reason for reason, _ in REFUSED_ARCHITECTURES.values())
    labels = {
        "non_attention_mixer": "refused: non-attention token mixer",
        "mask_outside_masking_utils": "refused: masks built outside `masking_utils`",
        "chunked_attention": "refused: chunked attention",
        "no_tiny_config": "refused: not verified (no tiny config)",
    }
    unlabelled = sorted(set(refused) - set(labels))
    assert not unlabelled, f"new refusal reasons {unlabelled}: add a README row and a label here for each"
    expected = {
        "verified": len(VERIFIED_ARCHITECTURES),
        **{labels[reason]: count for reason, count in refused.items()},
    }
    assert written == expected
    total = len(VERIFIED_ARCHITECTURES) + len(REFUSED_ARCHITECTURES)
    assert f"`AutoModelForCausalLM` mapping: {total} model types" in readme


def one_layer(pattern, q, k, is_open=None):
    """Single stream, one document: may query q attend to key k?"""
    if pattern == "causal":
        return k <= q
    if pattern == "bidirectional":
        return True
    if pattern == "block":
        return k // BLOCK <= q // BLOCK
    if pattern == "annealed":
        return k <= q or bool(is_open[q, k])
    raise AssertionError(pattern)


def two_stream_one_layer(q, k):
    """`[x_t ; x_0]`, indices 0..2L-1: noisy q sees noisy k of its block and clean k of earlier blocks; clean q sees
    clean k of blocks <= its own."""
    q_clean, k_clean = q >= LENGTH, k >= LENGTH
    bq, bk = (q % LENGTH) // BLOCK, (k % LENGTH) // BLOCK
    if q_clean:
        return k_clean and bk <= bq
    return (not k_clean and bk == bq) or (k_clean and bk < bq)


def reach(rule, size, layers):
    """[q][k]: k reaches q through at most `layers` allowed pairs (residuals keep each token's own state)."""
    total = [[q == k or rule(q, k) for k in range(size)] for q in range(size)]
    for _ in range(layers - 1):
        total = [
            [any(total[m][k] and (m == q or rule(q, m)) for m in range(size)) for k in range(size)]
            for q in range(size)
        ]
    return torch.tensor(total)


def influence(model, tokens, tolerance):
    """[i, j]: does changing token j change logits[:, i]? Row j + 1 of one batch changes token j."""
    length = tokens.shape[1]
    batch = tokens.repeat(length + 1, 1)
    for j in range(length):
        batch[j + 1, j] = 3 + (batch[j + 1, j] + 7) % 120
    positions = torch.arange(length) % LENGTH
    with torch.no_grad():
        logits = model(input_ids=batch, position_ids=positions.expand(length + 1, -1), use_cache=False).logits
    difference = (logits[1:] - logits[:1]).abs().amax(-1).double()
    return (difference > tolerance * max(1.0, float(logits[0].abs().max()))).T


def layout(pattern, rows, **fields):
    positions = torch.arange(LENGTH).expand(rows, -1)
    return AttentionLayout(pattern, positions, torch.zeros_like(positions), **fields)


def layers_of(model):
    text = model.config.get_text_config()
    for key in ("num_hidden_layers", "n_layer", "num_layers", "decoder_layers"):
        if isinstance(getattr(text, key, None), int):
            return getattr(text, key)
    raise AssertionError("no depth in the config")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", INSTALLED_VERIFIED)
def test_verified_architecture_follows_every_pattern(arch, backend):
    model = tiny_causal_lm(arch, backend)
    per_expert_loop(model)  # grouped expert matmuls: no float64, and batch-dependent results in float32
    tokens = torch.randint(3, 120, (1, 2 * LENGTH), generator=torch.Generator().manual_seed(0))
    try:  # float64: a two-layer chain changes a fresh model's logits by ~1e-7 only
        model.double()
        model(input_ids=tokens[:, :4], use_cache=False)
        tolerance = 1e-9
    except RuntimeError:  # kernels without float64 (grouped expert matmuls): float32, exact comparison
        model.float()
        tolerance = 0.0
    layers = layers_of(model)
    is_open = torch.rand(LENGTH, LENGTH, generator=torch.Generator().manual_seed(3)) < 0.5
    modules = [m for m in model.modules() if isinstance(getattr(m, "is_causal", None), bool)]
    rows = LENGTH + 1
    single = tokens[:, :LENGTH]
    cases = {
        "causal": (layout("causal", rows), lambda q, k: one_layer("causal", q, k)),
        "bidirectional": (layout("bidirectional", rows), lambda q, k: True),
        "block": (layout("block", rows, block_size=BLOCK), lambda q, k: one_layer("block", q, k)),
        "annealed": (layout("annealed", rows, is_open=is_open), lambda q, k: one_layer("annealed", q, k, is_open)),
        "unmasked": (layout("bidirectional", rows, unmasked=True), lambda q, k: True),
    }
    for name, (pattern_layout, rule) in cases.items():
        with diffusion_attention(pattern_layout), non_causal(modules if name == "unmasked" else ()):
            seen = influence(model, single, tolerance)
        expected = reach(rule, LENGTH, layers)
        assert torch.equal(seen, expected), f"{arch}-{name}-{backend}\nseen\n{seen.int()}\nexpected\n{expected.int()}"
    # the clean-context two-stream layout [x_t ; x_0], positions [0..L-1, 0..L-1]
    positions = torch.arange(LENGTH).expand(2 * LENGTH + 1, -1)
    with diffusion_attention(two_stream_layout(positions, torch.zeros_like(positions), BLOCK)):
        seen = influence(model, tokens, tolerance)
    expected = reach(two_stream_one_layer, 2 * LENGTH, layers)
    assert torch.equal(seen, expected), f"{arch}-clean_context-{backend}\nseen\n{seen.int()}"


# ----------------------------------------------------------------------------------------------------------------
# Refusals and the probe
# ----------------------------------------------------------------------------------------------------------------

ONE_PER_CATEGORY = {}
for _name, (_category, _detail) in sorted(REFUSED_ARCHITECTURES.items()):
    ONE_PER_CATEGORY.setdefault(_category, _name)


@pytest.mark.parametrize("model_type", sorted(ONE_PER_CATEGORY.values()))
def test_refused_types_are_refused_with_their_reason(model_type):
    category, detail = REFUSED_ARCHITECTURES[model_type]
    with pytest.raises(ValueError, match=rf"'{model_type}'.*{REFUSAL_CATEGORIES[category][:30]}") as error:
        check_architecture(SimpleNamespace(model_type=model_type))
    assert detail in str(error.value) and "Use a verified" in str(error.value)


def test_verified_types_pass_without_a_probe():
    for model_type in VERIFIED_ARCHITECTURES:
        check_architecture(SimpleNamespace(model_type=model_type, layer_types=["linear_attention"]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_probe_passes_a_verified_architecture_quickly(backend):
    model = tiny_causal_lm("qwen3", backend)
    model.config.model_type = "qwen3"
    start = time.perf_counter()
    probe_architecture(model)
    assert time.perf_counter() - start < 10


def test_probe_refuses_an_architecture_whose_masks_bypass_masking_utils():
    """gpt_neo builds its (local) attention masks itself: the probe names the type and the failing pattern."""
    name = "gpt_neo"
    assert REFUSED_ARCHITECTURES[name][0] == "mask_outside_masking_utils"
    model = tiny_causal_lm(name, "eager")
    with pytest.raises(ValueError, match=rf"'{name}' failed the diffusion attention probe.*(bidirectional|block)"):
        probe_architecture(model)
