"""Draft trees for speculative decoding: the tree a round verifies (best-first over the drafter's candidates), the
tree attention pattern, the base's greedy path through a tree, and end to end: the base's HF greedy output, more
accepted tokens than the chain, exact caches."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import MASK_ID
from test_speculation import Oracle, base_and_model, check_caches, inputs, oracle_texts

from peft_diffusion.attention import AttentionLayout
from peft_diffusion.draft_tree import DraftTree, build_draft_tree, greedy_tree_acceptance
from peft_diffusion.speculation import _Speculator


def candidates(batch, width, num_candidates, seed=0):
    """Random per-slot candidates, best first: distinct token ids per slot, log-probabilities sorted descending."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(50, generator=generator)[:num_candidates] for _ in range(batch * width)]).view(
        batch, width, num_candidates
    )
    logp = -torch.rand(batch, width, num_candidates, generator=generator).mul(4).cumsum(-1)
    return ids, logp


def paths(tree: DraftTree, row: int) -> set[tuple]:
    """The token path of every valid node of a row."""
    found = set()
    for node in range(tree.tokens.shape[1]):
        if not tree.valid[row, node]:
            continue
        path, current = [], node
        while current >= 0:
            path.append(int(tree.tokens[row, current]))
            current = int(tree.parents[row, current])
        found.add(tuple(reversed(path)))
    return found


# ----------------------------------------------------------------------------------------------------------------------
# Building the tree
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [3, 7, 16, 40])
def test_the_tree_is_the_best_prefix_closed_set(size):
    """With the chain = each slot's best candidate, the tree is the chain and then exactly the `size - W` other paths
    of highest summed log-probability (brute force over every path; a top-k by score is prefix-closed since scores
    fall with depth); parents come first, ancestors are the transitive closure."""
    width, num_candidates = 3, 4
    ids, logp = candidates(2, width, num_candidates)
    drafts, draft_logp = ids[..., 0], logp[..., 0]
    tree = build_draft_tree(drafts, torch.tensor([width, width]), ids, logp, draft_logp, size, pad_id=0)
    for row in range(2):
        scored = []
        for depth in range(1, width + 1):
            for ranks in itertools.product(range(num_candidates), repeat=depth):
                score = sum(float(logp[row, slot, rank]) for slot, rank in enumerate(ranks))
                scored.append((score, tuple(int(ids[row, slot, rank]) for slot, rank in enumerate(ranks))))
        chain = {tuple(int(token) for token in drafts[row, :depth]) for depth in range(1, width + 1)}
        others = [path for _, path in sorted(scored, reverse=True) if path not in chain]
        expected = chain | set(others[: size - width])
        assert paths(tree, row) == expected
        assert int(tree.valid[row].sum()) == min(size, len(scored))
        for node in range(size):
            parent = int(tree.parents[row, node])
            assert parent < node
            assert int(tree.depths[row, node]) == (0 if parent < 0 else int(tree.depths[row, parent]) + 1)
            expected_ancestors = {node}
            while parent >= 0:
                expected_ancestors.add(parent)
                parent = int(tree.parents[row, parent])
            assert set(tree.ancestors[row, node].nonzero()[:, 0].tolist()) == expected_ancestors


def test_the_chain_comes_first_even_when_unlikely_and_slots_limit_depth():
    ids, logp = candidates(3, 4, 3, seed=1)
    drafts = torch.full((3, 4), 60)  # not among the candidates: a chain the drafter finds unlikely
    draft_logp = torch.full((3, 4), -30.0)
    slots = torch.tensor([4, 2, 0])  # row 2 is finished
    tree = build_draft_tree(drafts, slots, ids, logp, draft_logp, 9, pad_id=7, excluded_id=int(ids[0, 0, 0]))
    for row, count in ((0, 4), (1, 2)):
        assert tree.tokens[row, :count].tolist() == [60] * count
        assert tree.parents[row, :count].tolist() == list(range(-1, count - 1))
        assert int(tree.depths[row][tree.valid[row]].max()) == count - 1
    assert int(tree.valid[1].sum()) == 9  # depth 2 holds enough paths
    assert not bool(tree.valid[2].any()) and bool((tree.tokens[2] == 7).all())
    assert int(ids[0, 0, 0]) not in tree.tokens[0][tree.valid[0] & (tree.depths[0] == 0)].tolist()


def test_greedy_acceptance_walks_the_base_path():
    """Two rows by hand: root children 5 and 6; 6 has children 8 and 9; 9 has child 4."""
    tokens = torch.tensor([[5, 6, 8, 9, 4], [5, 6, 8, 9, 4]])
    parents = torch.tensor([[-1, -1, 1, 1, 3], [-1, -1, 1, 1, 3]])
    depths = torch.tensor([[0, 0, 1, 1, 2], [0, 0, 1, 1, 2]])
    valid = torch.ones(2, 5, dtype=torch.bool)
    ancestors = torch.eye(5, dtype=torch.bool).repeat(2, 1, 1)
    for node, parent in enumerate(parents[0].tolist()):
        if parent >= 0:
            ancestors[:, node] |= ancestors[:, parent]
    tree = DraftTree(tokens, parents, depths, valid, ancestors)
    # Row 0: the base says 6, then 9, then 4, then 2: all three levels kept, 2 is its own token.
    # Row 1: the base says 6, then 7 (no such child): one kept, 7 next.
    root_target = torch.tensor([6, 6])
    node_target = torch.tensor([[0, 9, 0, 4, 2], [0, 7, 0, 4, 2]])
    path, accepted, next_token = greedy_tree_acceptance(tree, root_target, node_target, width=3, pad_id=0)
    assert path.tolist() == [[6, 9, 4], [6, 0, 0]]
    assert accepted.tolist() == [3, 1]
    assert next_token[:, 0].tolist() == [2, 7]
    # No root child matches: nothing kept, the base's own token.
    path, accepted, next_token = greedy_tree_acceptance(tree, torch.tensor([3, 3]), node_target, width=3, pad_id=0)
    assert accepted.tolist() == [0, 0] and next_token[:, 0].tolist() == [3, 3]


