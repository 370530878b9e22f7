"""Instruction-tune a diffusion LM on prompt/completion or chat data: the prompt stays clean, only the answer is noised.

    python examples/sft.py --model_name_or_path stories260K-diffusion \
        --dataset_name ../shared/data/gsm8k_train.jsonl --prompt_column question --completion_column answer \
        --max_steps 100 --per_device_train_batch_size 8 --max_length 256 --output_dir sft-out --report_to none

`--model_name_or_path` is a converted diffusion LM (a folder with `diffusion_config.json`, e.g. from
`examples/convert.py`; training continues on its adapter), or a causal LM, converted here with the `--attention`,
`--block_size` and `--shift` settings. Data: a local `.json`/`.jsonl` or a `datasets` id with `prompt`/`completion`
columns (or renamed from `--prompt_column`/`--completion_column`), or a `messages` column (pass
`--assistant_only_loss` with a chat template that marks assistant turns with `{% generation %}`).
`--eos_policy all` makes the padding after each answer EOS targets (LLaDA SFT, for full-canvas decoding).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from datasets import load_dataset
from transformers import AutoTokenizer
from trl import ModelConfig, TrlParser, get_peft_config, get_quantization_config

from peft_diffusion import DiffusionConfig, DiffusionLM, DiffusionTrainer, DiffusionTrainingConfig


@dataclass
class SFTScriptArguments:
    dataset_name: str = field(
        default="../shared/data/gsm8k_train.jsonl",
        metadata={"help": "A local .json / .jsonl file or a `datasets` id."},
    )
    dataset_split: str = field(default="train", metadata={"help": "Split of a `datasets` id."})
    prompt_column: str = field(default="prompt", metadata={"help": "Column renamed to `prompt`."})
    completion_column: str = field(default="completion", metadata={"help": "Column renamed to `completion`."})
    attention: str = field(default="block", metadata={"help": "Attention pattern when converting a causal LM."})
    block_size: int = field(default=32, metadata={"help": "Tokens per block when converting a causal LM."})
    shift: bool = field(default=True, metadata={"help": "DiffuLLaMA's shift when converting a causal LM."})


def load_data(args: SFTScriptArguments):
    path = Path(args.dataset_name)
    if path.suffix in (".json", ".jsonl") and path.is_file():
        dataset = load_dataset("json", data_files=str(path), split="train")
    else:
        dataset = load_dataset(args.dataset_name, split=args.dataset_split)
    if "messages" in dataset.column_names:
        return dataset
    renames = {args.prompt_column: "prompt", args.completion_column: "completion"}
    dataset = dataset.rename_columns({k: v for k, v in renames.items() if k != v and k in dataset.column_names})
    # TRL tokenizes prompt + completion as one string: make sure they are separated.
    return dataset.map(
        lambda ex: {"completion": ex["completion"] if ex["completion"][:1].isspace() else " " + ex["completion"]}
    )


def main():
    parser = TrlParser((SFTScriptArguments, DiffusionTrainingConfig, ModelConfig))
    script_args, training_args, model_args = parser.parse_args_and_config()
    dataset = load_data(script_args)
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    model_kwargs = {"attn_implementation": model_args.attn_implementation or "sdpa"}
    if model_args.dtype not in (None, "auto"):
        model_kwargs["dtype"] = getattr(torch, model_args.dtype)

    if os.path.isfile(os.path.join(model_args.model_name_or_path, "diffusion_config.json")):
        model = DiffusionLM.from_pretrained(model_args.model_name_or_path, is_trainable=True, **model_kwargs)
        conversion = {}
    else:
        model = model_args.model_name_or_path
        training_args.model_init_kwargs = model_kwargs
        conversion = dict(
            diffusion_config=DiffusionConfig(
                attention=script_args.attention, block_size=script_args.block_size, shift=script_args.shift
            ),
            peft_config=get_peft_config(model_args),
            quantization_config=get_quantization_config(model_args),
        )
    trainer = DiffusionTrainer(
        model, args=training_args, train_dataset=dataset, processing_class=tokenizer, **conversion
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    if training_args.push_to_hub:
        trainer.push_to_hub()


if __name__ == "__main__":
    main()
