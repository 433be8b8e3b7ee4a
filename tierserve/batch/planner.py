"""The BatchLLM planner: find prefixes shared across the whole batch, group the requests that
share one, and order groups and requests so decode-heavy work starts first. No torch here.

Global prefix identification: sorting the prompts lexicographically puts prompts with long common
prefixes next to each other (the leaves of a prefix tree in depth-first order), so one pass over
neighbours finds every prefix worth sharing. The plan flattens the tree to one level of shared
prefix per group, as BatchLLM does: a request joins the open group while that does not lower the
tokens the group saves, ``(members - 1) x prefix``; otherwise it opens a new group. Nested sharing
(a prefix of a prefix) is lost only where it would save fewer tokens than the deeper prefix.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class BatchItem:
    """One request of the batch, by its position in the input."""

    index: int
    prompt_token_ids: list[int]
    max_tokens: int

    @property
    def decode_ratio(self) -> float:
        """Expected output tokens per prompt token (max_tokens is the length estimate)."""
        return self.max_tokens / max(1, len(self.prompt_token_ids))


@dataclass(slots=True)
class PlannedGroup:
    """Requests sharing their first ``prefix_len`` tokens; the first member computes them."""

    prefix_len: int
    items: list[BatchItem] = field(default_factory=list)

    @property
    def saved_tokens(self) -> int:
        return (len(self.items) - 1) * self.prefix_len

    @property
    def decode_ratio(self) -> float:
        outputs = sum(item.max_tokens for item in self.items)
        prompts = self.prefix_len + sum(len(i.prompt_token_ids) - self.prefix_len for i in self.items)
        return outputs / max(1, prompts)


def common_prefix_len(a: list[int], b: list[int]) -> int:
    limit = min(len(a), len(b))
    n = 0
    while n < limit and a[n] == b[n]:
        n += 1
    return n


def plan_batch(items: list[BatchItem], block_size: int = 16,
               min_shared_tokens: int | None = None) -> list[PlannedGroup]:
    """Group ``items`` by shared prefix and order them: larger decode ratio first.

    A shared prefix is rounded down to whole KV blocks (only full blocks are shared) and must be
    at least ``min_shared_tokens`` long (default: one block); a request sharing nothing worth it
    forms a group of one.
    """
    minimum = block_size if min_shared_tokens is None else min_shared_tokens
    ordered = sorted(items, key=lambda item: item.prompt_token_ids)
    groups: list[PlannedGroup] = []
    current: PlannedGroup | None = None
    for item in ordered:
        if current is not None:
            # Leave the last prompt token out: it is always computed to produce logits.
            anchor = current.items[0].prompt_token_ids
            shared = common_prefix_len(anchor[: current.prefix_len or len(anchor) - 1],
                                       item.prompt_token_ids[:-1])
            shared -= shared % block_size
            members = len(current.items)
            before = (members - 1) * current.prefix_len if members > 1 else 0
            if shared >= minimum and members * shared >= before:
                current.prefix_len = shared
                current.items.append(item)
                continue
        current = PlannedGroup(prefix_len=0, items=[item])
        groups.append(current)
    for group in groups:
        if len(group.items) == 1:
            group.prefix_len = 0
        group.items.sort(key=lambda item: (-item.decode_ratio, item.index))
    groups.sort(key=lambda group: (-group.decode_ratio, group.items[0].index))
    return groups
