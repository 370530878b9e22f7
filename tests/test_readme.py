"""README.md's Python examples run as written, in order, in one namespace, and give sensible output.

Every ```python block of README.md is executed (a new block is picked up automatically) on the real stories260K
checkpoint, with these documented changes, made on the parsed code (nothing else is changed):

- `path = ...` names a copy of `../shared/models/stories260K` that has a chat template (the user's words after BOS)
  and a padding token (stories260K has neither); skipped when the checkpoint is absent;
- sizes shrink so the test stays fast: `max_new_tokens=16`, `num_examples=2`; `DiffusionTrainingConfig` gets
  `max_steps=1`; `self_distilled_dataset` takes the base-model path on two short texts (`chat=False`; Magpie on a
  260K-parameter story model finds no instruction, and `tests/test_data.py` covers that path);
- the working directory is a temporary folder (the examples write `out/`), and so is `PEFT_DIFFUSION_CACHE`.

After each block the checks keyed by a line of it run (the outputs are right, not just produced); every check must
run, so a README rewrite that drops an example fails here until the check is updated.
"""

from __future__ import annotations

import ast
import re
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

README = Path(__file__).resolve().parents[1] / "README.md"
# {name: value}: a top-level `name = ...` in the README is replaced by this value (see the module docstring).
ASSIGNMENTS: dict[str, object] = {}  # `path` is filled in by the test (a temporary folder)
# {keyword: value}: replaced wherever a README call passes this keyword.
KEYWORDS = {"max_new_tokens": 16, "num_examples": 2}
# {callee: {keyword: value}}: added to (or replaced in) every README call of that function or method.
EXTRA_KEYWORDS = {
    "DiffusionTrainingConfig": {"max_steps": 1, "report_to": "none", "disable_tqdm": True},
    "self_distilled_dataset": {
        "chat": False,
        "texts": ["Once upon a time there was a little girl named Lily. ", "Tom had a big red ball. "],
        "prompt_tokens": 6,
        "min_distinct2": 0.0,
        "max_repeats": 100,
        "progress": False,
    },
}
CHAT_TEMPLATE = "{{ bos_token }}{% for message in messages %}{{ message['content'] }}{% endfor %}"


