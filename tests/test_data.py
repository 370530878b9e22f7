"""self_distilled_dataset: base-model continuations, Magpie chat rows, filters, cache, errors, training on the rows."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from conftest import tiny_causal_lm
from test_model import word_tokenizer
from test_trainer import lora, spy, training_args
from transformers import AutoModelForCausalLM, AutoTokenizer, BertConfig, BertModel

from peft_diffusion import DiffusionConfig, DiffusionTrainer, DistillationStats, self_distilled_dataset
from peft_diffusion.data import FILTERS, cache_key, distinct_n, max_repeat_run

EOS_ID = 2
# Ids the test model never writes: the special tokens, words the word tokenizer splits on a special token inside them
# ("w10" -> "w1" "0"), and ids past its vocabulary; the rest decode and encode back to the same ids.
UNSAFE_IDS = [0, 1, 2, *range(10, 30), *range(100, 128)]
# A user turn is `w5 ... w2`, an assistant turn `w6 ... w2` (w2 is the EOS token); no `{% generation %}` markers.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}w5 {{ message['content'] }} w2 "
    "{% else %}w6 {{ message['content'] }} w2 {% endif %}{% endfor %}{% if add_generation_prompt %}w6 {% endif %}"
)
STORIES = [
    "Once upon a time, there was a little cat named Tom. He liked to play in the sun.",
    "Lily and her mom went to the park. They saw a big red ball under a tree.",
    "The dog was very hungry. He looked for food in the kitchen and found a bone.",
    "One day, a boy named Sam found a shiny rock on the beach near his house.",
    "Mia had a small bird. Every morning the bird sang a happy song for her.",
    "The sun was hot, so Ben and his friend wanted to eat some cold ice cream.",
]


def chat_tokenizer():
    tokenizer = word_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def ends_turns(model, answers_end: bool = True):
    """A random model never ends its turn: force EOS after 4-7 generated tokens (a function of the last token), as a
    chat model would, so that rows pass the filters (with `answers_end=False`, only the instructions end). Returns the
    hook handle."""
    state = {"generated": 0, "prompt": 0}

    def hook(module, args, kwargs, output):
        input_ids = kwargs["input_ids"]  # [B, L]
        # a prefill (every prompt here has 2 tokens or more) starts a `generate` call; then one token per forward
        if input_ids.shape[1] > 1:
            state.update(generated=0, prompt=input_ids.shape[1])
        else:
            state["generated"] += 1
        is_instruction = state["prompt"] == 2  # after the pre-query template `w1 w5`
        stop = (state["generated"] >= 4 + input_ids[:, -1] % 4) & (answers_end or is_instruction)  # [B]
        output.logits[:, -1, UNSAFE_IDS] = -1e4
        output.logits[:, -1, EOS_ID] = torch.where(stop, 1e4, -1e4)  # [B]

    return model.register_forward_hook(hook, with_kwargs=True)


def chat_model(seed=0):
    model = tiny_causal_lm("llama", seed=seed)
    ends_turns(model)
    return model


def count_generate(model) -> list[int]:
    calls = []
    generate = model.generate

    def counting(*args, **kwargs):
        calls.append(1)
        return generate(*args, **kwargs)

    model.generate = counting
    return calls


def distill(model, tokenizer, tmp_path, **kwargs):
    kwargs = {
        "num_examples": 6,
        "max_new_tokens": 12,
        "max_instruction_tokens": 12,
        "batch_size": 4,
        "cache_dir": tmp_path / "cache",
        "progress": False,
        **kwargs,
    }
    return self_distilled_dataset(model, tokenizer, **kwargs)


# --------------------------------------------------------------------------------------------------------------
# Base-model path: continuations of text prefixes
# --------------------------------------------------------------------------------------------------------------


def test_base_model_rows_are_greedy_continuations_of_text_prefixes(stories_path, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(stories_path).eval()
    tokenizer = AutoTokenizer.from_pretrained(stories_path)
    assert tokenizer.chat_template is None
    dataset = distill(model, tokenizer, tmp_path, texts=STORIES, prompt_tokens=8, min_completion_tokens=1)
    assert dataset.column_names == ["prompt", "completion"] and len(dataset) == 6
    for row, text in zip(dataset, STORIES):
        prompt, completion = row["prompt"], row["completion"]
        # a prefix of the text, ending on a word boundary; the completion brings its own space
        assert text.startswith(prompt) and text[len(prompt)] == " " and completion.startswith(" ")
        # independently: what greedy HF generate writes after the prompt, one prompt at a time, no padding
        prompt_ids = tokenizer(prompt)["input_ids"]
        output = model.generate(torch.tensor([prompt_ids]), max_new_tokens=12, do_sample=False)[0].tolist()
        new = output[len(prompt_ids) :]
        new = new[: new.index(EOS_ID)] if EOS_ID in new else new
        whole = tokenizer.decode(prompt_ids + new, skip_special_tokens=True)
        assert prompt + completion == whole
        # TRL's tokens of prompt + completion start with the prompt's (no boundary merge)
        assert tokenizer(prompt + completion)["input_ids"][: len(prompt_ids)] == prompt_ids
    stats = DistillationStats.from_dataset(dataset)
    assert (stats.attempted, stats.kept, sum(stats.dropped.values())) == (6, 6, 0)


def test_base_model_default_texts_are_the_standard_library(stories_path, tmp_path, monkeypatch):
    import peft_diffusion.sources as defaults

    monkeypatch.setattr(defaults, "stdlib_texts", lambda: ["def add(a, b):\n    return a + b\n"] * 3)
    model = AutoModelForCausalLM.from_pretrained(stories_path)
    tokenizer = AutoTokenizer.from_pretrained(stories_path)
    dataset = distill(model, tokenizer, tmp_path, num_examples=3, prompt_tokens=4, min_completion_tokens=1)
    stats = DistillationStats.from_dataset(dataset)
    # the same text three times: one row, two duplicate prompts
    assert len(dataset) == 1 and "def add(a, b):".startswith(dataset[0]["prompt"])
    assert stats.dropped["duplicate_prompt"] == 2


# --------------------------------------------------------------------------------------------------------------
# Chat path: Magpie instructions, greedy answers, TRL formats
# --------------------------------------------------------------------------------------------------------------


def test_chat_rows_are_magpie_instructions_with_greedy_answers(tmp_path):
    model, tokenizer = chat_model(), chat_tokenizer()
    dataset = distill(model, tokenizer, tmp_path, min_completion_tokens=1, min_distinct2=0.0, max_repeats=99)
    assert dataset.column_names == ["prompt", "completion"] and len(dataset) == 6
    instructions = set()
    for row in dataset:
        (user,), (assistant,) = row["prompt"], row["completion"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        instruction = user["content"]
        assert instruction and "w2" not in instruction.split()  # written by the model, ended at the end of turn
        instructions.add(instruction)
        # independently: the greedy answer to the prompt rendered by the chat template, up to EOS
        context = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, return_dict=True)
        output = model.generate(torch.tensor([context["input_ids"]]), max_new_tokens=12, do_sample=False)[0].tolist()
        new = output[len(context["input_ids"]) :]
        assert EOS_ID in new
        assert assistant["content"] == tokenizer.decode(new[: new.index(EOS_ID)], skip_special_tokens=True)
    assert len(instructions) == 6  # no duplicates
    stats = DistillationStats.from_dataset(dataset)
    assert stats.kept == 6 and stats.attempted == stats.kept + sum(stats.dropped.values()) + stats.unused


def test_chat_rows_in_messages_format(tmp_path):
    model, tokenizer = chat_model(), chat_tokenizer()
    kwargs = {"min_completion_tokens": 1, "min_distinct2": 0.0, "max_repeats": 99}
    pairs = distill(model, tokenizer, tmp_path, **kwargs)
    with pytest.warns(UserWarning, match="without `{% generation %}`"):
        messages = distill(model, tokenizer, tmp_path, output_format="messages", **kwargs)
    assert messages.column_names == ["messages"]
    assert messages["messages"] == [row["prompt"] + row["completion"] for row in pairs]


def test_sampled_answers_follow_the_seed(tmp_path):
    model, tokenizer = chat_model(), chat_tokenizer()
    kwargs = {"temperature": 1.0, "min_completion_tokens": 1, "min_distinct2": 0.0, "max_repeats": 99}
    first = distill(model, tokenizer, tmp_path, use_cache=False, **kwargs)
    torch.manual_seed(123)  # the caller's RNG does not matter, and is restored
    state = torch.get_rng_state()
    again = distill(model, tokenizer, tmp_path, use_cache=False, **kwargs)
    assert torch.equal(torch.get_rng_state(), state)
    other = distill(model, tokenizer, tmp_path, use_cache=False, seed=1, **kwargs)
    assert first.to_list() == again.to_list() != other.to_list()


# --------------------------------------------------------------------------------------------------------------
# Filters
# --------------------------------------------------------------------------------------------------------------


def test_distinct_n_and_repeat_runs_on_hand_made_strings():
    assert distinct_n("a b c d".split()) == 1.0
    assert distinct_n("a b a b a b".split()) == pytest.approx(2 / 5)
    assert distinct_n(["a"]) == 1.0
    assert max_repeat_run("the cat sat on the mat".split()) == 1
    assert max_repeat_run("no no no no".split()) == 4
    assert max_repeat_run("so I said a b c a b c a b c ok".split()) == 3
    assert max_repeat_run("x y z w v x y z w v".split()) == 2
    assert max_repeat_run([]) == 0


@pytest.mark.parametrize(
    ("tokens", "reached_eos", "expected"),
    [
        ("the answer is four".split(), True, None),
        ("the answer is four".split(), False, "completion_cut"),
        ("four".split(), True, "completion_too_short"),
        ("yes and yes and yes and yes and".split(), True, "completion_repetitive"),  # distinct-2 = 2/7
        ("ok so go go go go now".split(), True, "completion_repetitive"),  # a run of 4
    ],
)
def test_completion_filter(tokens, reached_eos, expected):
    from peft_diffusion.data import _completion_filter

    kwargs = {"require_eos": True, "min_tokens": 2, "min_distinct2": 0.5, "max_repeats": 4}
    assert _completion_filter(tokens, reached_eos, **kwargs) == expected


def test_filters_drop_and_count(tmp_path):
    model, tokenizer = chat_model(), chat_tokenizer()
    # instructions end after 4-7 tokens: a limit of 5 leaves some unfinished; sampled answers shorter than 6 are dropped
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fewer rows than asked, possibly
        dataset = distill(
            model,
            tokenizer,
            tmp_path,
            num_examples=4,
            max_instruction_tokens=5,
            min_completion_tokens=6,
            temperature=1.0,
        )
    stats = DistillationStats.from_dataset(dataset)
    assert set(stats.dropped) == set(FILTERS)
    assert stats.dropped["unfinished_prompt"] > 0 and stats.dropped["completion_too_short"] > 0
    assert stats.attempted == stats.kept + sum(stats.dropped.values()) + stats.unused
    for row in dataset:
        assert len(row["completion"][0]["content"].split()) >= 6


# --------------------------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------------------------


def test_second_call_loads_from_cache_without_generating(tmp_path):
    model, tokenizer = chat_model(), chat_tokenizer()
    calls = count_generate(model)
    first = distill(model, tokenizer, tmp_path)
    assert calls and (tmp_path / "cache").is_dir()
    calls.clear()
    second = distill(model, tokenizer, tmp_path)
    assert not calls and second.to_list() == first.to_list()
    assert DistillationStats.from_dataset(second).cache_file.startswith(str(tmp_path / "cache"))
    # another setting is another file: generated again
    distill(model, tokenizer, tmp_path, max_new_tokens=11)
    assert calls and len(list((tmp_path / "cache").glob("*.json"))) == 2


def test_cache_key_changes_with_model_tokenizer_and_settings():
    model, tokenizer = chat_model(), chat_tokenizer()
    settings = {"max_new_tokens": 12, "seed": 0}
    key = cache_key(model, tokenizer, settings)
    assert key == cache_key(model, tokenizer, dict(settings))
    assert key != cache_key(model, tokenizer, {**settings, "seed": 1})
    assert key != cache_key(chat_model(seed=1), tokenizer, settings)  # same config, other weights
    assert key != cache_key(tiny_causal_lm("llama", hidden_size=16, head_dim=4), tokenizer, settings)
    other_template = chat_tokenizer()
    other_template.chat_template = CHAT_TEMPLATE.replace("w6", "w7")
    assert key != cache_key(model, other_template, settings)
    assert key != cache_key(model, word_tokenizer(vocab_size=100), settings)
    model.name_or_path = "somewhere/else"
    assert key != cache_key(model, tokenizer, settings)


def test_corrupt_cache_is_rebuilt_with_a_warning(tmp_path):
    model, tokenizer = chat_model(), chat_tokenizer()
    first = distill(model, tokenizer, tmp_path)
    (path,) = (tmp_path / "cache").glob("*.json")
    path.write_text('{"key": "truncated', encoding="utf-8")
    calls = count_generate(model)
    with pytest.warns(UserWarning, match="unreadable.*rebuilding"):
        again = distill(model, tokenizer, tmp_path)
    assert calls and again.to_list() == first.to_list()
    assert json.loads(path.read_text(encoding="utf-8"))["rows"]  # rewritten whole


def test_default_cache_folder_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFT_DIFFUSION_CACHE", str(tmp_path / "env"))
    dataset = self_distilled_dataset(
        chat_model(), chat_tokenizer(), num_examples=2, max_new_tokens=12, batch_size=4, progress=False
    )
    assert DistillationStats.from_dataset(dataset).cache_file.startswith(str(tmp_path / "env" / "self_distilled"))
    assert not self_distilled_dataset(
        chat_model(), chat_tokenizer(), num_examples=2, max_new_tokens=12, use_cache=False, progress=False
    ).info.description.count(str(tmp_path))


# --------------------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_examples": 0}, r"`num_examples` must be an integer >= 1, got num_examples=0"),
        ({"max_new_tokens": 0}, r"`max_new_tokens` must be an integer >= 1"),
        ({"instruction_temperature": 0.0}, r"`instruction_temperature` must be > 0"),
        ({"min_distinct2": 1.5}, r"`min_distinct2` in \[0, 1\]"),
        ({"output_format": "sharegpt"}, r"`output_format` must be one of \['prompt_completion', 'messages'\]"),
        ({"texts": ["some text"]}, r"`texts` is read by the base-model path only.*chat=False"),
        ({"cut_completions": "keep"}, r"`cut_completions` must be 'drop' or 'trim', got cut_completions='keep'"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        distill(chat_model(), chat_tokenizer(), tmp_path, **kwargs)


def test_model_must_be_a_causal_lm(tmp_path):
    encoder = BertModel(BertConfig(vocab_size=128, hidden_size=16, num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(ValueError, match=r"`model` must be a decoder-only causal LM.*AutoModelForCausalLM"):
        distill(encoder, chat_tokenizer(), tmp_path)
    with pytest.raises(ValueError, match=r"`model` must be the base causal LM.*got Linear"):
        distill(torch.nn.Linear(2, 2), chat_tokenizer(), tmp_path)


def test_chat_request_without_a_chat_template(tmp_path):
    with pytest.raises(ValueError, match=r"`chat=True` needs a tokenizer with a chat template.*base-model path"):
        distill(chat_model(), word_tokenizer(), tmp_path, chat=True)
    with pytest.raises(ValueError, match=r"`output_format='messages'` is for the chat path"):
        distill(chat_model(), word_tokenizer(), tmp_path, output_format="messages", texts=["w4 w5"])


def test_everything_filtered_names_the_filter_and_the_fix(tmp_path):
    with pytest.raises(ValueError, match=r"filtered out.*'completion_too_short': 8.*lower `min_completion_tokens`"):
        distill(chat_model(), chat_tokenizer(), tmp_path, batch_size=4, min_completion_tokens=50)


def test_answers_that_never_end_say_raise_max_new_tokens(tmp_path):
    model = tiny_causal_lm("llama")
    ends_turns(model, answers_end=False)
    with pytest.raises(ValueError, match=r"No answer ended within max_new_tokens=12 .*raise `max_new_tokens`"):
        distill(model, chat_tokenizer(), tmp_path, batch_size=4, max_instruction_tokens=12)


def test_cut_answers_are_trimmed_to_their_last_sentence_end_when_asked(tmp_path):
    """Answers that never end their turn: "drop" keeps none; "trim" keeps each up to its last "." token (the model is
    forced to write "." as its 3rd and 7th answer token), and says how many it trimmed."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(120)}
    vocab["."] = vocab.pop("w9")  # id 9 is a full stop
    backend = Tokenizer(models.WordLevel(vocab, unk_token="w3"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="w0", bos_token="w1", eos_token="w2")
    tokenizer.chat_template = CHAT_TEMPLATE
    model = tiny_causal_lm("llama")
    ends_turns(model, answers_end=False)
    generated = {"count": 0}

    def full_stops(module, args, kwargs, output):
        if kwargs["input_ids"].shape[1] > 1:
            generated["count"] = 0
        else:
            generated["count"] += 1
        output.logits[:, -1, 9] = 1e4 if generated["count"] in (2, 6) else -1e4

    model.register_forward_hook(full_stops, with_kwargs=True)
    with pytest.raises(ValueError, match="No answer ended"):
        distill(model, tokenizer, tmp_path, batch_size=4)
    dataset = distill(model, tokenizer, tmp_path, batch_size=4, cut_completions="trim", min_completion_tokens=1)
    stats = DistillationStats.from_dataset(dataset)
    assert len(dataset) == 6 and stats.trimmed >= 6
    for row in dataset:
        words = row["completion"][0]["content"].split()
        assert words[-1] == "." and len(words) == 7 and words.count(".") == 2  # up to the last full stop


# --------------------------------------------------------------------------------------------------------------
# End to end: the rows train through DiffusionTrainer with only the answers as targets
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_rows_train_with_only_the_answers_as_targets(tmp_path, packing):
    model, tokenizer = tiny_causal_lm("llama"), chat_tokenizer()
    handle = ends_turns(model)
    dataset = distill(model, tokenizer, tmp_path, num_examples=8, min_completion_tokens=1, max_repeats=99)
    handle.remove()  # train the plain model
    trainer = DiffusionTrainer(
        model,
        args=training_args(tmp_path, packing=packing),
        train_dataset=dataset,
        processing_class=tokenizer,
        diffusion_config=DiffusionConfig(attention="block", block_size=4),
        peft_config=lora(),
    )
    calls = spy(trainer.model)
    trainer.train()
    outer = [call for call in calls if call.get("labels") is not None]
    assert len(outer) == 2
    prompt_lengths = {}  # each row as the chat template renders it -> its prompt's length
    for row in dataset:
        ids = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, return_dict=True)["input_ids"]
        answer = tokenizer(row["completion"][0]["content"] + " w2", add_special_tokens=False)["input_ids"]
        prompt_lengths[tuple(ids + answer)] = len(ids)
    documents = 0
    for call in outer:
        if packing:  # one row; documents start where position_ids restart at 0
            starts = (call["position_ids"][0] == 0).nonzero().flatten().tolist() + [call["input_ids"].shape[1]]
            spans = [(0, slice(start, end)) for start, end in zip(starts, starts[1:])]
        else:  # one document per row, padding after it
            spans = [(row, call["attention_mask"][row].bool()) for row in range(call["input_ids"].shape[0])]
        for row, span in spans:
            document = call["input_ids"][row][span].tolist()
            is_target = (call["labels"][row][span] != -100).tolist()
            prompt_length = prompt_lengths[tuple(document)]  # a whole row of the dataset
            assert not any(is_target[:prompt_length])  # no prompt token is a target
            assert all(is_target[prompt_length:])  # the answer and its end of turn are
            documents += 1
    assert documents == 8
    assert trainer.state.log_history[0]["loss"] > 0


def test_public_api():
    import peft_diffusion

    assert {"self_distilled_dataset", "DistillationStats"} <= set(peft_diffusion.__all__)
