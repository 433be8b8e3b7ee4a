"""SimKVSelection: long-context KV selection (``--kv-selection``, ``--kv-eviction``) priced in
the simulator. The engine's scheduler and KV manager do the bookkeeping as they do for the real
runner; this model answers what the runner would have:

- static eviction: the prompt tokens evicted when a prompt's prefill ends (the engine's own
  counting rule, ``selection/budget.py``), so the scheduler frees their blocks and the pool
  holds more requests; and the observation window's extra attention, priced as
  ``window`` queries over the prompt's keys;
- dynamic selection: the KV a decode reads, averaged over layers. Dense layers (the first
  ``kv_dense_layers``) read the whole context; the others read the selected blocks plus the
  per-block bounds they score (one K row and one V row a block, so a block's bounds cost one
  token of KV), every other layer when layer pairs share a selection (MPCache).

Not priced: the top-k and mask work of the selection itself, which on a GPU is small next to
the attention it saves; on our CPU it is not (docs/benchmarks.md, "Long-context KV selection").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tierserve.config import SelectionConfig
from tierserve.sched.plan import ScheduledChunk, StepPlan
from tierserve.selection.budget import (
    READS_BOUNDS,
    SHARES_LAYER_PAIRS,
    kept_after_eviction,
    mpcache_window,
    selected_blocks,
)
from tierserve.sim.cost import BatchShape, ChunkShape, CostModel


@dataclass(slots=True)
class SimKVSelection:
    """Hooks for ``SimExecutor``: ``attended``, ``evicted`` and ``eviction_seconds``."""

    config: SelectionConfig
    num_layers: int
    block_size: int
    cost: CostModel

    def attended(self, chunk: ScheduledChunk) -> int:
        """KV tokens the chunk's attention reads, averaged over layers."""
        context = chunk.start_pos - chunk.kv_offset
        if self.config.kv_selection == "full" or len(chunk.token_ids) != 1 or context <= 0:
            return context
        cfg, block = self.config, self.block_size
        num_blocks = math.ceil((context + 1) / block)
        forced = cfg.kv_sink_blocks + cfg.kv_recent_blocks
        kept = selected_blocks(cfg.kv_budget, num_blocks, forced, block)
        if kept >= num_blocks:  # everything kept: the engine attends densely, scores nothing
            return context
        read = min(context, kept * block)
        dense = min(cfg.kv_dense_layers, self.num_layers)
        sparse = self.num_layers - dense
        bounds = 0
        if cfg.kv_selection in READS_BOUNDS:
            pairs = cfg.kv_selection in SHARES_LAYER_PAIRS
            bounds = (math.ceil(sparse / 2) if pairs else sparse) * num_blocks
        return round((dense * context + sparse * read + bounds) / self.num_layers)

    def evicted(self, chunk: ScheduledChunk) -> int:
        """Prompt tokens the static eviction drops as the chunk ends the prompt."""
        length = len(chunk.prompt_token_ids)
        return length - kept_after_eviction(self.config.kv_eviction_budget, length,
                                            self.forced(length))

    def forced(self, length: int) -> int:
        """Prompt tokens the eviction always keeps: MPCache the sink blocks and the last block,
        SnapKV its observation window (``eviction.py``'s ``forced``)."""
        if self.config.kv_eviction == "snapkv":
            return min(length, self.config.snapkv_window)
        sink = self.config.kv_sink_blocks * self.block_size
        return min(length, sink + self.block_size)

    def window(self, length: int) -> int:
        if self.config.kv_eviction == "mpcache":
            return mpcache_window(self.config.kv_eviction_window, length)
        return min(length, self.config.snapkv_window)

    def eviction_seconds(self, plan: StepPlan, shape: BatchShape, compute_s: float) -> float:
        """The step hook: the observation windows of the prompts that end in this step."""
        extra = 0.0
        for chunk in plan.chunks:
            if chunk.evicts:
                length = len(chunk.prompt_token_ids)
                window = self.window(length)
                scoring = BatchShape((ChunkShape(window, length - window, sample=False),))
                extra += self.cost.breakdown(scoring).get("attention_prefill", 0.0)
        return extra

    def install(self, executor) -> None:
        """Hook this model into a SimExecutor."""
        if self.config.kv_eviction != "none" and self.config.kv_eviction_threshold is not None:
            raise ValueError("the simulator prices budgeted static eviction only: a threshold "
                             "keeps a data-dependent number of tokens; give "
                             "--kv-eviction-budget instead")
        if self.config.kv_selection != "full":
            executor.attended = self.attended
        if self.config.kv_eviction != "none":
            executor.evicted = self.evicted
            executor.step_hooks.append(self.eviction_seconds)
