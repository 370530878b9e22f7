"""The denoising loop: cached == uncached, batch == single, padding, EOS, samplers, NFE, infill, streaming, errors."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHITECTURES, MASK_ID, tiny_causal_lm
from transformers import TextIteratorStreamer, TextStreamer

from peft_diffusion import DiffusionConfig, get_diffusion_model
from peft_diffusion.decoding import DecodingPlan, split_steps
from peft_diffusion.generation import DiffusionGenerateOutput, DiffusionGenerationConfig, generate, infill
from peft_diffusion.samplers import SAMPLERS

BLOCK = 4
EOS = 2


def diffusion_model(arch="llama", attention="block", shift=True, backend="eager", block_size=BLOCK, seed=0):
    config = DiffusionConfig(attention=attention, block_size=block_size, shift=shift, mask_token_id=MASK_ID)
    return get_diffusion_model(tiny_causal_lm(arch, backend, seed=seed), config).eval()


def prompts(batch=3, length=7, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, MASK_ID - 1, (batch, length), generator=generator)


def left_padded(rows, pad=0):
    """Left-pad a list of 1D prompts; returns (input_ids, attention_mask)."""
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad)
    attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
    for index, row in enumerate(rows):
        input_ids[index, width - len(row) :] = row
        attention_mask[index, width - len(row) :] = 1
    return input_ids, attention_mask


NO_EOS = dict(eos_token_id=[])  # random tiny models emit any token; most tests decode the full length


# ----------------------------------------------------------------------------------------------------------------------
# Exactness of the KV cache
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_cached_equals_uncached(arch):
    model = diffusion_model(arch)
    # Ragged left-padded prompts: the first block is partial (prompt tail) and differs per row.
    input_ids, attention_mask = left_padded([row[:n] for row, n in zip(prompts(3, 7), (7, 5, 2))])
    kwargs = dict(max_new_tokens=10, steps=10, return_dict_in_generate=True, **NO_EOS)
    cached = generate(model, input_ids, attention_mask, use_cache=True, **kwargs)
    uncached = generate(model, input_ids, attention_mask, use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, uncached.sequences)
    assert cached.nfe == uncached.nfe


@pytest.mark.parametrize("attention", ["block", "bidirectional"])
@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen3"])
def test_cached_equals_uncached_with_a_causal_first_token(arch, attention):
    """`causal_first_token` with ragged left padding: each row's first real token sees only itself, in the prefill
    of the cache and in every uncached forward alike."""
    config = DiffusionConfig(attention=attention, block_size=BLOCK, mask_token_id=MASK_ID, causal_first_token=True)
    model = get_diffusion_model(tiny_causal_lm(arch, "eager"), config).eval()
    input_ids, attention_mask = left_padded([row[:n] for row, n in zip(prompts(3, 7), (7, 5, 2))])
    kwargs = dict(max_new_tokens=8, steps=8, return_dict_in_generate=True, **NO_EOS)
    uncached = generate(model, input_ids, attention_mask, use_cache=False, **kwargs)
    if attention == "block":
        cached = generate(model, input_ids, attention_mask, use_cache=True, **kwargs)
        assert torch.equal(cached.sequences, uncached.sequences) and cached.nfe == uncached.nfe
    # the rule is in effect: without it the same canvas scores differently
    plain = DiffusionConfig(attention=attention, block_size=BLOCK, mask_token_id=MASK_ID)
    other = get_diffusion_model(tiny_causal_lm(arch, "eager"), plain).eval()
    canvas_mask = torch.cat([attention_mask, torch.ones(3, 8, dtype=torch.long)], dim=1)
    assert not torch.allclose(
        model(input_ids=uncached.sequences, attention_mask=canvas_mask).logits,
        other(input_ids=uncached.sequences, attention_mask=canvas_mask).logits,
    )


def reference_decode(model, prompt: torch.Tensor, max_new_tokens: int, per_step: int) -> torch.Tensor:
    """An independent greedy decoder, written from the definition: the canvas is the prompt followed by
    `max_new_tokens` mask tokens; blocks are `position // block_size` (the training grid); per block, left to right,
    each step runs the model on the whole canvas, proposes the argmax token (never the mask token) at every masked
    position of the block and commits the `per_step` most probable ones (LLaDA's confidence). No cache, no plan."""
    block_size, mask_id = model.config.block_size, model.config.mask_token_id
    canvas = torch.cat([prompt, torch.full((max_new_tokens,), mask_id)])[None]  # [1, P + N]
    for start in range(0, canvas.shape[1], block_size):
        while True:
            is_masked = canvas[0] == mask_id  # [P + N]
            is_masked[:start] = False
            is_masked[start + block_size :] = False
            if not is_masked.any():
                break
            with torch.no_grad():
                logits = model(input_ids=canvas).logits[0].double()  # [P + N, V]
            logits[:, mask_id] = -torch.inf
            probs = logits.softmax(-1)
            confidence, tokens = probs.max(-1)  # [P + N]
            confidence = torch.where(is_masked, confidence, -1.0)
            chosen = confidence.topk(min(per_step, int(is_masked.sum()))).indices
            canvas[0, chosen] = tokens[chosen]
    return canvas[0]


@pytest.mark.parametrize("shift", [True, False])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize(("prompt_length", "max_new_tokens", "steps"), [(6, 10, 10), (8, 12, 6)], ids=str)
def test_cached_and_uncached_equal_an_independent_reference_decoder(arch, shift, prompt_length, max_new_tokens, steps):
    """Both of the library's decoders (the exact KV cache and the uncached loop) give the reference loop's tokens:
    one token per step over a partial first block (prompt of 6, blocks of 4), and two per step over full blocks."""
    # a larger initialisation than the default 0.02: logits then depend on which block tokens are committed
    config = DiffusionConfig(attention="block", block_size=BLOCK, shift=shift, mask_token_id=MASK_ID)
    model = get_diffusion_model(tiny_causal_lm(arch, initializer_range=0.2), config).eval()
    prompt = prompts(1, prompt_length, seed=4)[0]
    per_step = max_new_tokens // steps
    expected = reference_decode(model, prompt, max_new_tokens, per_step)
    for use_cache in (True, False):
        out = generate(model, prompt[None], max_new_tokens=max_new_tokens, steps=steps, use_cache=use_cache, **NO_EOS)
        assert torch.equal(out[0], expected), f"use_cache={use_cache}"


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen3"])
def test_cached_equals_uncached_without_shift(arch, backend):
    model = diffusion_model(arch, shift=False, backend=backend)
    input_ids, attention_mask = left_padded([row[:n] for row, n in zip(prompts(2, 6), (6, 3))])
    kwargs = dict(max_new_tokens=8, steps=8, threshold=0.5, **NO_EOS)
    cached = generate(model, input_ids, attention_mask, use_cache=True, **kwargs)
    uncached = generate(model, input_ids, attention_mask, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)


def test_cached_equals_uncached_with_wider_decoding_blocks():
    """block_length a multiple of block_size: two attention blocks per decoding block."""
    model = diffusion_model("llama")
    input_ids = prompts(2, 5)
    kwargs = dict(max_new_tokens=16, steps=8, block_length=2 * BLOCK, **NO_EOS)
    assert torch.equal(
        generate(model, input_ids, use_cache=True, **kwargs), generate(model, input_ids, use_cache=False, **kwargs)
    )


@pytest.mark.parametrize("shift", [True, False])
def test_cached_equals_uncached_across_blocks_no_row_generates_in(shift):
    """Prompts of 1 and 13 tokens, 4 new tokens: no row generates in block 2 (columns 8-11). The plan skips it; the
    fused commit of block 1 carries its prompt tokens into the cache together with the first step of block 3."""
    model = diffusion_model("llama", shift=shift)
    input_ids, attention_mask = left_padded([row[:n] for row, n in zip(prompts(2, 13), (1, 13))])
    kwargs = dict(max_new_tokens=4, steps=4, return_dict_in_generate=True, **NO_EOS)
    cached = generate(model, input_ids, attention_mask, use_cache=True, **kwargs)
    uncached = generate(model, input_ids, attention_mask, use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, uncached.sequences)
    plan = DecodingPlan.for_generate(
        attention_mask.sum(-1), max_new_tokens=4, block_length=BLOCK, steps=4, aligned=True
    )
    assert plan.blocks == (0, 1, 3, 4) and cached.nfe == uncached.nfe == plan.num_forwards == 3 + 1 + 3 + 1


def test_cache_saves_forwards_over_the_prompt():
    """The prompt is prefilled once: a cached step forwards exactly one block, a fused commit two, never the prompt."""
    model = diffusion_model("llama")
    calls = []
    handle = model.causal_lm.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    generate(model, prompts(1, 12), max_new_tokens=8, steps=8, use_cache=True, **NO_EOS)
    handle.remove()
    assert calls[0] == 12 + BLOCK  # prefill fused with the first block's first step
    assert set(calls[1:]) <= {BLOCK, 2 * BLOCK}  # block steps, and commit fused with the next block
    assert len(calls) == 8


@pytest.mark.parametrize("shift", [True, False])
def test_cached_steps_run_unmasked(shift):
    """Every step forward (one block over the cache) runs with no mask; prefill and fused commits keep theirs. With
    ragged prompts, windows reaching a row's right padding keep the mask."""
    model = diffusion_model("llama", shift=shift, backend="sdpa")
    attention = model._attention_modules()[0]
    calls = []
    handle = attention.register_forward_pre_hook(lambda module, args: calls.append(module.is_causal))
    width_calls = []
    size_handle = model.causal_lm.register_forward_pre_hook(
        lambda module, args, kwargs: width_calls.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    generate(model, prompts(1, 6), max_new_tokens=10, steps=10, **NO_EOS)
    unmasked = [not causal for causal in calls]
    assert unmasked == [width == BLOCK for width in width_calls]
    assert sum(unmasked) > 0
    calls.clear()
    width_calls.clear()
    input_ids, attention_mask = left_padded([row[:n] for row, n in zip(prompts(2, 6), (6, 2))])
    generate(model, input_ids, attention_mask, max_new_tokens=10, steps=10, **NO_EOS)
    handle.remove()
    size_handle.remove()
    # row 1 ends at column 12: the window [12, 16) sees its padding
    unmasked = [not causal for causal in calls]
    assert any(width == BLOCK and not fast for width, fast in zip(width_calls, unmasked))
    assert any(unmasked)


@pytest.mark.parametrize("shift", [True, False])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_logits_to_keep_equals_the_tail_of_all_logits(arch, shift):
    """The LM head on the last rows only (prefill, fused commits): the same logits as the full forward's tail."""
    from transformers.cache_utils import DynamicCache

    model = diffusion_model(arch, shift=shift, backend="sdpa")
    input_ids, attention_mask = left_padded([row[:n] for row, n in zip(prompts(2, 11), (11, 6))])
    with torch.no_grad():
        full = model(input_ids=input_ids, attention_mask=attention_mask).logits
        for keep in (1, 4, 11):
            tail = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep).logits
            torch.testing.assert_close(tail, full[:, -keep:], atol=1e-5, rtol=1e-5)
        # over a cache split at a block boundary (as the decoding loop splits it)
        unpadded = prompts(2, 11)
        full = model(input_ids=unpadded).logits
        cache = DynamicCache()
        model(input_ids=unpadded[:, :8], past_key_values=cache, use_cache=True)
        cached = model(input_ids=unpadded[:, 8:], past_key_values=cache, logits_to_keep=2).logits
    torch.testing.assert_close(cached, full[:, -2:], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(input_ids=input_ids, logits_to_keep=-1)


# ----------------------------------------------------------------------------------------------------------------------
# Batching, padding, output
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attention", ["block", "bidirectional"])
def test_batch_equals_one_by_one_and_padding_is_invisible(attention):
    model = diffusion_model("llama", attention=attention)
    rows = [row[:n] for row, n in zip(prompts(3, 7, seed=1), (7, 4, 5))]
    input_ids, attention_mask = left_padded(rows)
    kwargs = dict(max_new_tokens=8, steps=8, **NO_EOS)
    batched = generate(model, input_ids, attention_mask, **kwargs)
    width = input_ids.shape[1]
    for index, row in enumerate(rows):
        single = generate(model, row[None], **kwargs)
        assert torch.equal(batched[index, width:], single[0, len(row) :])


@pytest.mark.parametrize("threshold", [None, 0.3])
@pytest.mark.parametrize(
    ("attention", "use_cache"), [("block", True), ("block", False), ("bidirectional", False)], ids=str
)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_row_decodes_the_same_alone_and_in_a_batch(seed, attention, use_cache, threshold):
    """Each row plans its own steps: mixed prompt lengths (a partial first block under block attention, the prompt's
    tail sharing it), left padding, steps < max_new_tokens. The batch may run a block longer than a row needs; that
    row then commits nothing, so its greedy output equals the one decoded alone."""
    model = diffusion_model("llama", attention=attention, block_size=8)
    rows = [row[:n] for row, n in zip(prompts(3, 9, seed=seed), (5, 1, 9))]
    input_ids, attention_mask = left_padded(rows)
    kwargs = dict(max_new_tokens=16, block_length=8, steps=8, threshold=threshold, use_cache=use_cache, **NO_EOS)
    batched = generate(model, input_ids, attention_mask, return_dict_in_generate=True, **kwargs)
    width = input_ids.shape[1]
    for index, row in enumerate(rows):
        single = generate(model, row[None], return_dict_in_generate=True, **kwargs)
        assert torch.equal(batched.sequences[index, width:], single.sequences[0, len(row) :]), f"row {index}"
        assert single.nfe <= 8
    if attention == "block":
        other = generate(model, input_ids, attention_mask, **{**kwargs, "use_cache": not use_cache})
        assert torch.equal(batched.sequences, other)


def test_output_keeps_prompt_and_has_no_mask():
    model = diffusion_model("llama")
    input_ids, attention_mask = left_padded([row[:n] for row, n in zip(prompts(2, 6), (6, 3))])
    out = generate(model, input_ids, attention_mask, max_new_tokens=9, steps=3, threshold=0.9, **NO_EOS)
    assert out.shape == (2, 6 + 9)
    assert torch.equal(out[:, :6], input_ids)
    assert not (out == MASK_ID).any()


def test_return_dict_history_and_config_object():
    model = diffusion_model("llama")
    config = DiffusionGenerationConfig(max_new_tokens=8, steps=4, output_history=True, return_dict_in_generate=True)
    out = model.generate(prompts(1, 4), generation_config=config, **NO_EOS)
    assert isinstance(out, DiffusionGenerateOutput)
    assert out.history.shape == (out.nfe, 1, 8)
    masked_per_step = (out.history == MASK_ID).sum(dim=(1, 2))
    assert masked_per_step.tolist() == sorted(masked_per_step.tolist(), reverse=True)
    assert masked_per_step[-1] == 0
    assert torch.equal(out.history[-1], out.sequences[:, 4:])


def test_eos_stops_a_row_and_pads_after_it():
    model = diffusion_model("llama")
    # Force an early EOS in row 1: declare as EOS the token that greedy decoding puts at row 1's third new position.
    reference = generate(model, prompts(2, 5, seed=3), max_new_tokens=12, steps=12, **NO_EOS)
    eos = int(reference[1, 5 + 2])
    out = generate(model, prompts(2, 5, seed=3), max_new_tokens=12, steps=12, eos_token_id=eos, pad_token_id=0)
    for row in range(2):
        new = out[row, 5:]
        hits = (new == eos).nonzero()
        if len(hits):
            first = int(hits[0])
            assert torch.equal(new[: first + 1], reference[row, 5 : 5 + first + 1])
            assert (new[first + 1 :] == 0).all()
    assert int((out[1, 5:] == eos).nonzero()[0]) <= 2


def test_all_rows_finished_ends_the_loop_early():
    model = diffusion_model("llama")
    base = generate(model, prompts(1, 5), max_new_tokens=16, steps=16, return_dict_in_generate=True, **NO_EOS)
    eos = int(base.sequences[0, 5])  # the first new token (committed in the first block)
    stopped = generate(
        model, prompts(1, 5), max_new_tokens=16, steps=16, eos_token_id=eos, return_dict_in_generate=True
    )
    assert stopped.nfe < base.nfe


# ----------------------------------------------------------------------------------------------------------------------
# Samplers and NFE
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_every_sampler_end_to_end(sampler):
    model = diffusion_model("llama")
    input_ids = prompts(2, 5)

    def run(seed):
        return generate(
            model,
            input_ids,
            max_new_tokens=8,
            steps=4,
            sampler=sampler,
            do_sample=True,
            temperature=0.8,
            top_k=20,
            generator=torch.Generator().manual_seed(seed),
            **NO_EOS,
        )

    first, again = run(0), run(0)
    assert torch.equal(first, again)
    assert not (first == MASK_ID).any()
    assert torch.equal(first[:, :5], input_ids)
    # greedy with the same sampler decodes a single row fully as well
    assert not (generate(model, input_ids[1:], max_new_tokens=8, steps=4, sampler=sampler, **NO_EOS) == MASK_ID).any()


def test_sampler_instance_is_accepted():
    class Leftmost:
        def confidence(self, probs, tokens, *, generator=None):
            return -torch.arange(tokens.shape[1], dtype=torch.float32).expand(tokens.shape)

    model = diffusion_model("llama", attention="bidirectional")
    out = generate(
        model,
        prompts(1, 4),
        max_new_tokens=6,
        steps=6,
        sampler=Leftmost(),
        output_history=True,
        return_dict_in_generate=True,
        **NO_EOS,
    )
    committed = (out.history != MASK_ID).sum(-1)[:, 0]
    assert committed.tolist() == [1, 2, 3, 4, 5, 6]
    # left to right: after step s exactly the first s+1 positions are committed
    assert (out.history[2, 0, :3] != MASK_ID).all() and (out.history[2, 0, 3:] == MASK_ID).all()


def test_nfe_equals_steps_without_threshold_and_drops_with_a_confident_model():
    model = diffusion_model("llama")
    kwargs = dict(max_new_tokens=16, steps=16, return_dict_in_generate=True, **NO_EOS)
    assert generate(model, prompts(1, 4), **kwargs).nfe == 16
    # Make the model confident: a huge bias on one token makes every position's probability ~1.
    head = model.get_output_embeddings()
    if head.bias is None:
        head.bias = torch.nn.Parameter(torch.zeros(head.weight.shape[0]))
    with torch.no_grad():
        head.bias[40] = 100.0
    fast = generate(model, prompts(1, 4), threshold=0.9, **kwargs)
    assert fast.nfe == 16 // BLOCK  # one step per block
    assert (fast.sequences[0, 4:] == 40).all()


# The NFE bound: no model forward beyond the plan's steps; the prefill and the fused commits of the KV cache are steps
# themselves, so the cache adds none. nfe <= plan.num_forwards = sum_k max_b num_steps[b, k], with equality without a
# threshold or an EOS; a row's steps sum to min(steps, its masked positions), so one prompt takes min(steps, N).
STEP_BUDGETS = [
    # (max_new_tokens, block_length, steps, prompt_length)
    (12, 4, 6, 5),  # block attention: partial first block (3 tokens) and a 1-token trailing block
    (10, 4, 6, 3),  # trailing partial block (LLaDA blocks: 4, 4, 2)
    (16, 8, 8, 5),
    (16, 8, 8, 1),
    (10, 8, 3, 7),  # three blocks of 1, 8, 1 tokens under block attention, in 3 steps
    (9, 4, 3, 4),
    (13, 4, 5, 6),
    (8, 4, 8, 2),
]


@pytest.mark.parametrize("attention", ["block", "bidirectional"])
@pytest.mark.parametrize(("max_new_tokens", "block_length", "steps", "prompt_length"), STEP_BUDGETS, ids=str)
def test_nfe_never_exceeds_steps(max_new_tokens, block_length, steps, prompt_length, attention):
    model = diffusion_model("llama", attention=attention)
    kwargs = dict(max_new_tokens=max_new_tokens, block_length=block_length, steps=steps, **NO_EOS)
    out = generate(model, prompts(1, prompt_length), return_dict_in_generate=True, **kwargs)
    assert out.nfe == min(steps, max_new_tokens)
    assert not (out.sequences == MASK_ID).any()
    if attention == "block":
        uncached = generate(model, prompts(1, prompt_length), return_dict_in_generate=True, use_cache=False, **kwargs)
        assert uncached.nfe == out.nfe and torch.equal(uncached.sequences, out.sequences)
    confident = generate(model, prompts(1, prompt_length), threshold=0.2, return_dict_in_generate=True, **kwargs)
    assert confident.nfe <= min(steps, max_new_tokens)


@pytest.mark.parametrize("attention", ["block", "bidirectional"])
def test_batch_nfe_is_the_plans_forwards(attention):
    """A batch runs each block for its longest-planned row: nfe == plan.num_forwards, which is <= steps where rows
    share the block layout (bidirectional) and may exceed it with ragged prompts under block attention."""
    model = diffusion_model("llama", attention=attention, block_size=8)
    input_ids, attention_mask = left_padded([row[:n] for row, n in zip(prompts(2, 5), (5, 1))])
    kwargs = dict(max_new_tokens=16, block_length=8, steps=8, return_dict_in_generate=True, **NO_EOS)
    out = generate(model, input_ids, attention_mask, **kwargs)
    plan = DecodingPlan.for_generate(
        attention_mask.sum(-1), max_new_tokens=16, block_length=8, steps=8, aligned=attention == "block"
    )
    assert out.nfe == plan.num_forwards
    assert (plan.num_steps.sum(-1) == 8).all()
    assert plan.num_forwards == (10 if attention == "block" else 8)  # block: rows split 16 tokens as 3+8+5 and 7+8+1


def test_steps_below_the_blocks_an_answer_spans_raise():
    """Under block attention a partial first block adds a block: 8 tokens after a 5-token prompt span 3 blocks of 4."""
    model = diffusion_model("llama")
    with pytest.raises(ValueError, match=r"`steps` must be at least the number of blocks an answer spans, 3 .*"):
        generate(model, prompts(1, 5), max_new_tokens=8, steps=2)
    assert generate(model, prompts(1, 5), max_new_tokens=8, steps=3, return_dict_in_generate=True).nfe <= 3


# ----------------------------------------------------------------------------------------------------------------------
# The decoding plan
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize(("max_new_tokens", "block_length", "steps", "prompt_length"), STEP_BUDGETS, ids=str)
def test_plan_splits_each_rows_tokens_and_steps(max_new_tokens, block_length, steps, prompt_length, aligned):
    lengths = torch.tensor([prompt_length, 1, prompt_length + 3])  # [B], ragged: different partial first blocks
    plan = DecodingPlan.for_generate(
        lengths, max_new_tokens=max_new_tokens, block_length=block_length, steps=steps, aligned=aligned
    )
    assert torch.equal(plan.num_tokens.sum(-1), plan.num_masked)  # each row commits exactly its masked positions
    assert (plan.num_masked.sum(-1) == max_new_tokens).all()
    assert (plan.num_steps.sum(-1) == min(steps, max_new_tokens)).all()  # never more than `steps`
    assert torch.equal((plan.num_tokens > 0).sum(-1), plan.num_steps)  # a planned step commits, later ones do not
    assert ((plan.num_steps >= 1) == (plan.num_masked >= 1)).all() and (plan.num_steps <= plan.num_masked).all()
    spread = plan.num_tokens.amax(-1) - torch.where(plan.num_tokens > 0, plan.num_tokens, 10**6).amin(-1)
    assert (spread[plan.num_masked > 0] <= 1).all()  # an even split inside a block
    assert plan.block_steps == tuple(plan.num_steps.amax(0).tolist())
    for block in plan.blocks:  # every generated position lies in its block's window
        lo, hi = plan.windows[block]
        is_in = plan.block_index == block
        assert not is_in[:, :lo].any() and not is_in[:, hi:].any()
        if aligned:
            assert lo % block_length == 0 and hi - lo <= block_length
    # a row's plan does not depend on the batch (the grid is absolute, so its blocks keep their ids)
    for row in range(3):
        alone = DecodingPlan.for_generate(
            lengths[row, None], max_new_tokens=max_new_tokens, block_length=block_length, steps=steps, aligned=aligned
        )
        width = alone.num_steps.shape[1]
        assert torch.equal(alone.num_steps[0], plan.num_steps[row, :width])
        assert torch.equal(alone.num_tokens[0], plan.num_tokens[row, :width, : alone.num_tokens.shape[2]])
        assert alone.num_forwards <= steps


def test_split_steps_rule():
    # full blocks, J divides steps: LLaDA's steps / J each
    assert split_steps(torch.tensor([[8, 8, 8, 8]]), 8).tolist() == [[2, 2, 2, 2]]
    # steps >= masked positions: one token per step
    assert split_steps(torch.tensor([[3, 8, 5], [1, 0, 2]]), 64).tolist() == [[3, 8, 5], [1, 0, 2]]
    assert split_steps(torch.tensor([[3, 8, 5]]), None).tolist() == [[3, 8, 5]]
    # one step per block, the rest in proportion to the masked positions beyond the first, summing to the budget
    assert split_steps(torch.tensor([[3, 8, 5], [7, 8, 1], [1, 8, 1]]), 8).tolist() == [
        [1, 4, 3],
        [3, 4, 1],
        [1, 6, 1],
    ]
    generator = torch.Generator().manual_seed(0)
    num_masked = torch.randint(0, 9, (64, 5), generator=generator)  # [B, K]
    num_masked[:, 0] += 1
    for steps in range(5, 40):
        num_steps = split_steps(num_masked, steps)
        assert torch.equal(num_steps.sum(-1), num_masked.sum(-1).clamp(max=steps))
        assert ((num_steps >= 1) == (num_masked >= 1)).all() and (num_steps <= num_masked).all()


def test_infill_steps_below_a_rows_blocks_raise():
    is_generated = torch.zeros(1, 12, dtype=torch.bool)
    is_generated[0, [2, 3, 9]] = True  # gaps in attention blocks 0 and 2
    is_real = torch.ones_like(is_generated)
    with pytest.raises(ValueError, match=r"blocks holding masked positions \(2\), got steps=1; use steps >= 2\.$"):
        DecodingPlan.for_infill(is_generated, is_real, block_length=None, grid=4, steps=1)
    with pytest.raises(ValueError, match=r"\(3\), got steps=2; use steps >= 3 or a larger block_length\.$"):
        DecodingPlan.for_infill(is_generated, is_real, block_length=1, grid=None, steps=2)
    model = diffusion_model("llama", attention="bidirectional")
    with pytest.raises(ValueError, match=r"`steps` must be at least the number of blocks holding masked positions"):
        infill(model, torch.tensor([[5, MASK_ID, 6, MASK_ID]]), block_length=1, steps=1)


def test_infill_plan_is_per_row():
    """Default steps: one per gap of the row itself; a row's blocks and steps do not depend on the other rows."""
    is_generated = torch.zeros(2, 12, dtype=torch.bool)
    is_generated[0, [2, 3, 9]] = True
    is_generated[1, [1, 2, 3, 5, 6, 7, 8, 10]] = True
    is_real = torch.ones_like(is_generated)
    plan = DecodingPlan.for_infill(is_generated, is_real, block_length=None, grid=4, steps=None)
    assert plan.num_masked.tolist() == [[2, 0, 1], [3, 3, 2]]
    assert plan.num_steps.tolist() == [[2, 0, 1], [3, 3, 2]]
    assert torch.equal(plan.num_tokens.sum(-1), plan.num_masked)
    plan = DecodingPlan.for_infill(is_generated, is_real, block_length=None, grid=4, steps=3)
    assert plan.num_steps.tolist() == [[2, 0, 1], [1, 1, 1]]
    alone = DecodingPlan.for_infill(is_generated[:1], is_real[:1], block_length=None, grid=4, steps=3)
    assert torch.equal(alone.num_steps, plan.num_steps[:1])
    plan = DecodingPlan.for_infill(is_generated, is_real, block_length=3, grid=None, steps=None)
    assert plan.num_masked[:, :3].tolist() == [[3, 0, 0], [3, 3, 2]]
    assert torch.equal(plan.num_tokens.sum(-1), plan.num_masked)


# ----------------------------------------------------------------------------------------------------------------------
# Infill
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attention", ["bidirectional", "annealed"])
def test_infill_keeps_the_fixed_text(attention):
    model = diffusion_model("llama", attention=attention)
    prefix, suffix = prompts(2, 4), prompts(2, 3, seed=5)
    input_ids = torch.cat([prefix, torch.full((2, 5), MASK_ID), suffix], dim=1)
    out = model.infill(input_ids, steps=5, return_dict_in_generate=True)
    assert torch.equal(out.sequences[:, :4], prefix)
    assert torch.equal(out.sequences[:, 9:], suffix)
    assert not (out.sequences == MASK_ID).any()
    assert out.nfe == 5
    # the suffix matters: a different suffix changes the fill of a bidirectional model
    other = torch.cat([prefix, torch.full((2, 5), MASK_ID), prompts(2, 3, seed=6)], dim=1)
    assert not torch.equal(infill(model, other, steps=5)[:, 4:9], out.sequences[:, 4:9])


# ----------------------------------------------------------------------------------------------------------------------
# Streaming
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{index}": index for index in range(MASK_ID)}
    vocab["<mask>"] = MASK_ID
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w3"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, mask_token="<mask>")


class Recorder(TextStreamer):
    def __init__(self, tokenizer):
        super().__init__(tokenizer, skip_prompt=True)
        self.texts, self.drafts, self.ended = [], [], False

    def on_finalized_text(self, text, stream_end=False):
        self.texts.append(text)
        self.ended |= stream_end

    def put_draft(self, value):
        self.drafts.append(value.clone())


def test_streamer_gets_committed_text_in_order(word_tokenizer):
    model = diffusion_model("llama")
    streamer = Recorder(word_tokenizer)
    out = generate(
        model, prompts(1, 5), max_new_tokens=12, steps=6, streamer=streamer, return_dict_in_generate=True, **NO_EOS
    )
    assert streamer.ended
    assert "".join(streamer.texts) == word_tokenizer.decode(out.sequences[0, 5:])
    assert len(streamer.drafts) == out.nfe
    assert (streamer.drafts[0] == MASK_ID).any() and not (streamer.drafts[-1] == MASK_ID).any()


def test_text_iterator_streamer(word_tokenizer):
    model = diffusion_model("llama")
    streamer = TextIteratorStreamer(word_tokenizer, skip_prompt=True)
    out = generate(model, prompts(1, 5), max_new_tokens=8, steps=8, streamer=streamer, **NO_EOS)
    assert "".join(streamer) == word_tokenizer.decode(out[0, 5:])


def test_stories260k_end_to_end(stories_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(stories_path)
    base = AutoModelForCausalLM.from_pretrained(stories_path)
    model = get_diffusion_model(base, DiffusionConfig(attention="block", block_size=8), tokenizer=tokenizer).eval()
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batch = tokenizer(["Once upon a time", "Lily"], return_tensors="pt", padding=True)
    kwargs = dict(max_new_tokens=16, steps=8, threshold=0.9)
    cached = model.generate(**batch, use_cache=True, **kwargs)
    assert torch.equal(cached, model.generate(**batch, use_cache=False, **kwargs))
    assert tokenizer.batch_decode(cached, skip_special_tokens=True)[0].startswith("Once upon a time")


# ----------------------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(max_new_tokens=8, steps=1), r"`steps` must be at least the number of blocks .* = 2"),
        (dict(max_new_tokens=8, block_length=6), r"`block_length` must be a multiple of the model's block_size"),
        (dict(max_new_tokens=200), r"exceeds the model's context window of 128 positions"),
        (dict(max_new_tokens=8, threshold=1.5), r"`threshold` must be in \(0, 1\]"),
        (dict(max_new_tokens=8, threshold=0.0), r"`threshold` must be in \(0, 1\]"),
        (dict(max_new_tokens=8, sampler="nope"), r"`sampler` must be one of"),
        (dict(max_new_tokens=8, gen_length=8), r"Unknown arguments to `generate`: \['gen_length'\]"),
        (dict(), r"`max_new_tokens` is required"),
        (dict(max_new_tokens=8, steps=0), r"`steps` must be a positive integer"),
    ],
)
def test_bad_generate_arguments(kwargs, match):
    model = diffusion_model("llama")
    with pytest.raises(ValueError, match=match):
        generate(model, prompts(1, 4), **kwargs)


@pytest.mark.parametrize("shift", [True, False])
def test_infill_under_block_attention_reads_only_the_gap_block(shift):
    model = diffusion_model("llama", attention="block", shift=shift, block_size=4)
    text = prompts(2, 12)
    input_ids = text.clone()
    input_ids[:, [2, 3, 9]] = MASK_ID  # gaps in block 0 (columns 2-3) and block 2 (column 9)
    out = model.infill(input_ids, return_dict_in_generate=True)
    is_fixed = input_ids != MASK_ID
    assert torch.equal(out.sequences[is_fixed], input_ids[is_fixed])
    assert not (out.sequences == MASK_ID).any()
    assert out.nfe == 3  # one token per step by default, block by block
    # Blocks are filled left to right: block 0's gap first, block 2's last.
    out = model.infill(input_ids, return_dict_in_generate=True, output_history=True)
    is_open = out.history == MASK_ID  # [steps, B, T]
    assert is_open[:2, :, 9].all() and not is_open[1, :, 2:4].any() and not is_open[2].any()
    # Block 0's gap cannot read blocks 1-2: new text there leaves its fill as it was.
    later = input_ids.clone()
    later[:, 4:9], later[:, 10:] = prompts(2, 5, seed=7), prompts(2, 2, seed=8)
    assert torch.equal(infill(model, later)[:, 2:4], out.sequences[:, 2:4])
    # Left padding: the block grid starts at each row's first real token.
    padded = torch.cat([torch.zeros(2, 3, dtype=torch.long), input_ids], dim=1)
    attention_mask = torch.cat([torch.zeros(2, 3, dtype=torch.long), torch.ones_like(input_ids)], dim=1)
    assert torch.equal(infill(model, padded, attention_mask)[:, 3:], out.sequences)


def test_bad_inputs():
    model = diffusion_model("llama")
    with pytest.raises(ValueError, match="needs left padding"):
        generate(model, prompts(1, 4), torch.tensor([[1, 1, 1, 0]]), max_new_tokens=4)
    with pytest.raises(ValueError, match="`streamer` supports batch size 1"):
        generate(model, prompts(2, 4), max_new_tokens=4, streamer=object())
    bidirectional = diffusion_model("llama", attention="bidirectional")
    with pytest.raises(ValueError, match="holds no mask token"):
        infill(bidirectional, torch.tensor([[5, 6]]))
    with pytest.raises(ValueError, match=r"`threshold` must be in \(0, 1\]"):
        DiffusionGenerationConfig(threshold=2.0)


def test_generation_config_round_trip(tmp_path):
    config = DiffusionGenerationConfig(max_new_tokens=32, steps=16, block_length=8, sampler="margin", threshold=0.8)
    config.save_pretrained(tmp_path)
    loaded = DiffusionGenerationConfig.from_pretrained(tmp_path)
    assert (loaded.steps, loaded.block_length, loaded.sampler, loaded.threshold) == (16, 8, "margin", 0.8)
    # a model carrying it in `generation_config` decodes with it (8 steps over 32 tokens would fail otherwise)
    model = diffusion_model("llama")
    model.generation_config = loaded
    out = model.generate(prompts(1, 4), return_dict_in_generate=True, **NO_EOS)
    assert out.sequences.shape == (1, 36) and out.nfe <= 16
