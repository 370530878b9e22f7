"""Tests of `peft_diffusion.metrics` (generative perplexity) against hand-computed values."""

import math
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from peft_diffusion.metrics import generative_perplexity

# Offline checkpoints live next to the repository (`../shared`), never inside it; tests skip without them.
SHARED = Path(__file__).resolve().parents[2] / "shared"
STORIES260K = SHARED / "models" / "stories260K"


# ---------------------------------------------------------------------------------------------------------------------
# Generative perplexity
# ---------------------------------------------------------------------------------------------------------------------

WORDS = ["<s>", "<unk>", "the", "cat", "sat", "on", "mat", "a", "dog", "ran"]


def word_tokenizer(with_bos: bool) -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.WordLevel({word: index for index, word in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>" if with_bos else None)


def tiny_llama(attn_implementation: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(WORDS),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=None,
    )
    config._attn_implementation = attn_implementation
    return LlamaForCausalLM(config).eval()


def hand_perplexity(model, rows: list[list[int]]) -> float:
    """exp(mean over scored tokens of -log softmax(logits[i])[x_{i+1}]), one unpadded sequence at a time."""
    total, count = 0.0, 0
    for row in rows:
        with torch.no_grad():
            logits = model(torch.tensor([row])).logits[0].double()  # (len(row), vocab)
        for position in range(len(row) - 1):
            total += (torch.logsumexp(logits[position], dim=0) - logits[position, row[position + 1]]).item()
            count += 1
    return math.exp(total / count)


TEXTS = ["the cat sat on the mat", "a dog ran", "the dog sat on a cat and ran"]  # "and" is <unk>


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("batch_size", [1, 2, 8], ids=lambda size: f"batch{size}")
def test_generative_perplexity_matches_hand_computation(attn_implementation, batch_size):
    model, tokenizer = tiny_llama(attn_implementation), word_tokenizer(with_bos=True)
    rows = [[0] + [WORDS.index(word) if word in WORDS else 1 for word in text.split()] for text in TEXTS]
    expected = hand_perplexity(model, rows)
    assert generative_perplexity(TEXTS, model, tokenizer, batch_size=batch_size) == pytest.approx(expected, rel=1e-5)


def test_generative_perplexity_without_bos_does_not_score_the_first_token():
    model, tokenizer = tiny_llama("sdpa"), word_tokenizer(with_bos=False)
    rows = [[WORDS.index(word) for word in text.split()] for text in ["the cat sat", "a dog ran", "cat"]]
    expected = hand_perplexity(model, rows[:2])  # "cat" alone has no token to score
    actual = generative_perplexity(["the cat sat", "a dog ran", "cat"], model, tokenizer)
    assert actual == pytest.approx(expected, rel=1e-5)
    assert actual != pytest.approx(hand_perplexity(model, [[0] + row for row in rows[:2]]), rel=1e-5)


def test_generative_perplexity_truncates_to_max_length():
    model, tokenizer = tiny_llama("sdpa"), word_tokenizer(with_bos=True)
    expected = hand_perplexity(model, [[0, 2, 3], [0, 7, 8]])  # BOS + two words each
    assert generative_perplexity(["the cat sat on", "a dog ran"], model, tokenizer, max_length=3) == pytest.approx(
        expected, rel=1e-5
    )


def test_generative_perplexity_restores_training_mode():
    model, tokenizer = tiny_llama("sdpa"), word_tokenizer(with_bos=True)
    model.train()
    generative_perplexity(["the cat"], model, tokenizer)
    assert model.training


@pytest.mark.parametrize(
    ("texts", "kwargs", "error", "match"),
    [
        ("the cat", {}, TypeError, "`texts` must be a list of strings"),
        (["the cat"], {"batch_size": 0}, ValueError, "`batch_size` must be a positive integer, got batch_size=0"),
        (
            ["the cat"],
            {"max_length": 1},
            ValueError,
            r"`max_length` must be at least 2 \(one context and one scored token\), got max_length=1",
        ),
        (["", ""], {}, ValueError, "`texts` hold no token to score"),
    ],
)
def test_generative_perplexity_validates(texts, kwargs, error, match):
    model, tokenizer = tiny_llama("sdpa"), word_tokenizer(with_bos=True)
    with pytest.raises(error, match=match):
        generative_perplexity(texts, model, tokenizer, **kwargs)


@pytest.mark.skipif(not STORIES260K.exists(), reason="../shared/models/stories260K is absent")
def test_generative_perplexity_with_a_real_tiny_checkpoint():
    tokenizer = AutoTokenizer.from_pretrained(STORIES260K)
    model = AutoModelForCausalLM.from_pretrained(STORIES260K)
    texts = ["Once upon a time, there was a little girl named Lily.", "She liked to play.", "The end"]
    rows = [[tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False).input_ids for text in texts]
    expected = hand_perplexity(model, rows)
    actual = generative_perplexity(texts, model, tokenizer, batch_size=2)
    assert actual == pytest.approx(expected, rel=1e-5)
    # A model trained on TinyStories finds a TinyStories sentence far likelier than its words shuffled.
    shuffled = ["Lily girl little upon named a was time, there Once a."]
    assert generative_perplexity(texts[:1], model, tokenizer) < generative_perplexity(shuffled, model, tokenizer)
