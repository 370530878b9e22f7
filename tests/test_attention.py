"""Attention patterns: which positions a one-token change reaches, on every architecture and backend.

Expected dependencies are written here with plain loops, independently of `attention.py`.
"""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHITECTURES, BACKENDS, MASK_ID, tiny_causal_lm

from peft_diffusion import DiffusionConfig, get_diffusion_model
from peft_diffusion.attention import AttentionLayout, annealed_open_entries, diffusion_attention, two_stream_layout

LENGTH = 12
BLOCK = 4


def allowed(pattern, q, k, *, block=BLOCK, is_open=None, causal_start=False):
    """Hand rule for one query/key pair of the same document (single stream)."""
    if causal_start and q == 0:  # `causal_first_token`: the first token sees only itself
        return k == 0
    if pattern == "bidirectional":
        return True
    if pattern == "block":
        return k // block <= q // block
    if pattern == "causal":
        return k <= q
    if pattern == "annealed":
        return k <= q or bool(is_open[q, k])
    raise AssertionError(pattern)


def reach(pattern, length, layers, **kwargs):
    """[q, k] -> does token k influence the hidden state at q after `layers` attention layers (with residuals)."""
    one = torch.tensor([[allowed(pattern, q, k, **kwargs) for k in range(length)] for q in range(length)])
    total = torch.eye(length, dtype=torch.bool)
    for _ in range(layers):
        total = (one.float() @ total.float()) > 0
    return total


def shifted(dependencies, shift):
    """With the shift, logits[:, i] are read at i - 1 (position 0 reads itself)."""
    if not shift:
        return dependencies
    source = [max(i - 1, 0) for i in range(dependencies.shape[0])]
    return dependencies[source]


def influence(model, tokens, perturbed="input_ids", **forward_kwargs):
    """[i, j] -> does changing token j of `tokens` change logits[:, i]? One batched forward: row j+1 perturbs token j.

    `tokens` is passed as the forward argument `perturbed` (`input_ids`, or `clean_input_ids` for the clean stream);
    tensor arguments in `forward_kwargs` are repeated for every row, others (a generator) passed as they are.
    """
    length = tokens.shape[1]
    batch = tokens.repeat(length + 1, 1)  # [L+1, L]
    for j in range(length):
        batch[j + 1, j] = 3 + (batch[j + 1, j] + 2) % 120
    repeated = {
        key: value.repeat(length + 1, 1) if torch.is_tensor(value) else value for key, value in forward_kwargs.items()
    }
    with torch.no_grad():
        logits = model(**{perturbed: batch}, **repeated).logits.float()  # [L+1, L, V]
    changed = (logits[1:] - logits[:1]).abs().amax(-1) > 1e-5  # [j, i]
    return changed.T  # [i, j]