def python_blocks(text: str) -> list[tuple[int, str]]:
    """`(first line, code)` of every ```python block, in order."""
    return [
        (text.count("\n", 0, match.start()) + 2, match.group(1))
        for match in re.finditer(r"^```python\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)
    ]


def _literal(value) -> ast.expr:
    return ast.parse(repr(value), mode="eval").body


class _Smaller(ast.NodeTransformer):
    """The documented changes of the module docstring, applied to a block's syntax tree."""

    def visit_Module(self, node: ast.Module) -> ast.Module:
        for statement in node.body:
            if (
                isinstance(statement, ast.Assign)
                and len(statement.targets) == 1
                and isinstance(statement.targets[0], ast.Name)
                and statement.targets[0].id in ASSIGNMENTS
            ):
                statement.value = _literal(ASSIGNMENTS[statement.targets[0].id])
        self.generic_visit(node)
        return node

    def visit_Call(self, node: ast.Call) -> ast.Call:
        self.generic_visit(node)
        callee = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", None)
        replace = {**KEYWORDS, **EXTRA_KEYWORDS.get(callee, {})}
        for keyword in node.keywords:
            if keyword.arg in replace:
                keyword.value = _literal(replace[keyword.arg])
        given = {keyword.arg for keyword in node.keywords}
        for name, value in EXTRA_KEYWORDS.get(callee, {}).items():
            if name not in given:
                node.keywords.append(ast.keyword(arg=name, value=_literal(value)))
        return node


# ---------------------------------------------------------------------------------------------------------------
# Checks, each keyed by a line of the block it checks
# ---------------------------------------------------------------------------------------------------------------


def check_quick_start(ns: dict) -> None:
    """A forward on x_t gives finite [1, L, V] logits, the loss is a positive finite number, and the saved and
    reloaded model gives the same logits (eval mode, the same mask token)."""
    from peft_diffusion import DiffusionLM

    input_ids, logits, model = ns["input_ids"], ns["logits"], ns["model"]
    assert isinstance(model, DiffusionLM) and not model.training
    is_changed = ns["noisy_ids"] != input_ids  # an x_t: only mask tokens differ from x_0
    assert (ns["noisy_ids"][is_changed] == model.config.mask_token_id).all()
    assert logits.shape == (1, input_ids.shape[1], model.causal_lm.config.vocab_size)
    assert torch.isfinite(logits).all()
    assert torch.isfinite(ns["loss"]) and ns["loss"] > 0
    assert (Path("out") / "diffusion_config.json").is_file() and (Path("out") / "adapter_config.json").is_file()
    with torch.no_grad():
        reloaded = model(input_ids=ns["noisy_ids"], attention_mask=ns["attention_mask"]).logits
    torch.testing.assert_close(reloaded, logits, rtol=1e-5, atol=1e-5)


def check_generate(ns: dict) -> None:
    """Chat-template prompts, left-padded; the answer follows the prompt unchanged, holds no mask token, decodes."""
    out, batch, tokenizer, model = ns["out"], ns["batch"], ns["tokenizer"], ns["model"]
    prompt_ids = batch["input_ids"]  # [2, P]
    assert prompt_ids.shape[0] == 2 and (batch["attention_mask"][:, -1] == 1).all()  # left padding
    assert (prompt_ids[batch["attention_mask"].bool()] != tokenizer.pad_token_id).any()
    assert prompt_ids[0, batch["attention_mask"][0].argmax()] == tokenizer.bos_token_id  # the template's BOS, once
    assert out.shape == (2, prompt_ids.shape[1] + KEYWORDS["max_new_tokens"])
    assert torch.equal(out[:, : prompt_ids.shape[1]], prompt_ids)
    assert not (out[:, prompt_ids.shape[1] :] == model.config.mask_token_id).any()
    assert isinstance(ns["text"], list) and len(ns["text"]) == 2 and all(isinstance(t, str) for t in ns["text"])
    assert any(answer.strip() for answer in ns["text"])


def check_speculative(ns: dict) -> None:
    """The README's claim: greedy speculative output == the base's HF greedy `generate`, token for token."""
    batch, out = ns["batch"], ns["out"]
    expected = ns["original"].generate(**batch, max_new_tokens=KEYWORDS["max_new_tokens"], do_sample=False)
    assert torch.equal(out.sequences, expected)
    assert out.base_forwards >= 1 and out.drafter_forwards >= 1
    again = ns["model"].generate(**batch, max_new_tokens=KEYWORDS["max_new_tokens"], speculative=True)
    assert torch.equal(again, expected)


def check_trainer(ns: dict) -> None:
    """One optimizer step on the one-row dataset, with a finite loss."""
    trainer = ns["trainer"]
    assert trainer.state.global_step == 1
    losses = [entry["train_loss"] for entry in trainer.state.log_history if "train_loss" in entry]
    assert losses and all(torch.isfinite(torch.tensor(loss)) for loss in losses)


def check_self_distilled(ns: dict) -> None:
    """Prompt-completion rows continued by the base model, with their statistics."""
    from peft_diffusion import DistillationStats

    dataset = ns["dataset"]
    assert set(dataset.column_names) >= {"prompt", "completion"} and len(dataset) >= 1
    assert all(row["completion"].strip() for row in dataset)
    stats = DistillationStats.from_dataset(dataset)
    assert stats.kept == len(dataset) and stats.attempted >= stats.kept


CHECKS = {
    "model = DiffusionLM.from_pretrained(": check_quick_start,
    "text = tokenizer.batch_decode(": check_generate,
    "verifier=original": check_speculative,
    "trainer.train()": check_trainer,
    "self_distilled_dataset(base": check_self_distilled,
}


@pytest.fixture
def chat_stories(stories_path, tmp_path):
    """stories260K with a chat template and a padding token (it has neither), in a folder of its own."""
    folder = tmp_path / "stories260K-chat"
    shutil.copytree(stories_path, folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_readme_python_examples_run_and_give_sensible_output(chat_stories, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("PEFT_DIFFUSION_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(ASSIGNMENTS, "path", chat_stories)
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= len(CHECKS)
    torch.manual_seed(0)
    namespace: dict = {"__name__": "readme"}
    ran = set()
    for line, code in blocks:
        tree = ast.fix_missing_locations(_Smaller().visit(ast.parse(code)))
        exec(compile(tree, f"README.md, the block at line {line}", "exec"), namespace)
        for key, check in CHECKS.items():
            if key in code:
                check(namespace)
                ran.add(key)
    assert ran == set(CHECKS), f"README examples without their check: {sorted(set(CHECKS) - ran)}"


def test_the_path_binding_replaces_only_the_assignment():
    """The rewriting keeps the README's code: only `path = ...` and the listed keywords change."""
    code = 'path = "somewhere"\nf(path, max_new_tokens=128, steps=64)\nDiffusionTrainingConfig(output_dir="out")\n'
    ASSIGNMENTS["path"] = "/here"
    try:
        rewritten = ast.unparse(_Smaller().visit(ast.parse(code)))
    finally:
        del ASSIGNMENTS["path"]
    assert rewritten.splitlines() == [
        "path = '/here'",
        "f(path, max_new_tokens=16, steps=64)",
        "DiffusionTrainingConfig(output_dir='out', max_steps=1, report_to='none', disable_tqdm=True)",
    ]


def test_original_model_loads(chat_stories):
    """The binding is the real checkpoint: greedy text from it is the known TinyStories opening."""
    tokenizer = AutoTokenizer.from_pretrained(chat_stories)
    model = AutoModelForCausalLM.from_pretrained(chat_stories).eval()
    out = model.generate(**tokenizer(["Once upon a time"], return_tensors="pt"), max_new_tokens=8, do_sample=False)
    assert tokenizer.decode(out[0], skip_special_tokens=True).startswith("Once upon a time, there was a little")
