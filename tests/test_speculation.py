"""Self-speculative decoding: the base's own output (greedy token for token, sampling in distribution), exact caches,
ragged batches, EOS inside a draft, streaming, counts, and bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import MASK_ID, tiny_causal_lm
from peft import LoraConfig
from test_architectures import INSTALLED_VERIFIED
from transformers import DynamicCache, GenerationConfig
from transformers.generation.streamers import BaseStreamer

from peft_diffusion import DiffusionConfig, SpeculativeGenerateOutput, _compat, get_diffusion_model
from peft_diffusion import speculation as speculation_module
from peft_diffusion.speculation import _UNSUPPORTED_FIELDS, _Speculator

# Four left-padded prompts of different lengths (row 1 unpadded).
PROMPTS = torch.tensor([[0, 0, 1, 5, 6], [1, 9, 8, 7, 6], [0, 0, 0, 3, 4], [0, 1, 2, 3, 4]])
PROMPT_MASK = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 1, 1], [0, 1, 1, 1, 1]])
CORE_ARCHITECTURES = ("llama", "qwen2", "gpt2", "gemma")


def convert(base, block_size=2, init_lora_weights=False, seed=0):
    """A LoRA diffusion model on `base`; with `init_lora_weights=False` the adapter is random (drafter != base)."""
    torch.manual_seed(seed)
    config = DiffusionConfig(attention="block", block_size=block_size, mask_token_id=MASK_ID)
    lora = LoraConfig(r=4, target_modules="all-linear", init_lora_weights=init_lora_weights)
    return get_diffusion_model(base, config, peft_config=lora).eval()


def base_and_model(arch="llama", **kwargs):
    """(an untouched copy of the base, the converted model): PEFT injects its layers into the base it is given."""
    base = tiny_causal_lm(arch)
    reference = copy.deepcopy(base)
    return reference, convert(base, **kwargs)


def inputs(batch):
    return dict(input_ids=PROMPTS[:batch], attention_mask=PROMPT_MASK[:batch])


# ----------------------------------------------------------------------------------------------------------------------
# Greedy: the base's HF generate, token for token
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("block_length", [2, 4, 8])
@pytest.mark.parametrize("arch", CORE_ARCHITECTURES)
def test_greedy_equals_base_generate(arch, block_length, batch):
    reference, model = base_and_model(arch)
    expected = reference.generate(**inputs(batch), max_new_tokens=12, do_sample=False)
    out = model.generate(
        **inputs(batch), max_new_tokens=12, speculative=True, block_length=block_length, return_dict_in_generate=True
    )
    assert torch.equal(out.sequences, expected)
    assert out.base_forwards == len(out.accepted) <= 12
    assert bool(((out.accepted >= 0) & (out.accepted < block_length)).any())  # the random adapter drafts wrong tokens


# Verified architectures the test cannot run speculation on, with the reason (not a limit of the speculation).
SPECULATION_TEST_SKIPS = {
    "hrm_text": "HF generate itself fails on the tiny config (its cache has fewer layers than the model calls)",
}


@pytest.mark.parametrize("arch", INSTALLED_VERIFIED)
def test_every_verified_architecture_is_exact_or_refused(arch):
    """On every verified architecture, the chain and the tree give the base's HF greedy text (batch 4, left padding),
    or a clear refusal: a base that attends both ways (then built again as a decoder, and exact), generation-config
    processors (then passed neutral, to both), a base whose positions do not follow `position_ids` (tree only)."""
    if arch in SPECULATION_TEST_SKIPS:
        pytest.skip(SPECULATION_TEST_SKIPS[arch])
    base = tiny_causal_lm(arch)
    model = convert(copy.deepcopy(base))
    neutral = {
        name: value
        for name, value in _UNSUPPORTED_FIELDS.items()
        if getattr(base.generation_config, name, None) not in (None, value)
    }
    try:
        model.generate(**inputs(1), max_new_tokens=2, speculative=True, **neutral)
    except ValueError as error:
        if "needs a causal base model" not in str(error):
            raise
        base = tiny_causal_lm(arch, is_decoder=True)
        model = convert(copy.deepcopy(base))
    if neutral:
        with pytest.raises(ValueError, match=f"generation config sets `{next(iter(neutral))}`"):
            model.generate(**inputs(4), max_new_tokens=4, speculative=True)
    expected = base.generate(**inputs(4), max_new_tokens=10, do_sample=False, **neutral)
    chain = model.generate(**inputs(4), max_new_tokens=10, speculative=True, block_length=4, **neutral)
    assert torch.equal(chain, expected)
    try:
        tree = model.generate(
            **inputs(4), max_new_tokens=10, speculative=True, block_length=4, tree_size=10, **neutral
        )
    except ValueError as error:
        assert "`tree_size` needs a base model that takes positions from `position_ids`" in str(error)
    else:
        assert torch.equal(tree, expected)


def test_refusals_of_the_base_are_probed():
    """The probes themselves: a BERT decoder built without `is_decoder` attends both ways (refused for speculation),
    and as a decoder it passes; BART's decoder numbers positions by order (trees refused), llama's does not."""
    bert = convert(tiny_causal_lm("bert"))
    with pytest.raises(ValueError, match="needs a causal base model.*is_decoder=True"):
        bert.generate(**inputs(1), max_new_tokens=2, speculative=True)
    bert = convert(tiny_causal_lm("bert", is_decoder=True))
    bert.generate(**inputs(1), max_new_tokens=2, speculative=True, tree_size=4)
    bart = convert(tiny_causal_lm("bart"))
    with pytest.raises(ValueError, match="`tree_size` needs a base model that takes positions"):
        bart.generate(**inputs(1), max_new_tokens=2, speculative=True, forced_eos_token_id=None, tree_size=4)
    convert(tiny_causal_lm("llama")).generate(**inputs(1), max_new_tokens=2, speculative=True, tree_size=4)


@pytest.mark.parametrize("tree_size", [None, 12])
@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
@pytest.mark.parametrize("backend", ["sdpa"])
def test_greedy_equals_base_generate_sdpa(backend, arch, tree_size):
    """The chain and the tree (whose pattern reaches sdpa as a dense mask) under sdpa, batch 4 with left padding."""
    base = tiny_causal_lm(arch, backend)
    reference = copy.deepcopy(base)
    model = convert(base)
    expected = reference.generate(**inputs(4), max_new_tokens=12, do_sample=False)
    out = model.generate(**inputs(4), max_new_tokens=12, speculative=True, block_length=4, tree_size=tree_size)
    assert torch.equal(out, expected)


@pytest.mark.parametrize(
    "settings",
    [
        dict(steps=2, block_length=4),
        dict(steps=4, block_length=4, sampler="margin"),
        dict(steps=4, block_length=4, threshold=0.5),
    ],
    ids=["steps2", "margin", "threshold"],
)
def test_greedy_multi_step_drafts(settings):
    reference, model = base_and_model("llama", init_lora_weights=True)
    expected = reference.generate(**inputs(4), max_new_tokens=16, do_sample=False)
    out = model.generate(**inputs(4), max_new_tokens=16, speculative=True, return_dict_in_generate=True, **settings)
    assert torch.equal(out.sequences, expected)
    assert out.base_forwards < out.drafter_forwards <= out.base_forwards * settings["steps"]


def test_an_untrained_adapter_already_drafts_accepted_tokens():
    """A zero-initialised adapter is the base under block attention: its first draft token is often right."""
    reference, model = base_and_model("llama", init_lora_weights=True)
    expected = reference.generate(**inputs(4), max_new_tokens=24, do_sample=False)
    out = model.generate(
        **inputs(4), max_new_tokens=24, speculative=True, block_length=4, return_dict_in_generate=True
    )
    assert torch.equal(out.sequences, expected)
    assert int(out.accepted.clamp(min=0).sum()) > 0
    assert out.base_forwards < 24


def test_stored_plain_decoding_steps_are_not_draft_steps():
    """The model's generation config may hold plain decoding's per-answer `steps`; a draft takes the call's."""
    reference, model = base_and_model("llama")
    model.generation_config.steps = 64
    expected = reference.generate(**inputs(1), max_new_tokens=8, do_sample=False)
    out = model.generate(**inputs(1), max_new_tokens=8, speculative=True, block_length=4, return_dict_in_generate=True)
    assert torch.equal(out.sequences, expected) and out.drafter_forwards == out.base_forwards
    out = model.generate(
        **inputs(1), max_new_tokens=8, speculative=True, block_length=4, steps=2, return_dict_in_generate=True
    )
    assert torch.equal(out.sequences, expected) and out.drafter_forwards > out.base_forwards


