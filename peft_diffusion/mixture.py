"""A share of plain text beside chat rows: one tokenized dataset that `DiffusionTrainer` trains on unchanged.

Chat rows alone (the self-distilled default of `convert`) put every training target after the same chat template
and system prompt; nothing in the data asks the model to stay its base on plain text, or at the first positions of a
document. A share of plain text is the usual remedy. Measured on SmolLM2-135M-Instruct at a 10-minute budget
(docs/conversion.md, section f), a quarter of standard-library windows did not help: the converted model's
next-token distribution on held-out plain text (stories, Wikipedia, code) came no closer to its base's (KL 1.26 vs
1.09 nats), and LAMBADA did not move. What did bring it close (0.21) is an attention change,
`DiffusionConfig(causal_first_token=True)`. The function is the tool for longer runs and other data; `convert` leaves
it off by default.

`mix_plain_text` adds plain-text rows (windows of real text from the start of each text, by default the standard
library's, no download) to a chat or prompt-completion dataset. A `datasets.Dataset` column holds one type, so
conversational rows and plain strings cannot share a `prompt` column: the result is tokenized instead, with
`input_ids` and `labels` (-100 where there is no target). TRL's `SFTTrainer` (and so `DiffusionTrainer`) takes a
dataset with these columns as it is, packs it, and puts targets where `labels` says.

Tokenization follows TRL's own dataset preparation, row by row:

| row | `input_ids` | targets (`labels != -100`) |
|---|---|---|
| conversational `prompt` + `completion` | the chat template over prompt + completion | the completion: from where the prompt rendered alone (with the generation prompt) stops being a prefix |
| plain `prompt` + `completion` | `tokenizer(prompt + completion + eos)` (TRL appends EOS) | from where `tokenizer(prompt)` stops being a prefix |
| conversational `messages` | the chat template over the messages | every token (TRL without `assistant_only_loss`) |
| plain `text` | `tokenizer(text + eos)` | every token |
| a plain-text window | the first `max_tokens` tokens of a text, no EOS (a window, not a whole document) | every token |

Under the shift the first token of each document has no left neighbour and is never a target (the collator drops it).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from datasets import Dataset
from transformers import PreTrainedTokenizerBase

__all__ = ["mix_plain_text"]


def mix_plain_text(
    dataset: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str] | None = None,
    *,
    share: float = 0.25,
    max_tokens: int = 128,
    seed: int = 0,
) -> Dataset:
    """`dataset`'s rows and plain-text windows, tokenized into one dataset (`input_ids`, `labels`).

    Args:
        dataset (`datasets.Dataset`): TRL-format rows: `prompt` + `completion` (conversational or plain), `messages`
            or `text` (for example `self_distilled_dataset(...)`).
        tokenizer (`PreTrainedTokenizerBase`): the model's tokenizer (with a chat template for conversational rows).
        texts (`Sequence[str]`, *optional*): the plain text; defaults to `peft_diffusion.sources.stdlib_texts()`.
        share (`float`, defaults to 0.25): the share of plain-text rows in the result, in `[0, 1)`:
            `round(len(dataset) * share / (1 - share))` windows are added.
        max_tokens (`int`, defaults to 128): tokens per window. Each text gives its first window (the start of a
            document, where chat rows never put a target), then, when more windows are needed than texts, the next.
        seed (`int`, defaults to 0): the order in which texts are drawn.

    Returns:
        `datasets.Dataset` with `input_ids` and `labels` columns: `dataset`'s rows first, then the windows (the
        Trainer's sampler shuffles).

    Raises:
        ValueError: `share` outside `[0, 1)`, `max_tokens < 2`, empty `texts`, or a dataset without a usable format.

    Example:
    ```python
    >>> from datasets import Dataset
    >>> from transformers import AutoTokenizer
    >>> from peft_diffusion import mix_plain_text
    >>> tokenizer = AutoTokenizer.from_pretrained("../shared/models/stories260K")
    >>> rows = Dataset.from_list([{"prompt": "Once upon a time", "completion": " there was a cat."}] * 3)
    >>> mixed = mix_plain_text(rows, tokenizer, ["Tom and Sue went to the park. They played all day."], share=0.25)
    >>> len(mixed), mixed.column_names
    (4, ['input_ids', 'labels'])
    ```
    """
    if not 0 <= share < 1:
        raise ValueError(
            f"`share` must be in [0, 1) (the share of plain-text rows in the result), got share={share!r}."
        )
    if not isinstance(max_tokens, int) or max_tokens < 2:
        raise ValueError(f"`max_tokens` must be an integer >= 2 (tokens per window), got max_tokens={max_tokens!r}.")
    columns = set(dataset.column_names)
    if not ({"prompt", "completion"} <= columns or "messages" in columns or "text" in columns):
        raise ValueError(
            f"`dataset` must have `prompt` + `completion`, `messages` or `text` columns (TRL's formats), got "
            f"{sorted(columns)}."
        )
    if texts is None:
        from .sources import stdlib_texts

        texts = stdlib_texts()
    texts = [text for text in texts if isinstance(text, str) and text.strip()]
    num_windows = round(len(dataset) * share / (1 - share))
    if num_windows and not texts:
        raise ValueError("`texts` holds no non-empty string: give the plain text to mix in, or share=0.")

    rows = [_tokenized_row(row, tokenizer) for row in dataset]
    rows += _windows(texts, tokenizer, num_windows, max_tokens, seed)
    return Dataset.from_list(rows)


def _common_prefix(first: list[int], second: list[int]) -> int:
    length = 0
    for a, b in zip(first, second):
        if a != b:
            break
        length += 1
    return length


def _chat_ids(tokenizer, messages, **kwargs) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)["input_ids"])


def _tokenized_row(row: dict, tokenizer) -> dict:
    """One TRL-format row as `input_ids` + `labels`, as TRL's `SFTTrainer` tokenizes it (module docstring)."""
    eos = tokenizer.eos_token or ""
    if row.get("prompt") is not None and row.get("completion") is not None:
        prompt, completion = row["prompt"], row["completion"]
        if isinstance(prompt, list):  # conversational
            prompt_ids = _chat_ids(tokenizer, prompt, add_generation_prompt=True)
            ids = _chat_ids(tokenizer, prompt + completion)
        else:
            completion = completion if completion.endswith(eos) else completion + eos
            prompt_ids = tokenizer(prompt).input_ids
            ids = tokenizer(prompt + completion).input_ids
        start = _common_prefix(prompt_ids, ids)
        return {"input_ids": ids, "labels": [-100] * start + ids[start:]}
    if row.get("messages") is not None:
        ids = _chat_ids(tokenizer, row["messages"])
    else:
        text = row["text"]
        ids = tokenizer(text if text.endswith(eos) else text + eos).input_ids
    return {"input_ids": ids, "labels": list(ids)}


def _windows(texts: list[str], tokenizer, count: int, max_tokens: int, seed: int) -> list[dict]:
    """`count` windows of `max_tokens` tokens: the first window of each text in a seeded order, then the second..."""
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    tokenized: dict[int, list[int]] = {}
    windows: list[dict] = []
    depth = 0
    while len(windows) < count:
        added = False
        for index in order:
            if len(windows) == count:
                break
            if index not in tokenized:
                tokenized[index] = tokenizer(texts[index]).input_ids
            ids = tokenized[index][depth * max_tokens : (depth + 1) * max_tokens]
            if len(ids) >= 2:  # one target at least under the shift
                windows.append({"input_ids": ids, "labels": list(ids)})
                added = True
        if not added:
            raise ValueError(
                f"`texts` give only {len(windows)} windows of {max_tokens} tokens, and {count} are needed: give "
                "more text, or a lower share."
            )
        depth += 1
    return windows
