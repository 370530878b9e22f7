"""Self-distilled training data from the base model: no download, and the data the base itself would produce.

Training a diffusion adapter on text the base model did not write (for example source code) pulls an instruction
model away from chat, and it leaves the converted model unsure of tokens the base would have been sure of. Training
on the base's own outputs instead keeps the converted model close to its parent (self-distillation) and makes its
answers predictable enough to commit several tokens per forward.

1. Chat models (the tokenizer has a chat template) follow Magpie (Xu et al. 2024, arXiv 2406.08464): the chat
   template is rendered up to the start of a user turn (the *pre-query template*), the base writes the user message
   itself (sampled with `instruction_temperature`, stopped at the end-of-turn token), and then answers it with HF
   `generate` (greedy by default). Rows are TRL's conversational prompt-completion format
   (`prompt=[{"role": "user", ...}]`, `completion=[{"role": "assistant", ...}]`): TRL renders both through the chat
   template and puts labels on the completion only, with no `{% generation %}` markers needed; or TRL's
   `messages` format (then `assistant_only_loss=True` needs those markers).
2. Base models (no chat template) continue text prompts: the first `prompt_tokens` tokens of each given text (default:
   `peft_diffusion.sources.stdlib_texts()`), cut back to a word boundary, continued greedily (by default) for at
   most `max_new_tokens` tokens or until EOS. Rows are plain prompt-completion strings (TRL appends the EOS token to
   every non-conversational completion, as it does to every plain text).
3. Filters, each row counted under the first that drops it:

   | filter | drops |
   |---|---|
   | `empty_prompt` | an instruction (or text prefix) that is empty after stripping |
   | `unfinished_prompt` | an instruction that did not end its turn within `max_instruction_tokens` (chat only) |
   | `duplicate_prompt` | an instruction already kept (case and whitespace ignored) |
   | `completion_cut` | an answer that did not reach the end-of-turn / EOS within `max_new_tokens` (chat only) |
   | `completion_too_short` | a completion of fewer than `min_completion_tokens` tokens |
   | `completion_repetitive` | distinct-2 below `min_distinct2`, or an n-gram (n <= 8) repeated `max_repeats` times in a row |

4. The result is cached as one JSON file under `cache_dir()/self_distilled/` (or `cache_dir`), named by a hash of the
   model (name_or_path, config, vocabulary size, a sample of the weights), the tokenizer (vocabulary, special tokens,
   chat template), the texts and every generation and filter setting: another model or setting never reuses it, and a
   corrupt file is rebuilt with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Literal

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .distill_store import (  # noqa: F401 (FILTERS, cache_key and the filters are part of this module's API)
    CACHE_VERSION,
    FILTERS,
    DistillationStats,
    _completion_filter,
    _load_cache,
    _normalized,
    _save_cache,
    cache_key,
    distinct_n,
    max_repeat_run,
)

logger = logging.getLogger(__name__)

__all__ = ["DistillationStats", "distinct_n", "max_repeat_run", "self_distilled_dataset"]

OUTPUT_FORMATS = ("prompt_completion", "messages")
# The chat path stops after this many instructions per requested row (Magpie instructions from a small model are often
# unfinished, and many answers do not end within a short `max_new_tokens`).
MAX_ATTEMPTS_PER_ROW = 8
# A word no chat template changes: where it lands in the rendered user turn is where the user message starts.
_SENTINEL = "PEFTDIFFUSIONUSERMESSAGE"
# What to change when a filter dropped everything.
_FIXES = {
    "empty_prompt": "raise `instruction_temperature` (chat) or pass non-empty `texts` (base model)",
    "unfinished_prompt": "raise `max_instruction_tokens`",
    "duplicate_prompt": "raise `instruction_temperature` (chat) or pass distinct `texts` (base model)",
    "completion_cut": "raise `max_new_tokens` (answers must end their turn within it)",
    "completion_too_short": "lower `min_completion_tokens` or raise `max_new_tokens`",
    "completion_repetitive": "lower `min_distinct2` / raise `max_repeats`, or sample answers with `temperature` > 0",
}


# ----------------------------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------------------------


def _stop_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, end_of_turn: int | None) -> list[int]:
    """Every id that ends a turn: the generation config's EOS ids, the tokenizer's EOS, the template's end of turn."""
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    for extra in (tokenizer.eos_token_id, end_of_turn):
        if extra is not None and extra not in ids:
            ids.append(extra)
    return ids