def test_the_adapter_is_on_again_after_a_call():
    reference, model = base_and_model("llama")
    probe = torch.tensor([[1, 5, 6, MASK_ID, MASK_ID]])
    before = model(probe).logits
    model.generate(**inputs(4), max_new_tokens=6, speculative=True, block_length=4)
    assert torch.equal(model(probe).logits, before)
    assert model.model.get_model_status().enabled is True
    assert not torch.allclose(model.causal_lm(probe).logits, reference(probe).logits)


def test_full_finetune_with_verifier():
    base = tiny_causal_lm("qwen2")
    original = copy.deepcopy(base)
    model = get_diffusion_model(base, DiffusionConfig(attention="block", block_size=2, mask_token_id=MASK_ID)).eval()
    with torch.no_grad():  # "finetuned": the full model's weights moved away from the original
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    expected = original.generate(**inputs(4), max_new_tokens=12, do_sample=False)
    out = model.generate(**inputs(4), max_new_tokens=12, speculative=True, verifier=original, block_length=4)
    assert torch.equal(out, expected)
    assert not torch.equal(base.generate(**inputs(4), max_new_tokens=12, do_sample=False), expected)


def test_stories260k(stories_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(stories_path, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    original = AutoModelForCausalLM.from_pretrained(stories_path).eval()
    base = AutoModelForCausalLM.from_pretrained(stories_path)
    config = DiffusionConfig(attention="block", block_size=4)
    model = get_diffusion_model(
        base, config, tokenizer=tokenizer, peft_config=LoraConfig(r=8, target_modules="all-linear")
    ).eval()
    assert model.config.mask_token_id == 512  # a row added for the conversion: the original base has 512 tokens
    batch = tokenizer(
        ["Once upon a time", "Lily and her dog went to the park", "The sun", "Tom"], return_tensors="pt", padding=True
    )
    for rows in (1, 4):
        prompt = {key: value[:rows] for key, value in batch.items()}
        expected = original.generate(**prompt, max_new_tokens=24, do_sample=False)
        for block_length in (4, 8):
            out = model.generate(**prompt, max_new_tokens=24, speculative=True, block_length=block_length)
            assert torch.equal(out, expected), (rows, block_length)
    assert tokenizer.decode(expected[0], skip_special_tokens=True).startswith("Once upon a time")


def test_an_added_mask_row_is_never_produced(stories_path):
    """The mask token added for the conversion is not in the original base's vocabulary: the verifier never scores
    it, even when the resized base would prefer it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(stories_path)
    original = AutoModelForCausalLM.from_pretrained(stories_path).eval()
    config = DiffusionConfig(attention="block", block_size=4)
    model = get_diffusion_model(
        AutoModelForCausalLM.from_pretrained(stories_path),
        config,
        tokenizer=tokenizer,
        peft_config=LoraConfig(r=8, target_modules="all-linear"),
    ).eval()
    prompt = tokenizer(["Once upon a time"], return_tensors="pt")
    expected = original.generate(**prompt, max_new_tokens=8, do_sample=False)
    with torch.no_grad(), model.model.disable_adapter():  # make the resized base prefer the mask token
        head = model.causal_lm.get_output_embeddings()
        head.weight[512] = 3 * head.weight[int(expected[0, -8])]
        resized = model.causal_lm.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert resized[0, -8] == 512
    assert torch.equal(model.generate(**prompt, max_new_tokens=8, speculative=True), expected)


# ----------------------------------------------------------------------------------------------------------------------
# An oracle drafter: ragged acceptance, EOS inside a draft, exact caches
# ----------------------------------------------------------------------------------------------------------------------


class Oracle:
    """Replaces the drafter's tokens (after its real forwards, so the drafter cache still runs) by the base's own
    continuation, wrong at random slots: every acceptance length occurs, and rows advance at different speeds."""

    def __init__(self, continuation, error_rate, seed=0):
        self.continuation = continuation  # [B, P + N + W]: the base's greedy text, EOS ignored
        self.error_rate = error_rate
        self.generator = torch.Generator().manual_seed(seed)
        self.expected_accepted = []
        self.draft = _Speculator.draft

    def __call__(self, speculator, ends, slots, lowest, end):
        drafts, q = self.draft(speculator, ends, slots, lowest, end)
        width = drafts.shape[1]
        columns = (ends[:, None] + torch.arange(width)).clamp(max=self.continuation.shape[1] - 1)  # [B, W]
        truth = self.continuation.gather(1, columns)  # [B, W]
        is_wrong = torch.rand(truth.shape, generator=self.generator) < self.error_rate  # [B, W]
        drafts = torch.where(is_wrong, (truth + 1) % MASK_ID, truth)
        is_slot = torch.arange(width) < slots[:, None]
        self.expected_accepted.append((~is_wrong & is_slot).long().cumprod(-1).sum(-1))
        return drafts, q


def check_caches(speculator):
    """Both caches equal a fresh prefill of the committed text, on the columns they keep (unfinished rows)."""
    ends = speculator.prompt_width + speculator.generated  # [B]
    width = int(ends.max())
    columns = torch.arange(width)
    attention_mask = (speculator.is_real[:, :width] & (columns < ends[:, None])).long()  # [B, width]
    tokens = speculator.tokens[:, :width]
    open_rows = ~speculator.finished
    with torch.no_grad():
        with speculator.verifier_context():
            position_ids = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
            fresh_base = _compat.output_cache(
                speculator.verifier(
                    input_ids=tokens,
                    attention_mask=attention_mask,
                    position_ids=position_ids,
                    use_cache=True,
                    **{_compat.CACHE_KWARG: DynamicCache()},  # `cache` from transformers 5.24
                )
            )
        fresh_draft = speculator.model(
            input_ids=tokens, attention_mask=attention_mask, cache=DynamicCache(), use_cache=True
        ).cache
    for cache, fresh, length in (
        (speculator.base_cache, fresh_base, speculator.base_length),
        (speculator.draft_cache, fresh_draft, speculator.draft_length),
    ):
        assert cache.get_seq_length() == length
        is_compared = open_rows[:, None] & attention_mask[:, :length].bool()  # [B, length]
        if not bool(is_compared.any()):
            continue
        for layer, fresh_layer in zip(cache.layers, fresh.layers):
            for kept, expected in ((layer.keys, fresh_layer.keys), (layer.values, fresh_layer.values)):
                difference = (kept[:, :, :length] - expected[:, :, :length]).abs().amax(dim=(1, 3))  # [B, length]
                assert float(difference[is_compared].max()) < 1e-5


def oracle_texts(reference, arch, batch, max_new_tokens, block_length):
    """`(continuation, eos, expected)` for an oracle drafter: the base's greedy continuation without EOS (a draft of
    `block_length` past the end included), an EOS id, and the base's HF greedy output with it. EOS: the 13th token
    row 0 writes (llama, qwen2: it falls inside a draft, and other rows run on); gpt2's tiny copy repeats one token per
    row, so there the EOS is a token it never writes (every row runs to the end)."""
    continuation = reference.generate(
        **inputs(batch), max_new_tokens=max_new_tokens + block_length, do_sample=False, eos_token_id=None
    )
    new_tokens = continuation[:, PROMPTS.shape[1] :]
    unused = torch.isin(torch.arange(MASK_ID), new_tokens).logical_not().nonzero()
    eos = int(new_tokens[0, 12]) if arch != "gpt2" else int(unused[-1])
    expected = reference.generate(**inputs(batch), max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos)
    return continuation, eos, expected


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_oracle_drafts_eos_ragged_acceptance_and_exact_caches(arch, batch, monkeypatch):
    # Attention blocks of 4: the drafter cache must leave out each row's partial last block.
    reference, model = base_and_model(arch, block_size=4, init_lora_weights=True)
    block_length, max_new_tokens = 8, 20
    continuation, eos, expected = oracle_texts(reference, arch, batch, max_new_tokens, block_length)
    oracle = Oracle(continuation, error_rate=0.25)
    monkeypatch.setattr(_Speculator, "draft", lambda speculator, *args: oracle(speculator, *args))
    rounds = []
    crop_base = _Speculator.crop_base

    def crop_and_check(speculator):
        crop_base(speculator)
        if not bool(speculator.finished.all()):
            check_caches(speculator)
            rounds.append((speculator.base_length, speculator.draft_length))

    monkeypatch.setattr(_Speculator, "crop_base", crop_and_check)
    out = model.generate(
        **inputs(batch),
        max_new_tokens=max_new_tokens,
        speculative=True,
        block_length=block_length,
        eos_token_id=eos,
        return_dict_in_generate=True,
    )
    assert torch.equal(out.sequences, expected)
    assert bool((expected[:, PROMPTS.shape[1] :] == eos).any()) == (arch != "gpt2")
    # Acceptance per row: the oracle's leading correct slots, cut at EOS / max_new_tokens; -1 once finished.
    for accepted, predicted in zip(out.accepted, oracle.expected_accepted):
        open_rows = accepted >= 0
        assert bool((accepted[open_rows] <= predicted[open_rows]).all())
    assert int(out.accepted.max()) >= 3  # long accepted prefixes happened
    assert bool(((out.accepted >= 0) & (out.accepted < block_length)).any())  # so did rejections
    # One drafter forward and one base forward per round, and both caches moved forward through the call.
    assert out.drafter_forwards == out.base_forwards == len(out.accepted)
    assert len(rounds) >= 2 and rounds[-1][0] > rounds[0][0] and rounds[-1][1] > rounds[0][1]


def test_eos_inside_an_accepted_draft_stops_the_row(monkeypatch):
    reference, model = base_and_model("llama")
    continuation = reference.generate(**inputs(4), max_new_tokens=16, do_sample=False, eos_token_id=None)
    eos = int(continuation[1, PROMPTS.shape[1] + 3])  # row 1 writes it as its 4th token
    expected = reference.generate(**inputs(4), max_new_tokens=8, do_sample=False, eos_token_id=eos)
    oracle = Oracle(continuation, error_rate=0.0)
    monkeypatch.setattr(_Speculator, "draft", lambda speculator, *args: oracle(speculator, *args))
    out = model.generate(
        **inputs(4), max_new_tokens=8, speculative=True, block_length=8, eos_token_id=eos, return_dict_in_generate=True
    )
    assert torch.equal(out.sequences, expected)
    first_eos = int((out.sequences[1, PROMPTS.shape[1] :] == eos).nonzero()[0])
    assert first_eos < 7 and out.accepted[0, 1] == first_eos + 1  # the EOS itself was a draft token
    assert bool((out.sequences[1, PROMPTS.shape[1] + first_eos + 1 :] == 0).all())  # padded after it
    assert out.base_forwards == 1  # a perfect drafter: one verification for all rows


class Recorder(BaseStreamer):
    def __init__(self):
        self.chunks, self.ended = [], False

    def put(self, value):
        self.chunks.append(value.reshape(-1).clone())

    def end(self):
        self.ended = True


def test_streamer_receives_what_hf_generate_streams(monkeypatch):
    reference, model = base_and_model("llama", init_lora_weights=True)
    hf, ours = Recorder(), Recorder()
    expected = reference.generate(**inputs(1), max_new_tokens=12, do_sample=False, streamer=hf)
    out = model.generate(
        **inputs(1), max_new_tokens=12, speculative=True, block_length=4, streamer=ours, return_dict_in_generate=True
    )
    assert torch.equal(out.sequences, expected) and ours.ended
    assert torch.equal(torch.cat(ours.chunks), torch.cat(hf.chunks))
    assert len(ours.chunks) == 1 + out.base_forwards < len(hf.chunks)


# ----------------------------------------------------------------------------------------------------------------------
# Sampling: the base's distribution
# ----------------------------------------------------------------------------------------------------------------------

SMALL_VOCAB = 8
DRAWS = 30_000


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's goodness of fit (cells expecting fewer than 5 pooled); the upper tail of chi2 with k - 1 dof."""
    counts, probs = counts.double().reshape(-1), probs.double().reshape(-1)
    expected = probs * counts.sum()
    is_big = expected >= 5
    observed = torch.cat([counts[is_big], counts[~is_big].sum()[None]])
    expected = torch.cat([expected[is_big], expected[~is_big].sum()[None]])
    keep = expected > 0
    statistic = ((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum()
    dof = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), statistic / 2))


