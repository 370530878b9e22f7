"""Draft trees: several candidate continuations of a speculative draft, verified by one base forward.

A one-shot diffusion draft gives, at each of its `W` slots, a distribution over tokens. The chain draft keeps the
drafted token of each slot; when the base rejects slot `i`, the second or third candidate there was often right.
A draft tree keeps the best `N` candidate paths instead: the chain, then the paths with the highest summed
log-probability under the drafter's per-slot distributions (best-first, as the static trees of Medusa,
arXiv:2401.10774, and the dynamic ones of EAGLE-2, arXiv:2406.16858, treat per-position candidates). The base scores
every node in one causal forward under the `"tree"` attention pattern (`attention.py`): each node sees the committed
text and its own ancestors, at position `committed length + depth`, so its logits are those the base gives the last
token of its path. Greedy acceptance walks down from the root: a child is kept when its token is the base's argmax
after its parent; the deepest kept node's argmax is the base's own next token. The output is the base's greedy text
whatever the tree holds; a bigger tree only accepts more per forward (and pays for more LM-head rows).

Shapes (`B` rows, `W` slots, `K` candidates per slot, `N` nodes):

| name             | shape       | meaning                                                                     |
|------------------|-------------|-----------------------------------------------------------------------------|
| `candidate_ids`  | `[B, W, K]` | each slot's `K` most likely tokens under the drafter, best first              |
| `candidate_logp` | `[B, W, K]` | their log-probabilities                                                      |
| `draft_logp`     | `[B, W]`    | log-probability of the drafted (chain) token of each slot                    |
| `tokens`         | `[B, N]`    | node tokens                                                                  |
| `parents`        | `[B, N]`    | parent node, -1 for a child of the last committed token (parents come first) |
| `depths`         | `[B, N]`    | slot of the node (0: the first draft position)                               |
| `valid`          | `[B, N]`    | real node (False: padding of a row with fewer nodes, never accepted)         |
| `ancestors`      | `[B, N, N]` | `ancestors[b, i, j]`: node `j` is node `i` or one of its ancestors           |
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass

import torch

__all__ = ["DraftTree", "build_draft_tree", "greedy_tree_acceptance"]


@dataclass
class DraftTree:
    """The nodes of one round's draft trees, one tree per row (module docstring, shapes)."""

    tokens: torch.Tensor
    parents: torch.Tensor
    depths: torch.Tensor
    valid: torch.Tensor
    ancestors: torch.Tensor

    def to(self, device) -> DraftTree:
        return DraftTree(
            self.tokens.to(device),
            self.parents.to(device),
            self.depths.to(device),
            self.valid.to(device),
            self.ancestors.to(device),
        )


def build_draft_tree(
    drafts: torch.Tensor,
    slots: torch.Tensor,
    candidate_ids: torch.Tensor,
    candidate_logp: torch.Tensor,
    draft_logp: torch.Tensor,
    size: int,
    pad_id: int,
    excluded_id: int | None = None,
) -> DraftTree:
    """Each row's tree of `size` nodes: its chain draft (`drafts[b, :slots[b]]`), then the candidate paths of highest
    summed log-probability, best first, prefix-closed (a node's parent is always in the tree).

    Args:
        drafts (`torch.LongTensor` of shape `(B, W)`): the chain draft.
        slots (`torch.LongTensor` of shape `(B,)`): draft slots of each row (0 for a finished row: no node).
        candidate_ids, candidate_logp (`(B, W, K)`): each slot's best candidates and their log-probabilities.
        draft_logp (`(B, W)`): log-probability of each chain token.
        size (`int`): nodes per row (`N`), at least `W`; rows with fewer possible nodes are padded with invalid ones.
        pad_id (`int`): the token of padding nodes.
        excluded_id (`int`, *optional*): a token never proposed (the mask token).
    """
    batch_size = candidate_ids.shape[0]
    drafts_list, slots_list = drafts.tolist(), slots.tolist()
    ids_list, logp_list, draft_logp_list = candidate_ids.tolist(), candidate_logp.tolist(), draft_logp.tolist()
    tokens = [[pad_id] * size for _ in range(batch_size)]
    parents = [[-1] * size for _ in range(batch_size)]
    depths = [[0] * size for _ in range(batch_size)]
    valid = [[False] * size for _ in range(batch_size)]
    ancestors = torch.zeros(batch_size, size, size, dtype=torch.bool)
    ancestors[:, torch.arange(size), torch.arange(size)] = True  # padding nodes see themselves and the context
    for row in range(batch_size):
        nodes = _row_nodes(
            drafts_list[row], draft_logp_list[row], ids_list[row], logp_list[row], slots_list[row], size, excluded_id
        )
        for node, (token, parent, depth) in enumerate(nodes):
            tokens[row][node], parents[row][node], depths[row][node], valid[row][node] = token, parent, depth, True
            if parent >= 0:
                ancestors[row, node] |= ancestors[row, parent]
    return DraftTree(
        tokens=torch.tensor(tokens, dtype=torch.long),
        parents=torch.tensor(parents, dtype=torch.long),
        depths=torch.tensor(depths, dtype=torch.long),
        valid=torch.tensor(valid, dtype=torch.bool),
        ancestors=ancestors,
    ).to(drafts.device)


