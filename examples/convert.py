"""Convert a causal checkpoint into a masked diffusion LM by continued training on plain text.

    python examples/convert.py --model_name_or_path ../shared/models/stories260K \
        --dataset_name ../shared/data/tinystories_sample.txt --num_self_samples 256 \
        --attention block --block_size 16 --shift false --use_peft --lora_r 64 --lora_target_modules all-linear \
        --max_steps 200 --per_device_train_batch_size 8 --max_length 128 --packing --learning_rate 1e-3 \
        --output_dir stories260K-diffusion --report_to none

Recipes: `recipes/*.yaml` hold the DiffuLLaMA and Efficient-DLM settings (`--config recipes/efficient_dlm.yaml`);
`recipes/README.md` has the `accelerate launch` commands for several GPUs.

Data: `--dataset_name` is a local `.txt` (one document per blank-line-separated paragraph, or per line), a local
`.json`/`.jsonl` with a `text` column, or a `datasets` id. `--num_self_samples N` adds N texts sampled from the causal
model itself before conversion (self-distillation data that matches the model's own distribution).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from datasets import Dataset, load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import ModelConfig, TrlParser, get_peft_config, get_quantization_config

from peft_diffusion import DiffusionConfig, DiffusionTrainer, DiffusionTrainingConfig


@dataclass
class ConversionArguments:
    dataset_name: str = field(
        default="../shared/data/tinystories_sample.txt",
        metadata={"help": "A local .txt / .json / .jsonl file, or a `datasets` id."},
    )
    dataset_split: str = field(default="train", metadata={"help": "Split of a `datasets` id."})
    eval_fraction: float = field(default=0.1, metadata={"help": "Fraction of the texts held out for evaluation."})
    num_self_samples: int = field(default=0, metadata={"help": "Texts sampled from the causal model and added."})
    self_sample_tokens: int = field(default=192, metadata={"help": "Length of each self-sampled text."})
    attention: str = field(default="block", metadata={"help": "'block', 'bidirectional' or 'annealed'."})
    block_size: int = field(default=32, metadata={"help": "Tokens per block (attention='block')."})
    clean_context: bool = field(default=True, metadata={"help": "Two-stream [x_t ; x_0] training under blocks."})
    shift: bool = field(default=True, metadata={"help": "Keep the AR alignment (DiffuLLaMA's shift)."})
    masking: str = field(default="uniform", metadata={"help": "'uniform' or 'position_dependent'."})
    masking_strength: float = field(default=0.0, metadata={"help": "Strength of position-dependent masking."})


def load_texts(name: str, split: str) -> Dataset:
    path = Path(name)
    if path.suffix == ".txt" and path.is_file():
        raw = path.read_text(encoding="utf-8")
        chunks = [c.strip() for c in raw.split("\n\n")] if "\n\n" in raw else raw.splitlines()
        return Dataset.from_dict({"text": [c for c in chunks if c]})
    if path.suffix in (".json", ".jsonl") and path.is_file():
        return load_dataset("json", data_files=str(path), split="train")
    return load_dataset(name, split=split)


@torch.no_grad()
def self_samples(model, tokenizer, count: int, length: int, seed: int) -> list[str]:
    """Stories sampled from the causal model itself (from BOS, temperature 1)."""
    torch.manual_seed(seed)
    bos = torch.full((min(count, 64), 1), tokenizer.bos_token_id)
    texts = []
    while len(texts) < count:
        out = model.generate(bos, do_sample=True, max_new_tokens=length, pad_token_id=tokenizer.eos_token_id)
        texts += tokenizer.batch_decode(out, skip_special_tokens=True)
    return [t.strip() for t in texts[:count] if t.strip()]


def main():
    parser = TrlParser((ConversionArguments, DiffusionTrainingConfig, ModelConfig))
    script_args, training_args, model_args = parser.parse_args_and_config()

    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    dataset = load_texts(script_args.dataset_name, script_args.dataset_split)
    if script_args.num_self_samples:
        causal = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path).eval()
        texts = self_samples(
            causal, tokenizer, script_args.num_self_samples, script_args.self_sample_tokens, training_args.seed
        )
        dataset = Dataset.from_dict({"text": list(dataset["text"]) + texts})
    split = dataset.train_test_split(test_size=script_args.eval_fraction, seed=training_args.seed)
    print(f"{len(split['train'])} training texts, {len(split['test'])} held out")

    model_kwargs = {"attn_implementation": model_args.attn_implementation or "sdpa"}
    if model_args.dtype not in (None, "auto"):
        model_kwargs["dtype"] = getattr(torch, model_args.dtype)
    training_args.model_init_kwargs = model_kwargs
    trainer = DiffusionTrainer(
        model_args.model_name_or_path,
        args=training_args,
        train_dataset=split["train"],
        eval_dataset=split["test"],
        processing_class=tokenizer,
        diffusion_config=DiffusionConfig(
            attention=script_args.attention,
            block_size=script_args.block_size,
            clean_context=script_args.clean_context,
            shift=script_args.shift,
            masking=script_args.masking,
            masking_strength=script_args.masking_strength,
        ),
        peft_config=get_peft_config(model_args),
        quantization_config=get_quantization_config(model_args),
    )
    before = trainer.evaluate()
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    after = trainer.evaluate()
    for name, metrics in (("before", before), ("after", after)):
        print(
            f"{name}: eval NLL bound {metrics['eval_nll_bound']:.3f} nats/token "
            f"(perplexity bound {math.exp(metrics['eval_nll_bound']):.1f}), masked CE {metrics['eval_masked_ce']:.3f}"
        )
    trainer.save_model(training_args.output_dir)
    if training_args.push_to_hub:
        trainer.push_to_hub()


if __name__ == "__main__":
    main()