def exact_first_two(reference, prompt, **sampling):
    """The base's exact distribution of its first two sampled tokens, by enumeration: p(a) p(b | a), `[V, V]`, with
    the distributions HF's `generate` samples from (its own processed scores)."""
    kwargs = dict(max_new_tokens=1, do_sample=True, output_scores=True, return_dict_in_generate=True, **sampling)
    first = reference.generate(prompt, **kwargs).scores[0].softmax(-1)[0]  # [V]
    extended = torch.cat([prompt.expand(SMALL_VOCAB, -1), torch.arange(SMALL_VOCAB)[:, None]], dim=1)  # [V, P + 1]
    second = reference.generate(extended, **kwargs).scores[0].softmax(-1)  # [V, V]
    return first[:, None] * second


@pytest.mark.parametrize(
    "block_size, block_length, steps", [(1, 1, 1), (2, 2, 1), (2, 2, 2)], ids=["bonus", "one-shot", "left-to-right"]
)
def test_sampling_matches_the_base_distribution(block_size, block_length, steps):
    """30,000 draws of the first two tokens against the exact joint distribution (vocabulary 8, top-k 6). A shift of
    total variation d moves Pearson's statistic by at least 4 n d^2 = 48 for d = 2%: at the 1e-3 level the
    first-token test (<= 5 dof) then rejects with probability > 0.99, the pair test (<= 35 dof) > 0.8."""
    tiny = dict(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1
    )
    base = tiny_causal_lm("llama", vocab_size=SMALL_VOCAB, eos_token_id=None, bos_token_id=1, pad_token_id=0, **tiny)
    with torch.no_grad():
        base.lm_head.weight.mul_(8.0)  # peaked distributions, so that p and the drafter's q differ clearly
    reference = copy.deepcopy(base)
    torch.manual_seed(0)
    mask_id = SMALL_VOCAB - 1
    config = DiffusionConfig(attention="block", block_size=block_size, mask_token_id=mask_id)
    lora = LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    model = get_diffusion_model(base, config, peft_config=lora).eval()
    sampling = dict(temperature=0.9, top_k=6)
    prompt = torch.tensor([[1, 5, 6]])
    exact = exact_first_two(reference, prompt, **sampling)  # [V, V]
    out = model.generate(
        prompt.expand(DRAWS, -1),
        max_new_tokens=2,
        speculative=True,
        block_length=block_length,
        steps=steps,
        do_sample=True,
        generator=torch.Generator().manual_seed(1),
        return_dict_in_generate=True,
        **sampling,
    )
    first, second = out.sequences[:, 3], out.sequences[:, 4]
    pairs = torch.bincount(first * SMALL_VOCAB + second, minlength=SMALL_VOCAB**2).view(SMALL_VOCAB, SMALL_VOCAB)
    assert chi_square_p_value(pairs.sum(1), exact.sum(1)) > 1e-3
    assert chi_square_p_value(pairs, exact) > 1e-3
    assert 0.2 < float((out.accepted[0] > 0).float().mean()) < 0.8  # acceptance and rejection both exercised
    # The test has teeth: the drafter's own first-token distribution q is rejected at this sample size.
    with torch.no_grad():
        logits = model(torch.cat([prompt, torch.full((1, block_length), mask_id)], dim=1)).logits[:, 3]  # [1, V]
    q = speculation_module._warpers(GenerationConfig(**sampling), GenerationConfig())(None, logits).softmax(-1)[0]
    q_draws = torch.multinomial(q, DRAWS, replacement=True, generator=torch.Generator().manual_seed(2))
    assert chi_square_p_value(torch.bincount(q_draws, minlength=SMALL_VOCAB), exact.sum(1)) < 1e-3


