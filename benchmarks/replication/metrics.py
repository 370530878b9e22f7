"""Evaluation metrics of the DiffuLLaMA protocol (Gong et al., arXiv 2410.17891), as pure functions.

Replication code, not library code: the scripts of `benchmarks/replication/` import it as `metrics` (their folder is
on `sys.path` when they run); `examples/evaluate.py` and the tests put the folder on `sys.path` first. The one metric
the library itself offers is `peft_diffusion.metrics.generative_perplexity` (scoring text with an AR model).

Each function scores predictions that were produced elsewhere (by `generate`, by a likelihood estimator, by a
sampler); none of them decodes with a diffusion model. Every score is a fraction in [0, 1]; multiply by 100 to compare
with the paper's tables.

| task (paper, Table 1)                 | metric                          | functions                                        |
|---------------------------------------|---------------------------------|--------------------------------------------------|
| TriviaQA                              | exact match after normalisation | `normalize_answer`, `exact_match_any`            |
| LAMBADA                               | exact match of the last word    | `lambada_last_word`, `first_word`, `exact_match` |
| GSM8K                                 | exact match of the final number | `extract_gsm8k_answer`, `gsm8k_correct`          |
| HellaSwag, WinoGrande, SIQA, PIQA     | accuracy of argmin Score(c)     | `multiple_choice_predict`, `..._accuracy`        |
| ROCStories infilling                  | ROUGE-1/2/L F-measure           | `rouge_scores`                                   |
| HumanEval infilling                   | pass@1                          | `humaneval.py`: `pass_at_1`                      |
| unconditional generation, quality     | generative perplexity           | `peft_diffusion.metrics.generative_perplexity`   |
| unconditional generation, diversity   | Distinct-2                      | `distinct_n` with `n=2`                          |

Notation:

| symbol            | meaning                                                                               |
|-------------------|---------------------------------------------------------------------------------------|
| `c`               | a candidate answer of a multiple-choice question, `|c|` its length in tokens          |
| `Score(c)`        | (1/|c|) * sum_{i in c} -log p(x_i | prompt), the token-averaged NLL of `c`            |
| `Distinct-n`      | #unique n-grams / #n-grams, counted over all texts together                           |
"""

from __future__ import annotations

import gzip
import json
import os
import re
import string
from collections.abc import Callable, Iterable, Sequence
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import torch

EVAL_INSTALL_HINT = 'pip install "peft-diffusion[eval]"'

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)
# A number as written in GSM8K solutions: optional sign and `$`, digits with thousands commas, optional decimals.
_NUMBER = re.compile(r"-?\$?(?:\d(?:[\d,]*\d)?(?:\.\d+)?|\.\d+)")


# ---------------------------------------------------------------------------------------------------------------------
# Exact match (TriviaQA, LAMBADA)
# ---------------------------------------------------------------------------------------------------------------------


