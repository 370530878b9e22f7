"""Quality of generated text scored by an autoregressive evaluator: generative perplexity.

An optional module: the core (`model`, `generation`, `trainer`, `evaluation`) never imports it; `benchmarks/` and the
replication scripts do. It scores *text* with an AR causal LM (the papers use GPT-2 Large), whereas `evaluation.py`
bounds the diffusion model's own likelihood. The papers' task metrics (exact match, GSM8K, ROUGE, Distinct-n, pass@1)
are replication code, in `benchmarks/replication/metrics.py` and `benchmarks/replication/humaneval.py`.

| symbol    | meaning                                                         |
|-----------|-----------------------------------------------------------------|
| `x_{1:N}` | a generated text as tokenized by the AR evaluator               |
| `PPL`     | exp(-(1/N) * sum_i log p(x_i | x_{<i})) under the AR evaluator   |
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch.nn.utils.rnn import pad_sequence

__all__ = ["generative_perplexity"]


@torch.no_grad()
def generative_perplexity(
    texts: Sequence[str],
    model: torch.nn.Module,
    tokenizer: Any,
    *,
    batch_size: int = 8,
    max_length: int | None = None,
    device: str | torch.device | None = None,
) -> float:
    """Generative perplexity of texts under an autoregressive evaluator (the paper uses GPT-2 Large).

    PPL = exp(-(1/N) * sum_i log p(x_i | x_{<i})) with the sum over every scored token of every text pooled together
    (a token-weighted mean, not a mean of per-text perplexities).

    1. Tokenize each text without special tokens and prepend the tokenizer's BOS when it has one, so the first word
       is scored too; without a BOS the first token is context only.
    2. Truncate to `max_length` tokens (BOS included) when given.
    3. Batch right-padded rows: under causal attention real tokens never see right padding, and position ids stay
       `0..L-1`, so batching does not change the score.
    4. Sum -log p(x_i | x_{<i}) over real (non-padding) next tokens, in float32.
    5. Return exp(total NLL / number of scored tokens).

    The model runs in eval mode (dropout off) and is put back in its previous mode afterwards.

    Args:
        texts (`Sequence[str]`):
            The generated samples, decoded to strings (they are re-tokenized by the evaluator's tokenizer).
        model (`torch.nn.Module`):
            A causal LM returning `.logits` of shape `(batch, seq_len, vocab)`, e.g. `AutoModelForCausalLM`.
        tokenizer:
            The evaluator's tokenizer (a transformers tokenizer).
        batch_size (`int`, defaults to 8):
            Texts per forward pass; positive.
        max_length (`int`, *optional*):
            Keep at most this many tokens per text (BOS included); at least 2. Default: no truncation.
        device (`str` or `torch.device`, *optional*):
            Where to run; defaults to the device of the model's first parameter.

    Returns:
        `float`: The perplexity.

    Raises:
        `ValueError`: invalid `batch_size` or `max_length`, or the texts hold no token to score.

    Example:

    ```python
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    >>> from peft_diffusion.metrics import generative_perplexity
    >>> from tokenizers import Tokenizer, models, pre_tokenizers
    >>> backend = Tokenizer(models.WordLevel({"<s>": 0, "<unk>": 1, "hello": 2, "world": 3}, unk_token="<unk>"))
    >>> backend.pre_tokenizer = pre_tokenizers.Whitespace()
    >>> tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", unk_token="<unk>")
    >>> config = LlamaConfig(vocab_size=4, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
    ...                      num_attention_heads=2, num_key_value_heads=1, bos_token_id=0, eos_token_id=0)
    >>> model = LlamaForCausalLM(config)
    >>> ppl = generative_perplexity(["hello world", "world"], model, tokenizer)
    >>> 1.0 < ppl < 100.0
    True

    ```
    """
    if isinstance(texts, str):
        raise TypeError("`texts` must be a list of strings, got a single string; wrap it in a list.")
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive integer, got batch_size={batch_size}.")
    if max_length is not None and max_length < 2:
        raise ValueError(
            f"`max_length` must be at least 2 (one context and one scored token), got max_length={max_length}."
        )
    if device is None:
        device = next(model.parameters()).device

    # 1. Tokenize; BOS first so that x_1 is predicted from it.
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    bos_token_id = tokenizer.bos_token_id
    rows = [([bos_token_id] if bos_token_id is not None else []) + list(ids) for ids in encoded]
    # 2. Truncate.
    if max_length is not None:
        rows = [row[:max_length] for row in rows]
    rows = [row for row in rows if len(row) >= 2]  # a row of one token has nothing to score
    if not rows:
        raise ValueError(
            "`texts` hold no token to score: every text is empty (or a single token with no BOS to predict it from)."
        )

    was_training = model.training
    model.eval()
    total_nll = torch.zeros((), dtype=torch.float64, device=device)
    total_tokens = 0
    try:
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            # 3. Right padding; the pad id is never attended to nor scored, so any in-vocabulary id works.
            input_ids = pad_sequence([torch.tensor(row) for row in batch], batch_first=True)  # (batch, seq_len)
            input_ids = input_ids.to(device)
            lengths = torch.tensor([len(row) for row in batch], device=device)  # (batch,)
            positions = torch.arange(input_ids.shape[1], device=device)  # (seq_len,)
            attention_mask = (positions[None, :] < lengths[:, None]).long()  # (batch, seq_len)
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # (batch, seq_len, vocab)
            # 4. Position i predicts token i + 1.
            log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (batch, seq_len - 1, vocab)
            targets = input_ids[:, 1:]  # (batch, seq_len - 1)
            is_target = attention_mask[:, 1:].bool()  # (batch, seq_len - 1)
            token_nll = -log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (batch, seq_len - 1)
            total_nll += token_nll[is_target].sum(dtype=torch.float64)
            total_tokens += int(is_target.sum())
    finally:
        model.train(was_training)
    # 5. PPL = exp(mean NLL).
    return math.exp(total_nll.item() / total_tokens)