def test_sampling_defaults_follow_hf_generate():
    """Unset top_k takes transformers' default (50), as `generate` does."""
    defaults = _compat.generation_defaults()
    assert defaults == {"temperature": 1.0, "top_k": 50, "top_p": 1.0}
    warpers = speculation_module._warpers(GenerationConfig(do_sample=True), GenerationConfig())
    assert [type(warper).__name__ for warper in warpers] == ["TopKLogitsWarper"] and warpers[0].top_k == 50


# ----------------------------------------------------------------------------------------------------------------------
# Output and bad input
# ----------------------------------------------------------------------------------------------------------------------


def test_output_fields():
    reference, model = base_and_model("llama", init_lora_weights=True)
    out = model.generate(
        **inputs(4), max_new_tokens=10, speculative=True, block_length=4, return_dict_in_generate=True
    )
    assert isinstance(out, SpeculativeGenerateOutput)
    assert out.nfe == out.base_forwards + out.drafter_forwards
    assert out.accepted.shape == (out.base_forwards, 4) and out.accepted.dtype == torch.long
    # Every row gets accepted + 1 tokens per verification until it is full.
    assert bool(((out.accepted.clamp(min=0) + 1) * (out.accepted >= 0)).sum(0).ge(10).all())


def test_refused_generation_fields_exist():
    """Every field refused for changing the distribution is a real `GenerationConfig` field, neutral by default."""
    config = GenerationConfig()
    for name, neutral in speculation_module._UNSUPPORTED_FIELDS.items():
        assert hasattr(config, name), name
        assert getattr(config, name) in (None, neutral), name


