"""Generation with PEFT's trainable token rows merged for the call (`conversion.token_rows_merged`) against the same
calls with them unmerged (PEFT rebuilds the embedding matrix with the mask row on every forward), one process.

For a saved LoRA adapter (or, without `--adapter`, a random LoRA r=32 on every linear layer): plain diffusion decoding (threshold 0.9) and self-speculative decoding (W=4), one chat
prompt, `--max-new-tokens` tokens; rounds alternate, each keeps its best time. The tokens must be the same.

    python benchmarks/token_rows.py --adapter runs/sd30 --threads 1
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a source checkout without an install


def add_arguments(parser: argparse.ArgumentParser, adapter_help: str) -> None:
    """The arguments this script and `adapter_views.py` share."""
    parser.add_argument("--model", default=None, help="default: the CLI's SmolLM2-135M-Instruct folder")
    parser.add_argument("--adapter", default=None, help=adapter_help)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)


def chat_model_and_prompt(args):
    """`(model, inputs)`: the diffusion LM of `--adapter` on `--model` (without `--adapter`: a fresh LoRA r=32 on every
    linear layer, block 4, `B` drawn small instead of zero so the adapter changes the output) in eval mode, and one
    chat prompt under the model's chat template. Sets the torch threads."""
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peft_diffusion import DiffusionConfig, DiffusionLM, get_diffusion_model
    from peft_diffusion.sources import DEFAULT_MODEL_NAME, local_model_path

    torch.set_num_threads(args.threads)
    path = args.model or str(local_model_path(DEFAULT_MODEL_NAME))
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa")
    if args.adapter:
        model = DiffusionLM.from_pretrained(args.adapter, base_model=base).eval()
    else:
        torch.manual_seed(0)
        lora = LoraConfig(r=32, lora_alpha=32, target_modules="all-linear")
        config = DiffusionConfig(attention="block", block_size=4)
        model = get_diffusion_model(base, config, tokenizer=tokenizer, peft_config=lora).eval()
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(parameter, std=0.01)
    messages = [{"role": "user", "content": "Give me three tips for staying healthy."}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    return model, inputs


def main(argv=None):
    from peft_diffusion import conversion

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(parser, "a saved LoRA diffusion adapter of --model (default: a random one)")
    args = parser.parse_args(argv)
    model, inputs = chat_model_and_prompt(args)
    merged = conversion.token_rows_merged
    unmerged = lambda module: contextlib.nullcontext()  # noqa: E731

    print(
        f"{args.adapter or 'random LoRA r=32'}, {args.max_new_tokens} tokens, {args.threads} thread(s), best of {args.rounds}"
    )
    settings = {
        "diffusion, threshold 0.9": dict(threshold=0.9),
        "speculative, W=4": dict(speculative=True, block_length=4, eos_token_id=[]),
    }
    for label, kwargs in settings.items():
        best, outputs = {}, {}
        for _ in range(args.rounds):
            for name, context in (("unmerged", unmerged), ("merged", merged)):
                conversion.token_rows_merged = context  # what DiffusionLM.generate enters
                start = time.perf_counter()
                outputs[name] = model.generate(**inputs, max_new_tokens=args.max_new_tokens, **kwargs)
                best[name] = min(best.get(name, float("inf")), time.perf_counter() - start)
        conversion.token_rows_merged = merged
        tokens = outputs["merged"].shape[1] - inputs["input_ids"].shape[1]
        same = torch.equal(outputs["merged"], outputs["unmerged"])
        print(
            f"{label:26} unmerged {tokens / best['unmerged']:5.1f} tok/s  merged {tokens / best['merged']:5.1f} tok/s  "
            f"({best['unmerged'] / best['merged']:.2f}x)  same tokens: {same}"
        )


if __name__ == "__main__":
    main()