def test_tree_attention_pattern():
    """Context causal; a node sees the whole context and its ancestors only."""
    context, ancestors = 3, torch.tensor([[[1, 0, 0], [0, 1, 0], [0, 1, 1]]], dtype=torch.bool)
    positions = torch.tensor([[0, 1, 2, 3, 3, 4]])
    layout = AttentionLayout("tree", positions, torch.zeros_like(positions), ancestors=ancestors)
    expected = torch.zeros(6, 6, dtype=torch.bool)
    expected[:context, :context] = torch.ones(context, context, dtype=torch.bool).tril()
    expected[context:, :context] = True
    expected[context:, context:] = ancestors[0]
    assert torch.equal(layout.dense()[0], expected)
    with pytest.raises(ValueError, match="ancestors"):
        AttentionLayout("tree", positions, torch.zeros_like(positions))


# ----------------------------------------------------------------------------------------------------------------------
# End to end
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize(("block_length", "tree_size"), [(2, 2), (4, 12), (8, 24)])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "gemma"])
def test_tree_greedy_equals_base_generate(arch, block_length, tree_size, batch):
    reference, model = base_and_model(arch)
    expected = reference.generate(**inputs(batch), max_new_tokens=12, do_sample=False)
    out = model.generate(
        **inputs(batch),
        max_new_tokens=12,
        speculative=True,
        block_length=block_length,
        tree_size=tree_size,
        return_dict_in_generate=True,
    )
    assert torch.equal(out.sequences, expected)
    assert out.base_forwards == len(out.accepted) == out.drafter_forwards


class TreeOracle(Oracle):
    """The chain oracle (the base's continuation, wrong at random slots), and candidates that hold the right token
    second wherever the chain is wrong: a tree finds paths the chain misses."""

    def __call__(self, speculator, ends, slots, lowest, end):
        drafts, q = super().__call__(speculator, ends, slots, lowest, end)
        width = drafts.shape[1]
        columns = (ends[:, None] + torch.arange(width)).clamp(max=self.continuation.shape[1] - 1)
        truth = self.continuation.gather(1, columns)  # [B, W]
        ids = speculator.candidate_ids.clone()
        ids[..., 0] = drafts
        ids[..., 1] = torch.where(drafts == truth, (truth + 2) % MASK_ID, truth)
        speculator.candidate_ids = ids
        speculator.candidate_logp = torch.tensor([-0.1, -1.0] + [-9.0] * (ids.shape[-1] - 2)).expand(ids.shape)
        speculator.draft_logp = torch.full(drafts.shape, -0.1)
        return drafts, q


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_tree_accepts_what_the_chain_misses_with_exact_caches(arch, batch, monkeypatch):
    reference, model = base_and_model(arch, block_size=4, init_lora_weights=True)
    block_length, max_new_tokens = 4, 20
    continuation, eos, expected = oracle_texts(reference, arch, batch, max_new_tokens, block_length)
    oracle = TreeOracle(continuation, error_rate=0.3)
    monkeypatch.setattr(_Speculator, "draft", lambda speculator, *args: oracle(speculator, *args))
    crop_base, checked = _Speculator.crop_base, []

    def crop_and_check(speculator):
        crop_base(speculator)
        if not bool(speculator.finished.all()):
            check_caches(speculator)
            checked.append(speculator.base_length)

    monkeypatch.setattr(_Speculator, "crop_base", crop_and_check)
    out = model.generate(
        **inputs(batch),
        max_new_tokens=max_new_tokens,
        speculative=True,
        block_length=block_length,
        tree_size=16,
        eos_token_id=eos,
        return_dict_in_generate=True,
    )
    assert torch.equal(out.sequences, expected)
    chain_accepted = torch.stack(oracle.expected_accepted)  # what the chain alone would keep each round
    open_rows = out.accepted >= 0
    # Never less than the chain, except in a row's last round (cut at EOS or max_new_tokens).
    finishing = torch.cat([out.accepted[1:] < 0, torch.ones_like(out.accepted[:1], dtype=torch.bool)])
    assert bool(((out.accepted >= chain_accepted) | finishing)[open_rows].all())
    assert bool((out.accepted[open_rows] > chain_accepted[open_rows]).any())  # the tree found more
    assert int(out.accepted.max()) == block_length
    assert len(checked) >= 2 and checked[-1] > checked[0]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(tree_size=2, block_length=4), "tree_size.*>= block_length=4"),
        (dict(tree_size=True), "tree_size"),
        (dict(tree_size=8, do_sample=True), "greedy decoding only"),
    ],
)
def test_tree_bad_input(kwargs, match):
    _, model = base_and_model("llama")
    with pytest.raises(ValueError, match=match):
        model.generate(**inputs(1), max_new_tokens=4, speculative=True, **kwargs)


def test_tree_size_needs_speculative():
    _, model = base_and_model("llama")
    with pytest.raises(ValueError, match="speculative=True"):
        model.generate(**inputs(1), max_new_tokens=4, tree_size=8)
