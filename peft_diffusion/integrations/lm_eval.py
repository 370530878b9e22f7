r"""lm-evaluation-harness integration: a `DiffusionLM` as an lm-eval model, registered as `"peft_diffusion"`.

Needs the `eval` extra (`pip install "peft-diffusion[eval]"`); importing this module imports lm-eval (an
`ImportError` with that install hint when it is missing) and registers the model with lm-eval's `register_model`.
Nothing in the core imports it.

The likelihoods are the Monte-Carlo ELBO of `peft_diffusion.evaluation` (`loglikelihood_batch`; estimator, notation
and block handling in that module's docstring), a lower bound on the log-likelihood; generation is
`DiffusionLM.generate` (parallel denoising).

From Python:

    import lm_eval
    from peft_diffusion.integrations.lm_eval import DiffusionLMEval
    lm_eval.simple_evaluate(model=DiffusionLMEval(pretrained="out", mc_samples=32), tasks=["lambada_openai"])

From the shell, lm-eval's CLI cannot import our class by itself (`--include_path` registers tasks, not models), so run
it through this module, with the arguments of the `lm_eval` command:

    python -m peft_diffusion.integrations.lm_eval run --model peft_diffusion \
        --model_args pretrained=<folder>,mc_samples=32 --tasks lambada_openai

`peft-diffusion eval --model <folder> --tasks lambada_openai` runs the same model through `lm_eval.simple_evaluate`.
"""

from __future__ import annotations

import warnings

import torch
from transformers import AutoTokenizer

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window, simple_parse_args_string
except ImportError as error:
    raise ImportError(
        '`DiffusionLMEval` needs lm-evaluation-harness: `pip install "peft-diffusion[eval]"`.'
    ) from error

from ..architectures import context_window
from ..evaluation import _check_estimator, _check_mc_samples, _check_positive_int, loglikelihood_batch
from ..model import DiffusionLM
from ..sources import local_model_path

__all__ = ["LM_EVAL_MODEL_NAME", "DiffusionLMEval", "main"]

LM_EVAL_MODEL_NAME = "peft_diffusion"