def _left_padded(sequences: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)  # [B, L]
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)  # [B, L]
    for row, ids in enumerate(sequences):  # building the batch, not the hot loop
        input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids) :] = 1
    return input_ids.to(device), attention_mask.to(device)


def _generate(
    model, prompts: list[list[int]], *, max_new_tokens: int, temperature: float, stop_ids: list[int], pad_id: int
) -> list[tuple[list[int], bool]]:
    """HF `generate` over a left-padded batch (KV cache on); per row the new ids up to the first stop id (excluded)
    and whether a stop id was reached."""
    input_ids, attention_mask = _left_padded(prompts, pad_id, model.device)
    # Plain sampling at `temperature` (no top-k / top-p from the checkpoint's generation config), or greedy.
    sampling = {"temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature > 0 else {}
    output = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=max_new_tokens,
        do_sample=temperature > 0,
        eos_token_id=stop_ids,
        pad_token_id=pad_id,
        use_cache=True,
        **sampling,
    )
    new = output[:, input_ids.shape[1] :].tolist()  # [B, <= max_new_tokens]
    results = []
    for ids in new:
        stop = next((i for i, token in enumerate(ids) if token in stop_ids), None)
        results.append((ids, False) if stop is None else (ids[:stop], True))
    return results


def _pre_query_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], int | None]:
    """Magpie's pre-query template: the chat template rendered up to where a user message starts, as token ids, and
    the token that closes a user turn (the first token after the message, when it is a special token)."""
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": _SENTINEL}], tokenize=False)
    if _SENTINEL not in rendered:
        raise ValueError(
            "The tokenizer's chat template does not render a user message verbatim, so the start of a user turn "
            "cannot be found: pass `chat=False` for the base-model path, or a template that renders "
            "`message['content']` as is."
        )
    before, after = rendered.split(_SENTINEL, 1)
    after_ids = tokenizer(after, add_special_tokens=False)["input_ids"]
    end_of_turn = after_ids[0] if after_ids and after_ids[0] in tokenizer.all_special_ids else None
    return tokenizer(before, add_special_tokens=False)["input_ids"], end_of_turn


def _chat_prompt_ids(tokenizer: PreTrainedTokenizerBase, instruction: str) -> list[int]:
    """The answer's context exactly as TRL renders a conversational prompt (`add_generation_prompt=True`)."""
    messages = [{"role": "user", "content": instruction}]
    return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, add_generation_prompt=True)[
        "input_ids"
    ]


def _continuation(tokenizer: PreTrainedTokenizerBase, prompt_ids: list[int], new_ids: list[int]) -> str:
    """The text the new ids add after the prompt: decoded together, so a leading space or a split word survives."""
    whole = tokenizer.decode(prompt_ids + new_ids, skip_special_tokens=True)
    head = tokenizer.decode(prompt_ids, skip_special_tokens=True)
    return whole[len(head) :] if whole.startswith(head) else tokenizer.decode(new_ids, skip_special_tokens=True)


# ----------------------------------------------------------------------------------------------------------------
# The public function
# ----------------------------------------------------------------------------------------------------------------


