"""The replication scripts (`benchmarks/replication/`) on the real stories260K checkpoint: cheap checks of what the
figures in `docs/replication.md` rest on. Skipped when `../shared` is absent."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from conftest import DATA, STORIES_260K

REPLICATION = Path(__file__).resolve().parents[1] / "benchmarks" / "replication"

pytestmark = pytest.mark.skipif(
    not (STORIES_260K.exists() and (DATA / "tinystories_sample.txt").exists()),
    reason="needs ../shared/models/stories260K and ../shared/data/tinystories_sample.txt",
)


@pytest.fixture(scope="module")
def common():
    sys.path.insert(0, str(REPLICATION))
    try:
        import common

        yield common
    finally:
        sys.path.remove(str(REPLICATION))


def test_infilling_items_cut_the_middle_sentence_at_token_boundaries(common):
    from infilling import infilling_items

    tokenizer = common.load_tokenizer()
    stories = common.real_stories()
    items = infilling_items(stories, tokenizer, limit=10)
    assert items
    for item in items:
        # prefix + middle + suffix is a contiguous run of the story's own tokens, from its start
        pieces = item["prefix"] + item["middle"] + item["suffix"]
        story_ids = next(
            ids
            for ids in (tokenizer(" ".join(story.split()), add_special_tokens=False)["input_ids"] for story in stories)
            if ids[: len(pieces)] == pieces
        )
        assert story_ids[: len(pieces)] == pieces
        middle = tokenizer.decode(item["middle"]).strip()
        assert middle[0].isupper() or middle[0] in '"“', middle  # starts a sentence
        assert middle[-1] in '.!?"”', middle  # and ends one


def test_adapted_checkpoint_beats_random_init_at_the_same_budget(common, tmp_path):
    """Claim (a) in miniature: 12 steps on the five real stories, same batches; the AR-initialised diffusion LM ends
    far below the randomly initialised one, and both actually trained."""
    torch.set_num_threads(1)
    stories = common.real_stories()
    corpus = common.Corpus(train=stories * 8, heldout=stories, real=stories)
    curves = {}
    for init in ("ar", "random"):
        spec = common.RunSpec(
            name=init, init=init, max_steps=12, batch_size=8, max_length=64, warmup_steps=2, eval_steps=12
        )
        _, curves[init] = common.train(spec, corpus, tmp_path / init)
    start = {init: curve[0]["eval_nll_bound"] for init, curve in curves.items()}
    end = {init: curve[-1]["eval_nll_bound"] for init, curve in curves.items()}
    assert [point["step"] for point in curves["ar"]] == [0, 12]
    assert end["ar"] < start["ar"] - 0.5  # the conversion trains
    assert end["random"] < start["random"]
    assert end["ar"] < end["random"] - 0.5  # and the pretrained weights are worth a lot at equal budget