def tokens(length=LENGTH, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, MASK_ID - 1, (1, length), generator=generator)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pattern", ["bidirectional", "block", "annealed"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_one_token_perturbation(arch, pattern, backend):
    base = tiny_causal_lm(arch, backend)
    config = DiffusionConfig(attention=pattern, block_size=BLOCK, shift=True, mask_token_id=MASK_ID)
    model = get_diffusion_model(base, config)
    input_ids = tokens()
    if pattern == "annealed":
        # Training-time pattern: causal plus a random half of the upper triangle, the same draw for every row.
        model.train()
        model.annealing_ratio = 0.5
        is_open = annealed_open_entries(LENGTH, 0.5, generator=torch.Generator().manual_seed(3))
        seen = influence(model, input_ids, generator=torch.Generator().manual_seed(3))
        expected = shifted(reach("annealed", LENGTH, 2, is_open=is_open), True)
    else:
        model.eval()
        seen = influence(model, input_ids)
        expected = shifted(reach(pattern, LENGTH, 2), True)
    assert torch.equal(seen, expected), f"{arch}-{pattern}-{backend}\nseen\n{seen.int()}\nexpected\n{expected.int()}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pattern", ["bidirectional", "block"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_causal_first_token_sees_only_itself(arch, pattern, backend):
    """`causal_first_token`: the pattern's dependencies, except that the first token reads nothing after it; with
    the shift, the prediction of token 1 (read at position 0) then depends on token 0 alone, as in the base."""
    base = tiny_causal_lm(arch, backend)
    config = DiffusionConfig(
        attention=pattern, block_size=BLOCK, shift=True, mask_token_id=MASK_ID, causal_first_token=True
    )
    model = get_diffusion_model(base, config).eval()
    seen = influence(model, tokens())
    expected = shifted(reach(pattern, LENGTH, 2, causal_start=True), True)
    assert torch.equal(seen, expected), f"{arch}-{pattern}-{backend}\nseen\n{seen.int()}\nexpected\n{expected.int()}"
    assert seen[1].tolist() == [True] + [False] * (LENGTH - 1)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen3"])
def test_causal_first_token_predicts_token_one_as_the_base(arch):
    """Before any training (the base's weights), the prediction of token 1 is the base's next-token logits after
    token 0, to the float; without `causal_first_token` the first token sees its block and it is not."""
    ids = tokens()
    reference = tiny_causal_lm(arch)(input_ids=ids[:, :1]).logits[0, 0]  # [V], the base alone
    for causal_first_token in (True, False):
        config = DiffusionConfig(
            attention="block", block_size=BLOCK, mask_token_id=MASK_ID, causal_first_token=causal_first_token
        )
        model = get_diffusion_model(tiny_causal_lm(arch), config).eval()
        logits = model(input_ids=ids).logits[0, 1]  # [V]
        keep = torch.arange(logits.shape[0]) != MASK_ID
        same = torch.allclose(logits[keep], reference[keep], atol=1e-5)
        assert same == causal_first_token, (arch, causal_first_token)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_clean_context_two_stream(arch, backend):
    """Noisy block b sees itself and clean blocks < b; the first token of a block reads the clean previous token."""
    base = tiny_causal_lm(arch, backend)
    model = get_diffusion_model(base, DiffusionConfig(attention="block", block_size=BLOCK, mask_token_id=MASK_ID))
    model.eval()
    noisy, clean = tokens(seed=1), tokens(seed=2)
    seen_noisy = influence(model, noisy, clean_input_ids=clean)  # changes of x_t
    seen_clean = influence(model, clean, perturbed="clean_input_ids", input_ids=noisy)  # changes of x_0

    def block(i):
        return i // BLOCK

    expected_noisy = torch.zeros(LENGTH, LENGTH, dtype=torch.bool)
    expected_clean = torch.zeros(LENGTH, LENGTH, dtype=torch.bool)
    for i in range(LENGTH):
        source, from_clean = max(i - 1, 0), i > 0 and i % BLOCK == 0
        for j in range(LENGTH):
            if from_clean:  # a clean hidden state depends on clean tokens of blocks <= its own
                expected_clean[i, j] = block(j) <= block(source)
            else:  # a noisy hidden state: noisy tokens of its block, clean tokens of earlier blocks
                expected_noisy[i, j] = block(j) == block(source)
                expected_clean[i, j] = block(j) < block(source)
    assert torch.equal(seen_noisy, expected_noisy), f"x_t influence\n{seen_noisy.int()}"
    assert torch.equal(seen_clean, expected_clean), f"x_0 influence\n{seen_clean.int()}"


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_causal_first_token_in_the_two_stream_layout(arch):
    """Training layout with `causal_first_token`: the prediction of token 1 reads the noisy token 0 alone (never the
    rest of its noisy block, never a clean token); every other prediction keeps the clean-context dependencies."""
    config = DiffusionConfig(attention="block", block_size=BLOCK, mask_token_id=MASK_ID, causal_first_token=True)
    model = get_diffusion_model(tiny_causal_lm(arch), config).eval()
    noisy, clean = tokens(seed=1), tokens(seed=2)
    seen_noisy = influence(model, noisy, clean_input_ids=clean)
    seen_clean = influence(model, clean, perturbed="clean_input_ids", input_ids=noisy)
    for i in range(LENGTH):
        source, from_clean = max(i - 1, 0), i > 0 and i % BLOCK == 0
        for j in range(LENGTH):
            if source == 0:
                expected_noisy, expected_clean = j == 0, False
            elif from_clean:
                expected_noisy, expected_clean = False, j // BLOCK <= source // BLOCK
            else:
                expected_noisy, expected_clean = j // BLOCK == source // BLOCK, j // BLOCK < source // BLOCK
            assert bool(seen_noisy[i, j]) == expected_noisy and bool(seen_clean[i, j]) == expected_clean, (i, j)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pattern", ["bidirectional", "block"])
@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2", "phi3"])
def test_packed_documents_are_isolated(arch, pattern, backend):
    """Two documents in one row (position ids restart at 0): no influence across documents, blocks per document."""
    model = get_diffusion_model(
        tiny_causal_lm(arch, backend),
        DiffusionConfig(attention=pattern, block_size=BLOCK, shift=False, mask_token_id=MASK_ID),
    ).eval()
    first, second = 7, 5
    position_ids = torch.cat([torch.arange(first), torch.arange(second)])[None]
    seen = influence(model, tokens(first + second), position_ids=position_ids)
    doc = [0] * first + [1] * second
    pos = position_ids[0].tolist()
    expected = torch.tensor(
        [
            [doc[i] == doc[j] and allowed(pattern, pos[i], pos[j]) for j in range(first + second)]
            for i in range(first + second)
        ]
    )
    assert torch.equal(seen, expected), f"\n{seen.int()}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen3"])