def normalize_answer(text: str) -> str:
    """Normalise an answer string the SQuAD/TriviaQA way before exact match.

    Lowercases, removes ASCII punctuation, removes the articles "a", "an", "the" as whole words, and collapses runs of
    whitespace into single spaces (stripping both ends). Punctuation goes before articles, so "the." is removed too.

    Args:
        text (`str`):
            The answer to normalise.

    Returns:
        `str`: The normalised answer.

    Example:

    ```python
    >>> from metrics import normalize_answer
    >>> normalize_answer("  The Eiffel-Tower!  ")
    'eiffeltower'
    >>> normalize_answer("A  cat, an owl")
    'cat owl'

    ```
    """
    text = text.lower().translate(_PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    """EM = 1[normalize(prediction) == normalize(reference)] (DiffuLLaMA, Metrics I).

    Args:
        prediction (`str`):
            The model's answer.
        reference (`str`):
            The gold answer.

    Returns:
        `float`: 1.0 when the normalised strings are equal, else 0.0.

    Example:

    ```python
    >>> from metrics import exact_match
    >>> exact_match("The Beatles.", "beatles")
    1.0
    >>> exact_match("Beatles band", "beatles")
    0.0

    ```
    """
    return float(normalize_answer(prediction) == normalize_answer(reference))


def exact_match_any(prediction: str, references: Iterable[str]) -> float:
    """Exact match against a set of acceptable answers (TriviaQA aliases): the maximum of `exact_match` over them.

    Args:
        prediction (`str`):
            The model's answer.
        references (`Iterable[str]`):
            The acceptable gold answers; at least one.

    Returns:
        `float`: 1.0 when the prediction matches any reference after normalisation, else 0.0.

    Raises:
        `TypeError`: `references` is a single string (its characters would be taken as the answers).
        `ValueError`: `references` is empty.

    Example:

    ```python
    >>> from metrics import exact_match_any
    >>> exact_match_any("J.F.K.", ["John F. Kennedy", "JFK"])
    1.0

    ```
    """
    if isinstance(references, str):
        raise TypeError(
            f"`references` must be a list of strings, got the single string {references!r}; wrap it: [{references!r}]."
        )
    references = list(references)
    if not references:
        raise ValueError("`references` must hold at least one answer, got an empty list.")
    normalized = normalize_answer(prediction)
    return float(any(normalized == normalize_answer(reference) for reference in references))


def lambada_last_word(text: str) -> tuple[str, str]:
    """Split a LAMBADA passage into the context and the last word to predict.

    The target keeps the space in front of it, as LAMBADA evaluation does (lm-evaluation-harness splits on the last
    `" "`), so a tokenizer sees `context + target` exactly as the original text and the target's first token carries
    its leading-space marker.

    Args:
        text (`str`):
            The full passage, e.g. the `text` field of `lambada_test.jsonl`.

    Returns:
        `tuple[str, str]`: `(context, target)` with `context + target == text` (trailing whitespace removed first).

    Raises:
        `ValueError`: `text` has fewer than two whitespace-separated words.

    Example:

    ```python
    >>> from metrics import lambada_last_word
    >>> lambada_last_word("I looked at him, feeling stunned. I don't care about signs")
    ("I looked at him, feeling stunned. I don't care about", ' signs')

    ```
    """
    match = re.fullmatch(r"(.*\S)(\s+\S+)", text.rstrip(), flags=re.DOTALL)
    if match is None:
        raise ValueError(f"`text` must hold at least two words to split off the last one, got {text!r}.")
    return match.group(1), match.group(2)


def first_word(generation: str) -> str:
    """Cut a generation to its first whitespace-separated word, for exact match against a LAMBADA target.

    Args:
        generation (`str`):
            The decoded continuation of a LAMBADA context.

    Returns:
        `str`: The first word without surrounding whitespace (punctuation attached to it is kept;
        `exact_match` removes it), or `""` when the generation is blank.

    Example:

    ```python
    >>> from metrics import exact_match, first_word
    >>> first_word(" signs. And then")
    'signs.'
    >>> exact_match(first_word(" signs. And then"), " signs")
    1.0

    ```
    """
    words = generation.split(maxsplit=1)
    return words[0] if words else ""


# ---------------------------------------------------------------------------------------------------------------------
# GSM8K
# ---------------------------------------------------------------------------------------------------------------------


def _canonical_number(raw: str) -> str | None:
    """`"$1,000.50"` -> `"1000.5"`, `"3.0"` -> `"3"`, `"-0"` -> `"0"`; None when `raw` is not a number."""
    try:
        value = Decimal(raw.replace(",", "").replace("$", ""))
    except InvalidOperation:
        return None
    if value == value.to_integral_value():
        return str(int(value))
    # Not an integer: fixed-point notation with trailing zeros removed ("2.50" -> "2.5").
    return format(value.normalize(), "f")


def extract_gsm8k_answer(text: str) -> str | None:
    """Extract the final numeric answer from a GSM8K solution or a model's generation.

    1. If the text contains `####`, the answer is the first number after the first `####` (the GSM8K answer format;
       a model that runs on into a new question writes a second `####` later).
    2. Otherwise (or when nothing numeric follows `####`), the answer is the last number in the text.
    3. The number is put in canonical form: commas and `$` removed, integers without decimals ("3.0" -> "3"),
       other decimals without trailing zeros ("2.50" -> "2.5").

    Args:
        text (`str`):
            A reference answer (`"... #### 18"`) or a generation.

    Returns:
        `str` or `None`: The canonical number, or `None` when the text holds no number.

    Example:

    ```python
    >>> from metrics import extract_gsm8k_answer
    >>> extract_gsm8k_answer("She makes 9 * 2 = $18 every day.\\n#### 18")
    '18'
    >>> extract_gsm8k_answer("The total is $1,250.00.")
    '1250'
    >>> extract_gsm8k_answer("no idea") is None
    True

    ```
    """
    # 1. The number right after the first `####`.
    _, marker, after = text.partition("####")
    if marker:
        match = _NUMBER.search(after)
        if match is not None:
            # 3. Canonical form.
            return _canonical_number(match.group())
    # 2. Fall back to the last number anywhere in the text.
    numbers = _NUMBER.findall(text)
    if not numbers:
        return None
    # 3. Canonical form.
    return _canonical_number(numbers[-1])


def gsm8k_correct(generation: str, reference_answer: str) -> bool:
    """Whether a generation's final number equals the reference's (only the final answer is scored, per the paper).

    Args:
        generation (`str`):
            The model's solution.
        reference_answer (`str`):
            The GSM8K `answer` field (`"... #### 18"`) or the bare number.

    Returns:
        `bool`: True iff both texts yield a number and the canonical numbers are equal.

    Raises:
        `ValueError`: `reference_answer` holds no number.

    Example:

    ```python
    >>> from metrics import gsm8k_correct
    >>> gsm8k_correct("9 eggs at $2 each is $18.00", "Janet sells 9 eggs.\\n#### 18")
    True

    ```
    """
    reference = extract_gsm8k_answer(reference_answer)
    if reference is None:
        raise ValueError(f"`reference_answer` must contain a number, got {reference_answer!r}.")
    return extract_gsm8k_answer(generation) == reference


# ---------------------------------------------------------------------------------------------------------------------
# Multiple choice (HellaSwag, WinoGrande, SIQA, PIQA)
# ---------------------------------------------------------------------------------------------------------------------


def multiple_choice_predict(
    choice_nlls: Sequence[float] | torch.Tensor, choice_lengths: Sequence[int] | torch.Tensor
) -> int:
    """Pick the choice with the lowest token-averaged NLL, Score(c) = (1/|c|) * sum_{i in c} -log p(x_i | prompt).

    Length normalisation (DiffuLLaMA, Metrics II) keeps short choices from winning just by having fewer tokens to pay
    for. `|c|` counts tokens, not characters or bytes (lm-evaluation-harness `acc_norm` divides by bytes instead).

    Args:
        choice_nlls (`Sequence[float]` or `torch.Tensor` of shape `(num_choices,)`):
            The *total* NLL of each choice given the prompt, sum_{i in c} -log p(x_i | prompt), from an AR model or a
            diffusion likelihood estimate.
        choice_lengths (`Sequence[int]` or `torch.Tensor` of shape `(num_choices,)`):
            `|c|`, the number of tokens of each choice; positive.

    Returns:
        `int`: The index of the choice with the lowest Score(c); the first one on ties.

    Raises:
        `ValueError`: no choices, lengths of the two arguments differ, or a choice length is not positive.

    Example:

    ```python
    >>> from metrics import multiple_choice_predict
    >>> multiple_choice_predict([3.0, 4.0], [1, 4])  # raw minimum is choice 0, per-token minimum is choice 1
    1

    ```
    """
    nlls = torch.as_tensor(choice_nlls, dtype=torch.float64).reshape(-1)  # (num_choices,)
    lengths = torch.as_tensor(choice_lengths, dtype=torch.float64).reshape(-1)  # (num_choices,)
    if nlls.numel() == 0:
        raise ValueError("`choice_nlls` must hold at least one choice, got none.")
    if nlls.shape != lengths.shape:
        raise ValueError(
            f"`choice_nlls` and `choice_lengths` must have one entry per choice, got {nlls.numel()} NLLs and "
            f"{lengths.numel()} lengths."
        )
    if bool((lengths <= 0).any()):
        raise ValueError(
            f"`choice_lengths` must be positive token counts, got {lengths.tolist()}; a choice with no tokens has no "
            "Score(c)."
        )
    scores = nlls / lengths  # (num_choices,) Score(c)
    # torch.argmin returns the first minimal index on ties.
    return int(torch.argmin(scores))


def multiple_choice_accuracy(
    examples: Iterable[tuple[Sequence[float] | torch.Tensor, Sequence[int] | torch.Tensor, int]],
) -> float:
    """Accuracy of `multiple_choice_predict` over a data set.

    Args:
        examples (`Iterable[tuple]`):
            One `(choice_nlls, choice_lengths, gold_index)` triple per question; see `multiple_choice_predict`.

    Returns:
        `float`: The fraction of questions whose predicted choice is `gold_index`.

    Raises:
        `ValueError`: `examples` is empty.

    Example:

    ```python
    >>> from metrics import multiple_choice_accuracy
    >>> multiple_choice_accuracy([([3.0, 4.0], [1, 4], 1), ([1.0, 2.0], [1, 1], 1)])
    0.5

    ```
    """
    outcomes = [multiple_choice_predict(nlls, lengths) == gold for nlls, lengths, gold in examples]
    if not outcomes:
        raise ValueError("`examples` must hold at least one question, got none.")
    return sum(outcomes) / len(outcomes)


# ---------------------------------------------------------------------------------------------------------------------
# ROUGE (ROCStories infilling)
# ---------------------------------------------------------------------------------------------------------------------


def rouge_scores(
    predictions: Sequence[str], references: Sequence[str], *, use_stemmer: bool = False
) -> dict[str, float]:
    """Mean ROUGE-1, ROUGE-2 and ROUGE-L F-measures of infilled spans against the gold spans.

    Uses Google's `rouge_score` package (its default tokenizer lowercases and keeps `[a-z0-9]` words), scoring each
    pair and averaging the F-measures over pairs (no bootstrap). ROUGE-L is the sentence-level LCS variant (`rougeL`),
    not the summary-level `rougeLsum`.

    Args:
        predictions (`Sequence[str]`):
            The generated spans.
        references (`Sequence[str]`):
            The gold spans, one per prediction.
        use_stemmer (`bool`, defaults to `False`):
            Porter-stem words before matching ("walked" matches "walk"). Off by default, as in `rouge_score` and
            HF `evaluate`; state it when reporting numbers.

    Returns:
        `dict[str, float]`: `{"rouge1": ..., "rouge2": ..., "rougeL": ...}`, each a mean F-measure in [0, 1]
        (the paper's table shows these times 100).

    Raises:
        `ImportError`: `rouge_score` is not installed.
        `ValueError`: the two lists are empty or differ in length.

    Example:

    ```python
    >>> from metrics import rouge_scores
    >>> round(rouge_scores(["the cat sat"], ["the cat sat down"])["rouge1"], 4)  # P = 3/3, R = 3/4, F = 6/7
    0.8571

    ```
    """
    try:
        from rouge_score import rouge_scorer
    except ImportError as error:
        raise ImportError(
            f"`rouge_scores` needs the `rouge_score` package; install it with `{EVAL_INSTALL_HINT}`."
        ) from error
    if isinstance(predictions, str) or isinstance(references, str):
        raise TypeError("`predictions` and `references` must be lists of strings, got a single string.")
    if len(predictions) != len(references):
        raise ValueError(
            f"`predictions` and `references` must have the same length, got {len(predictions)} and {len(references)}."
        )
    if not predictions:
        raise ValueError("`predictions` must hold at least one span, got none.")
    rouge_types = ("rouge1", "rouge2", "rougeL")
    scorer = rouge_scorer.RougeScorer(list(rouge_types), use_stemmer=use_stemmer)
    totals = dict.fromkeys(rouge_types, 0.0)
    for prediction, reference in zip(predictions, references):
        scores = scorer.score(reference, prediction)  # rouge_score takes (target, prediction)
        for rouge_type in rouge_types:
            totals[rouge_type] += scores[rouge_type].fmeasure
    return {rouge_type: total / len(predictions) for rouge_type, total in totals.items()}


# ---------------------------------------------------------------------------------------------------------------------
# Unconditional generation: Distinct-n
# ---------------------------------------------------------------------------------------------------------------------


def distinct_n(texts: Iterable[str], n: int = 2, tokenize: Callable[[str], list[str]] = str.split) -> float:
    """Distinct-n = #unique n-grams / #n-grams, pooled over all texts (the paper's Distinct-2 is `n=2`).

    n-grams are taken inside each text (none spans two texts); uniqueness is counted over the whole collection, so
    two identical samples lower the score.

    Args:
        texts (`Iterable[str]`):
            The generated samples.
        n (`int`, defaults to 2):
            The n-gram order; positive.
        tokenize (`Callable[[str], list[str]]`, defaults to `str.split`):
            Splits a text into tokens (whitespace words by default; pass a tokenizer's `tokenize` for subwords).

    Returns:
        `float`: The fraction of distinct n-grams in [0, 1]; 0.0 when no text has `n` tokens.

    Raises:
        `TypeError`: `texts` is a single string.
        `ValueError`: `n` is not positive.

    Example:

    ```python
    >>> from metrics import distinct_n
    >>> distinct_n(["a b a b", "a b c"])  # bigrams: ab ba ab | ab bc -> 3 unique of 5
    0.6

    ```
    """
    if isinstance(texts, str):
        raise TypeError(f"`texts` must be a list of strings, got the single string {texts[:40]!r}; wrap it in a list.")
    if n < 1:
        raise ValueError(f"`n` must be a positive n-gram order, got n={n}.")
    unique: set[tuple[str, ...]] = set()
    total = 0
    for text in texts:
        tokens = tokenize(text)
        ngrams = [tuple(tokens[start : start + n]) for start in range(len(tokens) - n + 1)]
        unique.update(ngrams)
        total += len(ngrams)
    return len(unique) / total if total else 0.0


# ---------------------------------------------------------------------------------------------------------------------
# Data files
# ---------------------------------------------------------------------------------------------------------------------


def load_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a JSON-lines file, gzip-compressed when its name ends in `.gz` (as the HumanEval files are).

    Args:
        path (`str` or `os.PathLike`):
            The file; blank lines are skipped.

    Returns:
        `list[dict]`: One parsed record per non-blank line.

    Example:

    ```python
    >>> import json, tempfile, pathlib
    >>> from metrics import load_jsonl
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "toy.jsonl"
    >>> _ = path.write_text(json.dumps({"text": "hi"}) + "\\n\\n")
    >>> load_jsonl(path)
    [{'text': 'hi'}]

    ```
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]