def self_distilled_dataset(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    num_examples: int = 128,
    max_new_tokens: int = 128,
    chat: bool | None = None,
    output_format: Literal["prompt_completion", "messages"] = "prompt_completion",
    max_instruction_tokens: int = 48,
    instruction_temperature: float = 1.0,
    temperature: float = 0.0,
    texts: Sequence[str] | None = None,
    prompt_tokens: int = 32,
    min_completion_tokens: int = 4,
    min_distinct2: float = 0.5,
    max_repeats: int = 4,
    batch_size: int = 16,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    seed: int = 0,
    progress: bool = True,
    cut_completions: Literal["drop", "trim"] = "drop",
):
    """Training data written by the base model itself: Magpie instructions and greedy answers for chat models, text
    continuations for base models (see the module docstring).

    1. check the arguments and pick the path (chat when the tokenizer has a chat template, unless `chat` says);
    2. return the cached rows when a cache file for this model, tokenizer and settings exists;
    3. generate in batches until `num_examples` rows are kept: prompts (instructions sampled after the pre-query
       template, or text prefixes), prompt filters, completions (HF `generate`, KV cache, left padding), completion
       filters;
    4. stop early (a warning, fewer rows) when the prompts run out (`MAX_ATTEMPTS_PER_ROW * num_examples`
       instructions, or every text), or when nothing was kept after `2 * batch_size` answers (hopeless settings
       fail fast); raise when nothing was kept, naming the filters and the fix;
    5. save the cache and return a `datasets.Dataset`.

    Args:
        model (`PreTrainedModel`): the base causal LM (not a `DiffusionLM`); run in eval mode, under
            `torch.inference_mode`, on its device.
        tokenizer (`PreTrainedTokenizerBase`): its tokenizer.
        num_examples (`int`, defaults to 128): rows to return (fewer, with a warning, when filters drop too many).
        max_new_tokens (`int`, defaults to 128): most tokens of an answer or continuation. Chat answers that do not
            end their turn within it are dropped: short answers are cheap on a CPU and fully learnable.
        chat (`bool`, *optional*): the chat (Magpie) path or the base-model path; default: chat when the tokenizer
            has a chat template.
        output_format (`str`, defaults to `"prompt_completion"`): chat rows as TRL's conversational
            `prompt`/`completion` (labels on the answer with any template) or `messages` (for `assistant_only_loss`,
            which needs `{% generation %}` in the template). The base-model path is always prompt-completion.
        max_instruction_tokens (`int`, defaults to 48): most tokens of a generated instruction (chat).
        instruction_temperature (`float`, defaults to 1.0): sampling temperature of the instructions (chat; > 0).
        temperature (`float`, defaults to 0.0): sampling temperature of the answers; 0 is greedy.
        texts (`Sequence[str]`, *optional*): texts whose prefixes are continued (base-model path); default
            `peft_diffusion.sources.stdlib_texts()`.
        prompt_tokens (`int`, defaults to 32): tokens of each text kept as the prompt (base-model path).
        min_completion_tokens (`int`, defaults to 4): shorter completions are dropped.
        min_distinct2 (`float`, defaults to 0.5): completions whose distinct-2 is lower are dropped.
        max_repeats (`int`, defaults to 4): completions where an n-gram (n <= 8) occurs this many times in a row are
            dropped.
        batch_size (`int`, defaults to 16): rows per `generate` call.
        cache_dir (`str`, *optional*): the cache folder; defaults to `peft_diffusion.sources.cache_dir()` /
            "self_distilled" (`PEFT_DIFFUSION_CACHE`).
        use_cache (`bool`, defaults to `True`): read and write the cache.
        seed (`int`, defaults to 0): seeds the sampling (the caller's RNG state is restored afterwards).
        progress (`bool`, defaults to `True`): a tqdm bar of kept rows on stderr.
        cut_completions (`str`, defaults to `"drop"`): a chat answer that does not end its turn within
            `max_new_tokens`: `"drop"` it (filter `completion_cut`), or `"trim"` it back to its last sentence or line
            end (the tokens up to the last one whose text ends in `.`, `!`, `?`, `:` or a newline; dropped as
            `completion_cut` when there is none) and keep it, counted in `DistillationStats.trimmed`. Trimming keeps
            most of the generation that dropping throws away (on SmolLM2-135M-Instruct about half the answers run
            past 128 tokens), at the price of answers that end earlier than the base would.

    Returns:
        `datasets.Dataset` with `prompt` and `completion` (or `messages`) columns; `DistillationStats.from_dataset`
        reads what was kept and dropped, by filter.

    Raises:
        ValueError: a bad argument, a model that is not a causal LM, `chat=True` without a chat template, or nothing
            kept (the message names the filters and what to change).


    The body is long (its argument checks, one per setting, come first): each check names its argument.

    Example:

    ```python
    >>> from transformers import AutoModelForCausalLM, AutoTokenizer
    >>> from peft_diffusion import DistillationStats, self_distilled_dataset
    >>> model = AutoModelForCausalLM.from_pretrained("../shared/models/stories260K")
    >>> tokenizer = AutoTokenizer.from_pretrained("../shared/models/stories260K")
    >>> dataset = self_distilled_dataset(model, tokenizer, num_examples=2, max_new_tokens=16,
    ...                                  texts=["Once upon a time, there was a cat.", "Tom and Sue went to the park."],
    ...                                  prompt_tokens=4, use_cache=False, progress=False)
    >>> dataset.column_names
    ['prompt', 'completion']
    >>> DistillationStats.from_dataset(dataset).kept
    2
    ```
    """
    from datasets import Dataset, DatasetInfo

    from .model import DiffusionLM
    from .sources import cache_dir as default_cache_dir

    # 1. arguments and path
    if not isinstance(model, PreTrainedModel) or isinstance(model, DiffusionLM):
        raise ValueError(
            f"`model` must be the base causal LM (a transformers `PreTrainedModel` with a generation head), got "
            f"{type(model).__name__}; load it with `AutoModelForCausalLM.from_pretrained` (for a `DiffusionLM`, pass "
            "the AR model it was built from)."
        )
    if not model.can_generate() or getattr(model.config, "is_encoder_decoder", False):
        raise ValueError(
            f"`model` must be a decoder-only causal LM that can `generate`, got {type(model).__name__}; load it with "
            "`AutoModelForCausalLM.from_pretrained`."
        )
    if not isinstance(num_examples, int) or num_examples < 1:
        raise ValueError(
            f"`num_examples` must be an integer >= 1, got num_examples={num_examples!r}; ask for 1 or more."
        )
    for name, value in (
        ("max_new_tokens", max_new_tokens),
        ("max_instruction_tokens", max_instruction_tokens),
        ("prompt_tokens", prompt_tokens),
        ("batch_size", batch_size),
        ("max_repeats", max_repeats),
    ):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be an integer >= 1, got {name}={value!r}.")
    if instruction_temperature <= 0 or temperature < 0:
        raise ValueError(
            f"`instruction_temperature` must be > 0 and `temperature` >= 0, got instruction_temperature="
            f"{instruction_temperature} and temperature={temperature}; instructions are sampled, answers may be "
            "greedy (0)."
        )
    if min_completion_tokens < 0 or not 0 <= min_distinct2 <= 1:
        raise ValueError(
            f"`min_completion_tokens` must be >= 0 and `min_distinct2` in [0, 1], got min_completion_tokens="
            f"{min_completion_tokens} and min_distinct2={min_distinct2}."
        )
    if output_format not in OUTPUT_FORMATS:
        raise ValueError(
            f"`output_format` must be one of {list(OUTPUT_FORMATS)}, got output_format={output_format!r}."
        )
    if cut_completions not in ("drop", "trim"):
        raise ValueError(f"`cut_completions` must be 'drop' or 'trim', got cut_completions={cut_completions!r}.")
    has_template = isinstance(tokenizer.chat_template, str) and bool(tokenizer.chat_template)
    chat = has_template if chat is None else chat
    if chat and not has_template:
        raise ValueError(
            f"`chat=True` needs a tokenizer with a chat template, and {type(tokenizer).__name__} "
            f"({tokenizer.name_or_path or 'unnamed'}) has none: use the base-model path (`chat=False`, the default "
            "for such tokenizers: continuations of `texts`), or set `tokenizer.chat_template`."
        )
    if not chat and output_format == "messages":
        raise ValueError(
            "`output_format='messages'` is for the chat path; the base-model path (no chat template or `chat=False`) "
            "returns prompt-completion rows: drop `output_format` or use a chat model."
        )
    if chat and texts is not None:
        raise ValueError(
            "`texts` is read by the base-model path only (the chat path writes its own instructions): pass "
            "`chat=False` to continue `texts`, or drop `texts`."
        )
    if chat and output_format == "messages" and not re.search(r"{%-?\s*generation\s*-?%}", tokenizer.chat_template):
        warnings.warn(
            "`output_format='messages'` with a chat template without `{% generation %}`: TRL's "
            "`assistant_only_loss=True` cannot find the answer (it raises); use the default "
            "`output_format='prompt_completion'` to train on the answers only.",
            UserWarning,
            stacklevel=2,
        )
    if not chat:
        if texts is None:
            from .sources import stdlib_texts

            texts = stdlib_texts()
        texts = list(texts)
        if not texts or not all(isinstance(text, str) for text in texts):
            raise ValueError("`texts` must be a non-empty sequence of strings (the base-model path continues them).")

    settings = {
        "chat": chat,
        "num_examples": num_examples,
        "max_new_tokens": max_new_tokens,
        "max_instruction_tokens": max_instruction_tokens if chat else None,
        "instruction_temperature": instruction_temperature if chat else None,
        "temperature": temperature,
        "texts": None if chat else hashlib.sha256(json.dumps(texts).encode()).hexdigest(),
        "prompt_tokens": None if chat else prompt_tokens,
        "min_completion_tokens": min_completion_tokens,
        "min_distinct2": min_distinct2,
        "max_repeats": max_repeats,
        "batch_size": batch_size,
        "seed": seed,
        "cut_completions": cut_completions if chat else None,
    }

    # 2. the cache
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "self_distilled"
    key = cache_key(model, tokenizer, settings)
    path = folder / f"{key}.json"
    cached = _load_cache(path, key) if use_cache else None
    if cached is not None:
        rows, stats = cached
        stats.cache_file = str(path)
        logger.info("Self-distilled data loaded from %s: %s", path, stats.summary())
    else:
        rows, stats = _distill(
            model, tokenizer, chat=chat, texts=texts, settings=settings, seed=seed, progress=progress
        )
        if use_cache:
            _save_cache(path, key, rows, stats, settings)
            stats.cache_file = str(path)
        logger.info("Self-distilled data: %s", stats.summary())

    # 5. the dataset
    if output_format == "messages":
        rows = [{"messages": row["prompt"] + row["completion"]} for row in rows]
    info = DatasetInfo(description=json.dumps(asdict(stats)))
    return Dataset.from_list(rows, info=info)