def test_padding_never_influences_and_matches_unpadded(arch, padding_side, backend):
    """Padding tokens influence nothing; the real tokens' logits equal those of the unpadded input."""
    model = get_diffusion_model(
        tiny_causal_lm(arch, backend), DiffusionConfig(attention="block", block_size=BLOCK, mask_token_id=MASK_ID)
    ).eval()
    real = tokens(9)
    pad = torch.zeros(1, 3, dtype=torch.long)
    padded = torch.cat([pad, real], 1) if padding_side == "left" else torch.cat([real, pad], 1)
    attention_mask = (torch.arange(12) >= 3) if padding_side == "left" else (torch.arange(12) < 9)
    attention_mask = attention_mask.long()[None]
    real_slice = slice(3, 12) if padding_side == "left" else slice(0, 9)
    seen = influence(model, padded, attention_mask=attention_mask)
    pad_columns = [j for j in range(12) if attention_mask[0, j] == 0]
    assert not seen[real_slice][:, pad_columns].any()
    with torch.no_grad():
        padded_logits = model(input_ids=padded, attention_mask=attention_mask).logits[0, real_slice]
        plain_logits = model(input_ids=real).logits[0]
    torch.testing.assert_close(padded_logits, plain_logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ["mistral", "gemma2", "starcoder2"])
def test_sliding_window_is_kept_symmetric(arch, backend):
    """One sliding layer of window 3: token j reaches i iff the pattern allows it and |i - j| < 3."""
    base = tiny_causal_lm(arch, backend, num_hidden_layers=1, sliding_window=3)
    if arch == "gemma2":
        base.config.layer_types = ["sliding_attention"]
    model = get_diffusion_model(
        base, DiffusionConfig(attention="bidirectional", shift=False, mask_token_id=MASK_ID)
    ).eval()
    seen = influence(model, tokens())
    expected = torch.tensor([[abs(i - j) < 3 for j in range(LENGTH)] for i in range(LENGTH)])
    assert torch.equal(seen, expected), f"\n{seen.int()}"


