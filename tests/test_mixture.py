"""mix_plain_text: rows tokenized as TRL tokenizes them, plain-text windows, errors, training on the mixture."""

from __future__ import annotations

import pytest
from conftest import tiny_causal_lm
from datasets import Dataset
from test_data import CHAT_TEMPLATE, STORIES
from test_model import word_tokenizer
from test_trainer import dataset, lora, spy, training_args

from peft_diffusion import DiffusionConfig, DiffusionTrainer, mix_plain_text

# Five texts of 30 distinct word tokens each (w30-w99: words the word tokenizer keeps whole).
WORD_TEXTS = [" ".join(f"w{30 + (13 * index + step) % 70}" for step in range(30)) for index in range(5)]


def chat_dataset(n: int = 6) -> Dataset:
    rows = dataset("messages", n=n)["messages"]
    return Dataset.from_list([{"prompt": [user], "completion": [assistant]} for user, assistant in rows])


def tokenizer_for(kind: str):
    tokenizer = word_tokenizer()
    if kind in ("conversational", "messages"):
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def trl_rows(tmp_path, rows: Dataset, tokenizer) -> list[tuple[list[int], list[int]]]:
    """`(input_ids, labels)` of each row as TRL's dataset preparation (inside `DiffusionTrainer`) makes them."""
    trainer = DiffusionTrainer(
        tiny_causal_lm("llama"),
        args=training_args(tmp_path, max_length=None),
        train_dataset=rows,
        processing_class=tokenizer,
        diffusion_config=DiffusionConfig(attention="block", block_size=4),
        peft_config=lora(),
    )
    return [(row["input_ids"], row["labels"]) for row in trainer.train_dataset]


@pytest.mark.parametrize("kind", ["conversational", "prompt_completion", "messages", "text"])
def test_rows_are_tokenized_as_trl_tokenizes_them(tmp_path, kind):
    rows = chat_dataset() if kind == "conversational" else dataset(kind, n=6)
    tokenizer = tokenizer_for(kind)
    mixed = mix_plain_text(rows, tokenizer, WORD_TEXTS, share=0.0)
    assert mixed.column_names == ["input_ids", "labels"]
    ours = [(row["input_ids"], row["labels"]) for row in mixed]
    assert ours == trl_rows(tmp_path / "raw", rows, tokenizer)
    # TRL takes the tokenized rows as they are
    assert trl_rows(tmp_path / "mixed", mixed, tokenizer) == ours
    if kind in ("conversational", "prompt_completion"):
        assert all(labels[0] == -100 and labels[-1] != -100 for _, labels in ours)  # prompt clean, answer target


def test_windows_are_document_starts_in_a_seeded_order():
    tokenizer = word_tokenizer()
    rows = chat_dataset(6)
    mixed = mix_plain_text(rows, tokenizer_for("conversational"), WORD_TEXTS, share=0.25, max_tokens=8, seed=0)
    assert len(mixed) == 6 + 2  # round(6 * 0.25 / 0.75)
    starts = {tuple(tokenizer(text).input_ids[:8]) for text in WORD_TEXTS}
    windows = [tuple(row["input_ids"]) for row in mixed][6:]
    assert all(window in starts and len(window) == 8 for window in windows)
    assert all(row["labels"] == row["input_ids"] for row in mixed.select(range(6, 8)))  # every token a target
    chosen = {seed: [tuple(row["input_ids"]) for row in mix_plain_text(rows, tokenizer_for("conversational"),
              WORD_TEXTS, share=0.25, max_tokens=8, seed=seed)][6:] for seed in range(4)}  # fmt: skip
    assert len({tuple(windows) for windows in chosen.values()}) > 1  # the seed picks the texts
    # more windows than texts: every first window, then second windows
    many = mix_plain_text(rows, tokenizer_for("conversational"), WORD_TEXTS, share=0.6, max_tokens=8)
    windows = [row["input_ids"] for row in many][6:]
    assert len(windows) == 9  # round(6 * 0.6 / 0.4)
    seconds = {tuple(tokenizer(text).input_ids[8:16]) for text in WORD_TEXTS}
    assert sum(tuple(window) in starts for window in windows) == 5
    assert all(tuple(window) in seconds for window in windows[5:])


def test_default_texts_are_the_standard_library(monkeypatch):
    import peft_diffusion.sources as sources

    monkeypatch.setattr(sources, "stdlib_texts", lambda: list(STORIES))
    mixed = mix_plain_text(chat_dataset(3), tokenizer_for("conversational"), share=0.5, max_tokens=6)
    tokenizer = word_tokenizer()
    starts = {tuple(tokenizer(story).input_ids[:6]) for story in STORIES}
    assert len(mixed) == 6 and all(tuple(row["input_ids"]) in starts for row in mixed.select(range(3, 6)))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"share": 1.0}, r"`share` must be in \[0, 1\).*share=1.0"),
        ({"share": -0.1}, r"`share` must be in \[0, 1\)"),
        ({"max_tokens": 1}, r"`max_tokens` must be an integer >= 2.*max_tokens=1"),
        ({"texts": ["", "  "]}, r"`texts` holds no non-empty string"),
        ({"texts": ["w4 w5"], "share": 0.5}, r"give only 1 windows of 128 tokens, and 3 are needed"),
    ],
)
def test_bad_arguments(kwargs, match):
    kwargs = {"texts": WORD_TEXTS, **kwargs}
    with pytest.raises(ValueError, match=match):
        mix_plain_text(chat_dataset(3), tokenizer_for("conversational"), **kwargs)


def test_dataset_without_a_trl_format():
    with pytest.raises(ValueError, match=r"`prompt` \+ `completion`, `messages` or `text` columns.*\['question'\]"):
        mix_plain_text(Dataset.from_dict({"question": ["w4"]}), word_tokenizer(), WORD_TEXTS)


def test_mixture_trains_with_windows_as_whole_documents(tmp_path):
    tokenizer = tokenizer_for("conversational")
    rows = chat_dataset(6)
    mixed = mix_plain_text(rows, tokenizer, WORD_TEXTS, share=0.4, max_tokens=10)
    windows = {tuple(row["input_ids"]) for row in mixed.select(range(6, len(mixed)))}
    trainer = DiffusionTrainer(
        tiny_causal_lm("llama"),
        args=training_args(tmp_path, packing=True, max_length=64, max_steps=2),
        train_dataset=mixed,
        processing_class=tokenizer,
        diffusion_config=DiffusionConfig(attention="block", block_size=4),
        peft_config=lora(),
    )
    calls = spy(trainer.model)
    trainer.train()
    seen = 0
    for call in (call for call in calls if call.get("labels") is not None):
        positions = call["position_ids"][0]
        starts = (positions == 0).nonzero().flatten().tolist() + [positions.shape[0]]
        for start, end in zip(starts, starts[1:]):
            document = tuple(call["input_ids"][0, start:end].tolist())
            if document in windows:
                is_target = (call["labels"][0, start:end] != -100).tolist()
                assert is_target == [False] + [True] * (end - start - 1)  # all but the first (the shift)
                seen += 1
    assert seen > 0
    assert trainer.state.log_history[0]["loss"] > 0