def _distill(model, tokenizer, *, chat: bool, texts, settings: dict, seed: int, progress: bool):
    """Steps 3-4 of `self_distilled_dataset`: the rows (prompt-completion, conversational when `chat`) and stats.

    One batched generate-filter loop shared by the chat and base-model paths, kept in one piece (longer than usual)
    so that the attempt/keep/drop bookkeeping that `DistillationStats` reports stays in one place.
    """
    from tqdm.auto import tqdm

    num_examples, batch_size = settings["num_examples"], settings["batch_size"]
    pre_query, end_of_turn = _pre_query_ids(tokenizer) if chat else (None, None)
    stop_ids = _stop_ids(model, tokenizer, end_of_turn)
    if not stop_ids:
        raise ValueError(
            "Neither the model's generation config nor the tokenizer has an EOS token, so no answer can end: set "
            "`tokenizer.eos_token` or `model.generation_config.eos_token_id`."
        )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    max_attempts = len(texts) if not chat else MAX_ATTEMPTS_PER_ROW * num_examples
    stats = DistillationStats()
    rows: list[dict] = []
    pending: list[tuple[str, list[int]]] = []  # prompts that passed their filters, with their context ids
    seen: set[str] = set()
    answered = 0
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    # A plain tqdm on stderr: shown even when transformers / datasets progress bars are turned off.
    bar = tqdm(total=num_examples, desc="Self-distilling", unit="row", disable=not progress, dynamic_ncols=True)
    try:
        devices = [model.device] if model.device.type == "cuda" else []  # the sampling RNG, restored afterwards
        with torch.random.fork_rng(devices=devices), torch.inference_mode():
            torch.manual_seed(seed)
            while len(rows) < num_examples and (pending or stats.attempted < max_attempts):
                if answered >= 2 * batch_size and not rows:
                    break  # hopeless settings: fail fast rather than spend the whole budget
                # 3a. prompts and prompt filters, until a batch of answers is ready
                while len(pending) < batch_size and stats.attempted < max_attempts:
                    size = min(batch_size, max_attempts - stats.attempted)
                    candidates = (
                        _instructions(model, tokenizer, pre_query, size, settings, stop_ids, pad_id)
                        if chat
                        else [
                            (_text_prefix(tokenizer, text, settings["prompt_tokens"]), True)
                            for text in texts[stats.attempted : stats.attempted + size]
                        ]
                    )
                    stats.attempted += size
                    for prompt, ended in candidates:
                        reason = (
                            "empty_prompt"
                            if not prompt.strip()
                            else "unfinished_prompt"
                            if not ended
                            else "duplicate_prompt"
                            if _normalized(prompt) in seen
                            else None
                        )
                        if reason:
                            stats.dropped[reason] += 1
                            continue
                        seen.add(_normalized(prompt))
                        context = _chat_prompt_ids(tokenizer, prompt) if chat else tokenizer(prompt)["input_ids"]
                        pending.append((prompt, context))
                if not pending:
                    break
                # 3b. completions and completion filters
                batch, pending = pending[:batch_size], pending[batch_size:]
                answers = _generate(
                    model,
                    [context for _, context in batch],
                    max_new_tokens=settings["max_new_tokens"],
                    temperature=settings["temperature"],
                    stop_ids=stop_ids,
                    pad_id=pad_id,
                )
                answered += len(batch)
                for (prompt, context), (ids, ended) in zip(batch, answers):
                    if chat and not ended and settings["cut_completions"] == "trim":
                        ids = _trim_to_sentence_end(tokenizer, ids)
                        ended = len(ids) > 0
                        stats.trimmed += int(ended)
                    reason = _completion_filter(
                        ids,
                        ended,
                        require_eos=chat,
                        min_tokens=settings["min_completion_tokens"],
                        min_distinct2=settings["min_distinct2"],
                        max_repeats=settings["max_repeats"],
                    )
                    if reason:
                        stats.dropped[reason] += 1
                    elif len(rows) == num_examples:
                        stats.unused += 1
                    else:
                        if chat:
                            answer = tokenizer.decode(ids, skip_special_tokens=True).strip()
                            rows.append(
                                {
                                    "prompt": [{"role": "user", "content": prompt}],
                                    "completion": [{"role": "assistant", "content": answer}],
                                }
                            )
                        else:
                            rows.append({"prompt": prompt, "completion": _continuation(tokenizer, context, ids)})
                        bar.update(1)
                bar.set_postfix(dropped=sum(stats.dropped.values()))
    finally:
        bar.close()
        model.train(was_training)

    # 4. the outcome
    stats.unused += len(pending)
    stats.kept = len(rows)
    stats.seconds = time.perf_counter() - start
    stats.rows_per_minute = stats.kept / stats.seconds * 60 if stats.seconds > 0 else 0.0
    dropped = {name: count for name, count in stats.dropped.items() if count}
    worst = max(dropped, key=dropped.get) if dropped else None
    if not rows:
        if worst == "completion_cut" and dropped[worst] == answered:
            raise ValueError(
                f"No answer ended within max_new_tokens={settings['max_new_tokens']} ({answered} of {answered} "
                f"answers cut): raise `max_new_tokens`."
            )
        raise ValueError(
            f"Every generated row was filtered out ({stats.attempted} prompts tried; dropped by filter: {dropped}). "
            + (f"The most frequent is `{worst}`: {_FIXES[worst]}." if worst else "")
        )
    if len(rows) < num_examples:
        warnings.warn(
            f"Only {len(rows)} of num_examples={num_examples} self-distilled rows were kept ({stats.summary()}); "
            + ("pass more `texts` (each text gives one prompt). " if not chat else "")
            + (f"The most frequent filter is `{worst}`: {_FIXES[worst]}." if worst else ""),
            UserWarning,
            stacklevel=3,
        )
    return rows, stats


