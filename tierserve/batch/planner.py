"""The BatchLLM planner: build the batch's prefix tree, and walk it so that every shared prefix
is computed once, by the first request below it, and lives only while its subtree runs. No torch.

Global prefix identification: sorting the prompts lexicographically lists the leaves of their
prefix tree in depth-first order, and the longest common prefix of neighbours (in whole KV blocks,
the last prompt token left out: it is always computed for its logits) gives the tree's internal
nodes, nested as deep as the prompts nest (system prompt, template, document, question).

The plan is an ordered walk of that tree: a node's children (subtrees) go in decode-ratio order,
larger first, and a subtree is never interleaved with its siblings, so a parent's blocks are in use
from its first request's prefill until its last child ends. Each request names a leader: the first
request of the deepest subtree it shares with earlier requests, and how many tokens they share.
The engine holds the request back until the leader has computed those tokens, then finds them in
the prefix cache. The plan computes each tree node once: exactly `prefill_optimum` tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(slots=True)
class BatchItem:
    """One request of the batch, by its position in the input."""

    index: int
    prompt_token_ids: list[int]
    max_tokens: int  # the output length estimate the plan orders by

    @property
    def decode_ratio(self) -> float:
        """Expected output tokens per prompt token."""
        return self.max_tokens / max(1, len(self.prompt_token_ids))


@dataclass(slots=True)
class PlannedRequest:
    """One request in plan order."""

    item: BatchItem
    leader: int | None  # BatchItem.index of the earlier request that computes the shared tokens
    shared_len: int  # prompt tokens reused from the leader (whole blocks); 0 without a leader
    group: int  # id of the deepest shared prefix node above it (its template); -1: none


@dataclass(slots=True)
class _Node:
    depth: int  # tokens of prefix shared by every leaf below
    children: list = field(default_factory=list)  # _Node or int (position in the sorted list)
    id: int = -1


@dataclass(slots=True)
class BatchPlan:
    requests: list[PlannedRequest]
    num_nodes: int  # shared prefix nodes: tree nodes with two or more requests below

    @property
    def saved_tokens(self) -> int:
        return sum(r.shared_len for r in self.requests)

    @property
    def computed_tokens(self) -> int:
        return sum(len(r.item.prompt_token_ids) - r.shared_len for r in self.requests)

    @property
    def num_groups(self) -> int:
        """Sets of requests with the same deepest shared prefix (a lone request is its own)."""
        return len({r.group if r.group >= 0 else ("alone", r.item.index) for r in self.requests})


class OutputLengthHistory:
    """Output lengths seen so far in this batch, per template (the deepest shared prefix node),
    and the estimate they give for the template's requests still to run: the mean seen, plus
    25%, never above what the request declares (its max_tokens). A template nothing has finished
    in yet, or a request that shares no prefix, is estimated at its declared length."""

    MARGIN = 1.25

    def __init__(self) -> None:
        self._total: dict[int, int] = {}
        self._count: dict[int, int] = {}

    def observe(self, group: int, length: int) -> None:
        if group >= 0:
            self._total[group] = self._total.get(group, 0) + length
            self._count[group] = self._count.get(group, 0) + 1

    def estimate(self, group: int, declared: int) -> int:
        count = self._count.get(group, 0)
        if not count:
            return declared
        mean = self._total[group] / count
        return max(1, min(declared, math.ceil(mean * self.MARGIN)))


def common_prefix_len(a: list[int], b: list[int]) -> int:
    limit = min(len(a), len(b))
    n = 0
    while n < limit and a[n] == b[n]:
        n += 1
    return n


def shareable_len(a: list[int], b: list[int], block_size: int) -> int:
    """Tokens two prompts can share in a block-granular prefix cache."""
    shared = common_prefix_len(a[:-1], b[:-1])
    return shared - shared % block_size


def prefill_optimum(prompts: list[list[int]], block_size: int) -> int:
    """The fewest prompt tokens a block-granular prefix cache can compute for these prompts: each
    distinct full block of the batch's prefix tree once (only blocks before a prompt's last token
    can be reused: that token is always computed), plus every prompt's remainder."""
    root: dict = {}
    total = 0
    for ids in prompts:
        reusable = (len(ids) - 1) // block_size
        total += len(ids) - reusable * block_size
        node = root
        for b in range(reusable):
            key = tuple(ids[b * block_size:(b + 1) * block_size])
            child = node.get(key)
            if child is None:
                child = node[key] = {}
                total += block_size
            node = child
    return total