@pytest.fixture(scope="module")
def lora_model():
    return convert(tiny_causal_lm("llama"))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(block_length=3), "multiple of the model's block_size"),
        (dict(block_length=2, steps=3), "block_length=2"),
        (dict(output_history=True), "output_history"),
        (dict(do_sample=True, threshold=0.9), "threshold"),
        (dict(repetition_penalty=1.3), "repetition_penalty"),
        (dict(max_new_tokens=None), "max_new_tokens"),
        (dict(max_new_tokens=200), "context window"),
        (dict(verifier=torch.nn.Linear(2, 2)), "must be a transformers causal LM"),
        (dict(verifier=tiny_causal_lm("llama", vocab_size=64)), "share the drafter's vocabulary"),
        (dict(steps_typo=2), "Unknown arguments"),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_bad_input(lora_model, kwargs, match):
    kwargs = dict(dict(max_new_tokens=4), **kwargs)
    with pytest.raises(ValueError, match=match):
        lora_model.generate(**inputs(1), speculative=True, **kwargs)


def test_bad_input_model_and_call(lora_model):
    full = get_diffusion_model(
        tiny_causal_lm("llama"), DiffusionConfig(attention="block", block_size=2, mask_token_id=MASK_ID)
    ).eval()
    with pytest.raises(ValueError, match="no adapter"):
        full.generate(**inputs(1), max_new_tokens=4, speculative=True)
    with pytest.raises(ValueError, match="must be a transformers causal LM"):
        full.generate(**inputs(1), max_new_tokens=4, speculative=True, verifier=lora_model)
    bidirectional = convert(tiny_causal_lm("llama"))
    bidirectional.config.attention = "bidirectional"
    with pytest.raises(ValueError, match="attention='block'"):
        bidirectional.generate(**inputs(1), max_new_tokens=4, speculative=True)
    with pytest.raises(ValueError, match="only used with `speculative=True`"):
        lora_model.generate(**inputs(1), max_new_tokens=4, verifier=tiny_causal_lm("llama"))
    with pytest.raises(ValueError, match="infill"):
        lora_model.infill(torch.tensor([[1, MASK_ID, 3]]), speculative=True)
    with pytest.raises(ValueError, match="batch size 1"):
        lora_model.generate(**inputs(4), max_new_tokens=4, speculative=True, streamer=Recorder())
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        lora_model.generate(torch.tensor([[1, 500]]), max_new_tokens=4, speculative=True)
    with pytest.raises(ValueError, match="left padding"):
        lora_model.generate(
            torch.tensor([[1, 2, 0]]), attention_mask=torch.tensor([[1, 1, 0]]), max_new_tokens=4, speculative=True
        )
    with pytest.raises(ValueError, match="empty prompt"):
        lora_model.generate(
            torch.tensor([[0, 0], [1, 2]]),
            attention_mask=torch.tensor([[0, 0], [1, 1]]),
            max_new_tokens=4,
            speculative=True,
        )


def test_verifications_use_the_weight_first_head_and_stay_exact(monkeypatch):
    """The verifier's LM head over the draft's rows runs weight-first on CPU (`adapter_views.head_rows_first`); the
    text is still the base's HF greedy text."""
    from peft_diffusion import adapter_views

    reference, model = base_and_model("llama")
    calls = []
    original = adapter_views._head_rows_first
    monkeypatch.setattr(
        adapter_views, "_head_rows_first", lambda *args: calls.append(args[-1].shape) or original(*args)
    )
    expected = reference.generate(**inputs(4), max_new_tokens=12, do_sample=False)
    out = model.generate(
        **inputs(4), max_new_tokens=12, speculative=True, block_length=4, return_dict_in_generate=True
    )
    assert torch.equal(out.sequences, expected)
    assert len(calls) >= out.base_forwards + out.drafter_forwards  # every draft and every verification