_SENTENCE_END = re.compile(r"[.!?:]\s*$|\n")


def _trim_to_sentence_end(tokenizer, ids: Sequence[int]) -> list[int]:
    """`ids` up to and including the last token whose text ends a sentence or a line (empty when none does)."""
    ids = list(ids)
    for end in range(len(ids), 0, -1):
        if _SENTENCE_END.search(tokenizer.decode(ids[end - 1 : end])):
            return ids[:end]
    return []


def _instructions(model, tokenizer, pre_query, size, settings, stop_ids, pad_id) -> list[tuple[str, bool]]:
    """Magpie: `size` user messages sampled after the pre-query template, with whether each ended its turn."""
    drafts = _generate(
        model,
        [pre_query] * size,
        max_new_tokens=settings["max_instruction_tokens"],
        temperature=settings["instruction_temperature"],
        stop_ids=stop_ids,
        pad_id=pad_id,
    )
    return [(tokenizer.decode(ids, skip_special_tokens=True).strip(), ended) for ids, ended in drafts]


def _text_prefix(tokenizer, text: str, prompt_tokens: int) -> str:
    """The first `prompt_tokens` tokens of `text`, cut back to a word boundary when the text goes on: the
    completion then starts with its own space, and TRL's tokens of prompt + completion begin with the prompt's."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    prompt = tokenizer.decode(ids[:prompt_tokens], skip_special_tokens=True)
    if len(ids) > prompt_tokens:
        cut = max(prompt.rfind(" "), prompt.rfind("\n"))
        prompt = prompt[:cut] if cut > 0 else prompt
    return prompt