@register_model(LM_EVAL_MODEL_NAME)
class DiffusionLMEval(LM):
    r"""A `DiffusionLM` as an lm-evaluation-harness model, registered as `"peft_diffusion"`.

    - `loglikelihood`: the Monte-Carlo ELBO (`loglikelihood_batch`), a lower bound on the log-likelihood;
      `is_greedy` is one-step greedy decoding of the fully masked continuation (per block, earlier blocks
      clean).
    - `loglikelihood_rolling`: lm-eval's disjoint rolling windows at the model's context, each scored by the ELBO.
    - `generate_until`: `model.generate` (parallel denoising), cut at the first stop sequence.
    Chat templates are not supported.

    Args:
        pretrained (`str`, *optional*): a folder for `DiffusionLM.from_pretrained` (adapter or full model).
        model (`DiffusionLM`, *optional*): an already built model instead of `pretrained`.
        tokenizer (`str` or `PreTrainedTokenizerBase`, *optional*): defaults to the tokenizer saved with
            `pretrained`, else with the base model.
        mc_samples (`int`, defaults to 32): Monte-Carlo samples per likelihood, a positive integer.
        estimator (`str`, defaults to `"elbo"`): `"elbo"` (Monte-Carlo ELBO) or `"left_to_right"` (deterministic,
            a few forwards per request; `evaluation.loglikelihood_batch`).
        batch_size (`int` or `"auto"`, defaults to 32): rows per forward pass (likelihood) and prompts per
            `generate` call (`"auto"`: 32). Given in `model_args` it wins over lm-eval's `--batch_size` (whose
            default, 1, lm-eval always passes).
        max_batch_size (`int`, *optional*): the upper bound of `batch_size="auto"`, as for lm-eval's `hf` model
            (lm-eval passes it, `None` by default); an explicit `batch_size` is used as given.
        steps (`int`, *optional*), block_length (`int`, *optional*): decoding settings of `generate_until`.
        max_new_tokens (`int`, defaults to 256): generation length when a task sets no `max_gen_toks`.
        max_length (`int`, *optional*): the context window of rolling windows and prompt truncation; defaults to
            the model's (`architectures.context_window`), else lm-eval's usual 2048 (as its `hf` model).
        device (`str`, *optional*): where to run; defaults to `"cuda"` when CUDA is available, else `"cpu"`. A CUDA
            device on a machine without CUDA (lm-eval's CLI passes `cuda:0` by default) falls back to the CPU with
            a warning. Given in `model_args` it wins over lm-eval's `--device`.
        dtype (`str`, *optional*): the dtype to load in (`"bfloat16"`, ...).
        seed (`int`, defaults to 0): seeds the Monte-Carlo draws and sampling; results are deterministic.

    Example:
    ```python
    >>> import lm_eval
    >>> from peft_diffusion.integrations.lm_eval import DiffusionLMEval
    >>> lm = DiffusionLMEval(pretrained="path/to/diffusion-model", mc_samples=32)  # doctest: +SKIP
    >>> lm_eval.simple_evaluate(model=lm, tasks=["lambada_openai"])  # doctest: +SKIP
    ```
    """

    def __init__(
        self,
        pretrained: str | None = None,
        *,
        model=None,
        tokenizer=None,
        mc_samples: int = 32,
        estimator: str = "elbo",
        batch_size: int | str = 32,
        max_batch_size: int | None = None,
        steps: int | None = None,
        block_length: int | None = None,
        max_new_tokens: int = 256,
        max_length: int | None = None,
        device: str | None = None,
        dtype: str | None = None,
        seed: int = 0,
        **kwargs,
    ):
        super().__init__()
        if (pretrained is None) == (model is None):
            raise ValueError("Pass exactly one of `pretrained` (a folder) and `model` (a DiffusionLM).")
        if kwargs:
            raise ValueError(f"Unknown model_args for peft_diffusion: {sorted(kwargs)}.")
        _check_mc_samples(mc_samples)
        _check_estimator(estimator)
        self.estimator = estimator
        if max_batch_size is not None:
            _check_positive_int("max_batch_size", max_batch_size, "use e.g. 64, or leave it out.")
        if isinstance(batch_size, str):
            auto = 32 if max_batch_size is None else min(32, max_batch_size)
            batch_size = auto if batch_size.startswith("auto") else int(batch_size)
        _check_positive_int("batch_size", batch_size, "use e.g. 32, or auto.")
        if model is None:
            load_kwargs = {"dtype": getattr(torch, dtype)} if dtype else {}
            model = DiffusionLM.from_pretrained(pretrained, **load_kwargs)
        self.model = model.to(_resolve_device(device)).eval()
        if tokenizer is None or isinstance(tokenizer, str):
            base = model.config.base_model_name_or_path
            sources = [tokenizer] if tokenizer else [pretrained, base and local_model_path(base)]
            tokenizer = _load_tokenizer(AutoTokenizer, [source for source in sources if source])
        self.tokenizer = tokenizer
        self.mc_samples = mc_samples
        self.batch_size = batch_size
        self.steps, self.block_length, self.max_new_tokens = steps, block_length, max_new_tokens
        self.seed = seed
        # lm-eval's `hf` model uses 2048 when a config names no context window; the same here
        self.max_length = max_length or context_window(model.causal_lm.config) or 2048
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        self.prefix_token_id = prefix

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> DiffusionLMEval:
        """lm-eval's `--model_args` string, with `additional_config` (lm-eval's `--batch_size`, `--device`, ...)."""
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> DiffusionLMEval:
        """Build from `model_args` and lm-eval's own settings; a key given in `model_args` wins.

        lm-eval always passes its `batch_size` (default 1) and `device` (default `cuda:0`) beside `model_args`, so
        lm-eval's base version fails on `model_args` that name them too ("got multiple values for keyword argument").
        """
        host = {key: value for key, value in (additional_config or {}).items() if value is not None}
        return cls(**{**host, **arg_dict})

    @property
    def device(self):
        return next(self.model.parameters()).device

    def _generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed)

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """lm-eval's convention: trailing context spaces move to the continuation; encode whole, then split."""
        if context == "":
            return [self.prefix_token_id], self.tokenizer.encode(continuation, add_special_tokens=False)
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.tokenizer.encode(context + continuation, add_special_tokens=False)
        context_ids = self.tokenizer.encode(context, add_special_tokens=False)
        return whole[: len(context_ids)], whole[len(context_ids) :]

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self._encode_pair(*request.args) for request in requests]
        estimates = loglikelihood_batch(
            self.model,
            pairs,
            mc_samples=self.mc_samples,
            batch_size=self.batch_size,
            generator=self._generator(),
            estimator=self.estimator,
            progress=not disable_tqdm,
        )
        return [(estimate.logprob, estimate.is_greedy) for estimate in estimates]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        pairs, owners = [], []
        for index, request in enumerate(requests):
            token_ids = self.tokenizer.encode(request.args[0], add_special_tokens=False)
            windows = get_rolling_token_windows(token_ids, self.prefix_token_id, self.max_length, context_len=1)
            for window in map(make_disjoint_window, windows):
                pairs.append(window)
                owners.append(index)
        estimates = loglikelihood_batch(
            self.model,
            pairs,
            mc_samples=self.mc_samples,
            batch_size=self.batch_size,
            generator=self._generator(),
            estimator=self.estimator,
            progress=not disable_tqdm,
        )
        totals = [0.0] * len(requests)
        for owner, estimate in zip(owners, estimates):
            totals[owner] += estimate.logprob
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        outputs = [""] * len(requests)
        generator = self._generator()
        # requests with the same generation settings are batched together
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(repr(sorted(_gen_settings(request.args[1], self).items())), []).append(index)
        for members in groups.values():
            settings = _gen_settings(requests[members[0]].args[1], self)
            for first in range(0, len(members), self.batch_size):
                chunk = members[first : first + self.batch_size]
                texts = self._generate([requests[index].args[0] for index in chunk], settings, generator)
                for index, text in zip(chunk, texts):
                    until = requests[index].args[1].get("until") or []
                    for stop in [until] if isinstance(until, str) else until:
                        text = text.split(stop)[0] if stop else text
                    outputs[index] = text
        return outputs

    def _generate(self, contexts: list[str], settings: dict, generator: torch.Generator) -> list[str]:
        max_new_tokens = settings["max_new_tokens"]
        keep = self.max_length - max_new_tokens
        if keep < 1:
            raise ValueError(
                f"`max_gen_toks`={max_new_tokens} leaves no room for the prompt in the model's context window "
                f"({self.max_length}); lower it."
            )
        encoded = [
            (self.tokenizer.encode(context, add_special_tokens=False) or [self.prefix_token_id])[-keep:]
            for context in contexts
        ]
        width = max(len(ids) for ids in encoded)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.prefix_token_id
        input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in encoded], device=self.device)
        attention_mask = torch.tensor(
            [[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded], device=self.device
        )
        sequences = self.model.generate(
            input_ids, attention_mask=attention_mask, generator=generator, **settings
        )  # [b, width + max_new_tokens]
        return self.tokenizer.batch_decode(sequences[:, width:], skip_special_tokens=True)


def _gen_settings(gen_kwargs: dict, lm) -> dict:
    """`generate` keyword arguments from an lm-eval request's `gen_kwargs` and the model_args."""
    max_new_tokens = int(gen_kwargs.get("max_gen_toks", lm.max_new_tokens))
    settings = {"max_new_tokens": max_new_tokens}
    block_length = lm.block_length
    if block_length is None:
        block_length = lm.model.config.attention_block_size
    if block_length is not None:
        # generate needs whole blocks: round the length up (the stop sequences cut the text anyway)
        settings["max_new_tokens"] = -(-max_new_tokens // block_length) * block_length
        settings["block_length"] = block_length
    if lm.steps is not None:
        settings["steps"] = lm.steps
    temperature = float(gen_kwargs.get("temperature", 0.0) or 0.0)
    if gen_kwargs.get("do_sample") and temperature > 0:
        settings.update(do_sample=True, temperature=temperature)
    return settings


def _resolve_device(device: str | None) -> str:
    """`device`, or `"cuda"` when CUDA is available else `"cpu"`; a CUDA device without CUDA falls back to the CPU."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        warnings.warn(
            f"device={device!r} but CUDA is not available on this machine: running on the CPU; pass `--device cpu` "
            "to say so.",
            stacklevel=3,
        )
        return "cpu"
    return device


def _load_tokenizer(auto_tokenizer, sources: list[str]):
    for source in sources:
        try:
            return auto_tokenizer.from_pretrained(source)
        except (OSError, ValueError):
            continue
    raise ValueError(f"No tokenizer found in {sources}; pass `tokenizer=<path>` in model_args.")


def main() -> None:
    """`python -m peft_diffusion.integrations.lm_eval <lm_eval arguments>`: lm-eval's CLI with `peft_diffusion`
    registered.

    `lm_eval --include_path` registers tasks, not models; importing this module registers the model before lm-eval's
    CLI runs, e.g. `python -m peft_diffusion.integrations.lm_eval run --model peft_diffusion --model_args
    pretrained=out/model,mc_samples=32 --tasks lambada_openai`.
    """
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