def _row_nodes(
    chain: list[int],
    chain_logp: list[float],
    ids: list[list[int]],
    logp: list[list[float]],
    depth_limit: int,
    size: int,
    excluded_id: int | None,
) -> list[tuple[int, int, int]]:
    """One row's nodes as `(token, parent, depth)`, parents first: the chain, then best-first candidate paths."""
    index: dict[tuple, int] = {}  # path of tokens -> node
    scores: dict[tuple, float] = {(): 0.0}
    nodes: list[tuple[int, int, int]] = []
    heap: list = []  # (-score of the child, tie-break counter, parent path, rank of the child's token)
    counter = itertools.count()

    def add(path: tuple, score: float) -> None:
        index[path], scores[path] = len(nodes), score
        nodes.append((path[-1], index.get(path[:-1], -1), len(path) - 1))

    def push_child(path: tuple, rank: int) -> None:
        """Queue the best candidate child of `path` from `rank` on that is not yet a node."""
        slot = len(path)
        if slot >= depth_limit:
            return
        for candidate_rank in range(rank, len(ids[slot])):
            token = ids[slot][candidate_rank]
            if token != excluded_id and path + (token,) not in index:
                score = scores[path] + logp[slot][candidate_rank]
                heapq.heappush(heap, (-score, next(counter), path, candidate_rank))
                return

    path, score = (), 0.0
    for slot in range(min(depth_limit, size)):  # the chain first: a tree never accepts less than the chain
        path, score = path + (chain[slot],), score + chain_logp[slot]
        add(path, score)
    for path in [(), *index]:
        push_child(path, 0)
    while heap and len(nodes) < size:
        negative_score, _, path, rank = heapq.heappop(heap)
        child = path + (ids[len(path)][rank],)
        if child not in index:
            add(child, -negative_score)
            push_child(child, 0)
        push_child(path, rank + 1)
    return nodes


def greedy_tree_acceptance(
    tree: DraftTree, root_target: torch.Tensor, node_target: torch.Tensor, width: int, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The base's greedy path through each row's tree.

    Args:
        tree (`DraftTree`): the nodes.
        root_target (`torch.LongTensor` of shape `(B,)`): the base's argmax after the last committed token.
        node_target (`torch.LongTensor` of shape `(B, N)`): the base's argmax after each node.
        width (`int`): draft slots `W`.
        pad_id (`int`): filler of `path` after the accepted tokens.

    Returns:
        `(path [B, W], accepted [B], next_token [B, 1])`: the accepted tokens (then `pad_id`), how many, and the
        base's token after them.
    """
    parents = tree.parents.clamp(min=0)  # [B, N]
    is_root_child = tree.parents < 0  # [B, N]
    parent_target = torch.where(is_root_child, root_target[:, None], node_target.gather(1, parents))  # [B, N]
    matches = tree.valid & (tree.tokens == parent_target)  # [B, N]
    on_path = torch.zeros_like(matches)  # [B, N]
    for depth in range(width):  # parents are one slot shallower, so already decided
        parent_on_path = is_root_child | on_path.gather(1, parents)
        on_path = on_path | ((tree.depths == depth) & matches & parent_on_path)
    reach = torch.where(on_path, tree.depths + 1, 0)  # [B, N]
    accepted = reach.amax(-1)  # [B]
    deepest = reach.argmax(-1, keepdim=True)  # [B, 1], the one node of the path at depth accepted - 1
    next_token = torch.where(accepted[:, None] > 0, node_target.gather(1, deepest), root_target[:, None])  # [B, 1]
    path = torch.full((tree.tokens.shape[0], width + 1), pad_id, dtype=torch.long, device=tree.tokens.device)
    path.scatter_(1, torch.where(on_path, tree.depths, width), torch.where(on_path, tree.tokens, pad_id))
    return path[:, :width], accepted, next_token