def test_layout_dense_matches_hand_rules():
    positions = torch.arange(8)[None]
    doc_ids = torch.zeros_like(positions)
    dense = AttentionLayout("block", positions, doc_ids, block_size=3).dense()[0]
    assert torch.equal(dense, torch.tensor([[k // 3 <= q // 3 for k in range(8)] for q in range(8)]))
    two = two_stream_layout(positions, doc_ids, 4).dense()[0]  # [16, 16]
    for q in range(16):
        for k in range(16):
            q_clean, k_clean, bq, bk = q >= 8, k >= 8, (q % 8) // 4, (k % 8) // 4
            if q_clean:
                rule = k_clean and bk <= bq
            else:
                rule = (not k_clean and bk == bq) or (k_clean and bk < bq)
            assert bool(two[q, k]) == rule, (q, k)


def test_layout_is_inactive_outside_the_context():
    """A model outside `diffusion_attention` stays causal, even after the interface was installed."""
    base = tiny_causal_lm("llama", "sdpa")
    get_diffusion_model(base, DiffusionConfig(attention="bidirectional", mask_token_id=MASK_ID))
    input_ids = tokens()
    with torch.no_grad():
        before = base(input_ids=input_ids).logits
        changed = input_ids.clone()
        changed[0, -1] += 1
        after = base(input_ids=changed).logits
    torch.testing.assert_close(before[:, :-1], after[:, :-1])
    layout = AttentionLayout("bidirectional", torch.arange(LENGTH)[None], torch.zeros(1, LENGTH, dtype=torch.long))
    with diffusion_attention(layout), torch.no_grad():
        inside = base(input_ids=changed).logits
    assert not torch.allclose(inside[:, 0], after[:, 0])


def test_bad_layouts_raise():
    positions = torch.arange(4)[None]
    with pytest.raises(ValueError, match="pattern"):
        AttentionLayout("sideways", positions, positions)
    with pytest.raises(ValueError, match="block_size"):
        AttentionLayout("block", positions, positions)
    with pytest.raises(ValueError, match="ratio"):
        annealed_open_entries(4, 1.5)


# ----------------------------------------------------------------------------------------------------------------------
# The unmasked fast path: no mask where every query may see every key, same logits as the masked path
# ----------------------------------------------------------------------------------------------------------------------


def run_recording(model, masked, monkeypatch, **forward_kwargs):
    """Logits of one forward and whether it ran unmasked (attention modules non-causal during the forward).

    `masked=True` forces the masked path by denying the unmasked one (`_allows_every_pair`); nothing else changes.
    """
    from peft_diffusion.model import DiffusionLM

    if masked:
        monkeypatch.setattr(DiffusionLM, "_allows_every_pair", lambda self, *args: False)
    seen = []
    modules = [m for m in model.causal_lm.modules() if isinstance(getattr(m, "is_causal", None), bool)]
    handle = modules[0].register_forward_pre_hook(lambda module, args: seen.append(module.is_causal))
    try:
        logits = model(**forward_kwargs).logits
    finally:
        handle.remove()
        monkeypatch.undo()
    assert modules[0].is_causal  # restored after the forward
    return logits, not seen[0]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_cached_block_window_runs_unmasked_with_equal_logits(arch, backend, monkeypatch):
    """A block window over a cache of everything before it: no mask at all, the masked path's logits."""
    from transformers.cache_utils import DynamicCache

    model = get_diffusion_model(
        tiny_causal_lm(arch, backend),
        DiffusionConfig(attention="block", block_size=BLOCK, shift=True, mask_token_id=MASK_ID),
    ).eval()
    canvas = tokens(3 * BLOCK).repeat(2, 1)
    canvas[1, 2 * BLOCK + 1] = MASK_ID
    results = {}
    for masked in (False, True):
        cache = DynamicCache()
        with torch.no_grad():
            model(input_ids=canvas[:, : 2 * BLOCK], past_key_values=cache, use_cache=True)
            logits, unmasked = run_recording(
                model, masked, monkeypatch, input_ids=canvas[:, 2 * BLOCK :], past_key_values=cache, use_cache=True
            )
        results[masked] = logits
        assert unmasked == (not masked)
        assert cache.get_seq_length() == 3 * BLOCK
    torch.testing.assert_close(results[False], results[True], atol=1e-5, rtol=1e-5)
    # the same logits as the uncached forward of the whole canvas (block pattern, masked)
    with torch.no_grad():
        whole = model(input_ids=canvas).logits[:, 2 * BLOCK + 1 :]
    torch.testing.assert_close(results[False][:, 1:], whole, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_bidirectional_runs_unmasked_with_equal_logits(arch, backend, monkeypatch):
    model = get_diffusion_model(
        tiny_causal_lm(arch, backend), DiffusionConfig(attention="bidirectional", mask_token_id=MASK_ID)
    ).eval()
    input_ids = tokens()
    with torch.no_grad():
        fast, unmasked = run_recording(model, False, monkeypatch, input_ids=input_ids)
        slow, masked_unmasked = run_recording(model, True, monkeypatch, input_ids=input_ids)
    assert unmasked and not masked_unmasked
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("pattern", "forward_kwargs"),
    [
        ("bidirectional", dict(attention_mask=torch.tensor([[0, 0] + [1] * (LENGTH - 2)]))),  # padding
        ("bidirectional", dict(position_ids=torch.cat([torch.arange(5), torch.arange(LENGTH - 5)])[None])),  # packed
        ("block", {}),  # several blocks without a cache
    ],
)
def test_masked_path_kept_where_some_pair_is_forbidden(pattern, forward_kwargs, monkeypatch):
    model = get_diffusion_model(
        tiny_causal_lm("llama", "sdpa"),
        DiffusionConfig(attention=pattern, block_size=BLOCK, mask_token_id=MASK_ID),
    ).eval()
    with torch.no_grad():
        _, unmasked = run_recording(model, False, monkeypatch, input_ids=tokens(), **forward_kwargs)
    assert not unmasked


@pytest.mark.parametrize("checkpointing", [False, True])
def test_bidirectional_training_gradients_equal_the_masked_path(checkpointing, monkeypatch):
    """Unmasked training gives the masked path's gradients; gradient checkpointing keeps the masked path (its
    recomputation runs outside the forward, where the attention modules are causal again)."""
    from peft_diffusion.model import DiffusionLM

    model = get_diffusion_model(
        tiny_causal_lm("llama", "sdpa"), DiffusionConfig(attention="bidirectional", mask_token_id=MASK_ID)
    ).train()
    if checkpointing:
        model.gradient_checkpointing_enable()
    input_ids = tokens().repeat(2, 1)

    def gradients(masked):
        if masked:
            monkeypatch.setattr(DiffusionLM, "_allows_every_pair", lambda self, *args: False)
        model.zero_grad()
        seen = []
        handle = model._attention_modules()[0].register_forward_pre_hook(lambda m, a: seen.append(m.is_causal))
        loss = model(input_ids=input_ids, labels=input_ids, generator=torch.Generator().manual_seed(0)).loss
        loss.backward()
        handle.remove()
        monkeypatch.undo()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None], seen

    fast, seen_fast = gradients(False)
    slow, _ = gradients(True)
    assert (seen_fast[0] is False) == (not checkpointing)
    for a, b in zip(fast, slow, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
