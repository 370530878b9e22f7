"""Two-process training under `accelerate launch --multi_gpu --num_processes 2` on CPU (run by tests/test_trainer.py).

Each rank writes `rank{i}.json` (world size, steps, whether its weights changed, a weight checksum, the message of a
`KeyboardInterrupt` from `train()`); every call of `save_pretrained` appends the saving rank to `saves.log`. With a
second argument `interrupt`, rank 0 alone presses Ctrl-C during step 2 of 4.
"""

import json
import sys
from pathlib import Path

import torch
from conftest import tiny_causal_lm
from test_model import word_tokenizer
from test_trainer import CtrlC, dataset, lora, training_args

from peft_diffusion import DiffusionConfig
from peft_diffusion.trainer import DiffusionTrainer

torch.set_num_threads(1)
root = Path(sys.argv[1])
interrupt = sys.argv[2:] == ["interrupt"]
trainer = DiffusionTrainer(
    tiny_causal_lm("llama"),
    args=training_args(root, max_steps=4 if interrupt else 2, per_device_train_batch_size=2, packing=True),
    train_dataset=dataset("text", n=16),
    processing_class=word_tokenizer(),
    diffusion_config=DiffusionConfig(attention="block", block_size=4),
    peft_config=lora(),
)
model = trainer.model
rank = trainer.accelerator.process_index
save_pretrained = model.save_pretrained


def logged_save(*args, **kwargs):
    with open(root / "saves.log", "a") as log:
        log.write(f"{rank}\n")
    return save_pretrained(*args, **kwargs)


model.save_pretrained = logged_save
before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
if interrupt and rank == 0:
    trainer.add_callback(CtrlC(step=2))
interrupted = None
try:
    trainer.train()
except KeyboardInterrupt as error:
    interrupted = str(error)
trainer.save_model(str(root / "out" / "final"))
changed = any(not torch.equal(p.detach(), before[n]) for n, p in model.named_parameters() if n in before)
checksum = sum(float(p.detach().double().sum()) for n, p in model.named_parameters() if n in before)
report = {
    "world_size": trainer.accelerator.num_processes,
    "global_step": trainer.state.global_step,
    "changed": changed,
    "checksum": checksum,
    "interrupted": interrupted,
}
(root / f"rank{rank}.json").write_text(json.dumps(report))