def _build_tree(ordered: list[BatchItem], lcps: list[int], lo: int, hi: int, depth: int) -> _Node:
    """The subtree over sorted positions lo..hi (inclusive), all sharing `depth` tokens.

    ``lcps[i]`` is what position i shares with position i - 1."""
    node = _Node(depth)
    if lo == hi:
        node.children.append(lo)
        return node
    split = min(lcps[lo + 1: hi + 1])
    if split > depth:  # everything here shares more: one deeper node
        node.children.append(_build_tree(ordered, lcps, lo, hi, split))
        return node
    start = lo
    for i in range(lo + 1, hi + 2):
        if i == hi + 1 or lcps[i] == depth:
            if start == i - 1:
                node.children.append(start)
            else:
                node.children.append(_build_tree(ordered, lcps, start, i - 1,
                                                 min(lcps[start + 1: i])))
            start = i
    return node


def plan_batch(items: list[BatchItem], block_size: int = 16,
               min_shared_tokens: int | None = None) -> BatchPlan:
    """The tree walk over ``items``: every request once, each shared node computed once.

    A prefix is shared only in whole KV blocks and only if it is at least ``min_shared_tokens``
    long (default: one block)."""
    minimum = block_size if min_shared_tokens is None else min_shared_tokens
    ordered = sorted(items, key=lambda item: item.prompt_token_ids)
    lcps = [0] * len(ordered)
    for i in range(1, len(ordered)):
        shared = shareable_len(ordered[i - 1].prompt_token_ids, ordered[i].prompt_token_ids,
                               block_size)
        lcps[i] = shared if shared >= minimum else 0
    if not ordered:
        return BatchPlan([], 0)
    root = _build_tree(ordered, lcps, 0, len(ordered) - 1, 0)
    if root.depth > 0:  # everything shares a prefix: keep a root that shares nothing
        root = _Node(0, [root])

    num_nodes = 0

    def cost(node: _Node, parent_depth: int) -> tuple[float, int, int]:
        """(decode ratio, output tokens, prompt tokens computed) of a subtree; orders children."""
        nonlocal num_nodes
        if node.depth > 0:
            node.id = num_nodes
            num_nodes += 1
        keyed = []
        outputs, computed = 0, node.depth - parent_depth
        for child in node.children:
            if isinstance(child, _Node):
                _, out, comp = cost(child, node.depth)
                first = _first_index(ordered, child)
            else:
                item = ordered[child]
                out, comp, first = item.max_tokens, len(item.prompt_token_ids) - node.depth, item.index
            keyed.append((-out / max(1, comp), first, child))
            outputs += out
            computed += comp
        keyed.sort(key=lambda k: (k[0], k[1]))
        node.children = [k[2] for k in keyed]
        return outputs / max(1, computed), outputs, computed

    cost(root, 0)
    planned: list[PlannedRequest] = []
    leaders: dict[int, int] = {}  # node id -> BatchItem.index of its first request

    def walk(node: _Node, path: list[_Node]) -> None:
        path = path + [node] if node.depth > 0 else path
        for child in node.children:
            if isinstance(child, _Node):
                walk(child, path)
                continue
            item = ordered[child]
            leader, shared = None, 0
            for ancestor in reversed(path):  # the deepest one an earlier request went through
                if ancestor.id in leaders:
                    leader, shared = leaders[ancestor.id], ancestor.depth
                    break
            for ancestor in path:
                leaders.setdefault(ancestor.id, item.index)
            planned.append(PlannedRequest(item, leader, shared, path[-1].id if path else -1))

    walk(root, [])
    return BatchPlan(planned, num_nodes)


def _first_index(ordered: list[BatchItem], node: _Node) -> int:
    return min(ordered[c].index if not isinstance(c, _Node) else _first_index(ordered, c)
               for c in node.children)
