"""StepSelection: one step's KV-selection state, built with the step's inputs and consulted by
attention layer by layer; and ``attend_selected``, the torch reference of decode attention over
per-(decode, kv head) block tables (the torch path, and what the kernel is tested against)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tierserve.selection.bounds import update_bounds
from tierserve.selection.policies import BlockView, SelectionPolicy, select_blocks


class StepSelection:
    """What each layer of this step attends to, for the step's single-token decodes.

    ``rows`` are the decodes' rows in the step, ``tables``/``lens`` their full block tables and
    cached tokens; ``bound_blocks``/``bound_fill`` the blocks this step writes (every chunk's)
    and the rows each holds after it. ``pick`` returns None where a layer attends to everything
    (a dense layer, the ``full`` policy, or every context within its budget), else the
    per-(decode, kv head) tables and lengths; layer pairs share one pick when the policy says.
    """

    def __init__(self, policy: SelectionPolicy, block_size: int, rows: torch.Tensor | None,
                 tables: torch.Tensor | None, lens: torch.Tensor | None,
                 bound_blocks: torch.Tensor, bound_fill: torch.Tensor,
                 update: bool) -> None:
        self.policy = policy
        self.block_size = block_size
        self.rows, self.tables, self.lens = rows, tables, lens
        self.bound_blocks, self.bound_fill = bound_blocks, bound_fill
        self.update = update  # the cache has bound rows: keep them true
        self._view: BlockView | None = None
        self._picked: dict[int, tuple[torch.Tensor, torch.Tensor] | None] = {}

    def write_bounds(self, k_cache: torch.Tensor, key_max: torch.Tensor,
                     key_min: torch.Tensor) -> None:
        """After this layer's keys are written: their blocks' bounds follow."""
        if self.update:
            update_bounds(k_cache, key_max, key_min, self.bound_blocks, self.bound_fill)

    def source_layer(self, layer: int) -> int:
        """The layer whose pick ``layer`` uses: itself, or the first of its pair."""
        config = self.policy.config
        if self.policy.shares_layer_pairs and layer > config.kv_dense_layers and (
                layer - config.kv_dense_layers) % 2 == 1:
            return layer - 1
        return layer

    def reset(self) -> None:
        """Forget this step's picks (a benchmark that runs one step's inputs again)."""
        self._picked.clear()
        self._view = None

    def pick(self, layer: int, q: torch.Tensor, num_kv_heads: int,
             key_max: torch.Tensor | None, key_min: torch.Tensor | None
             ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """q: this layer's (T, nh, hd) queries. None: attend densely."""
        config = self.policy.config
        if (self.rows is None or self.policy.name == "full" or layer < config.kv_dense_layers):
            return None
        if self.policy.needs_bounds and key_max is None:
            raise RuntimeError(f"--kv-selection {self.policy.name} reads key bounds, and this "
                               "KV cache was allocated without them")
        source = self.source_layer(layer)
        if source in self._picked:
            return self._picked[source]
        if self._view is None:
            self._view = BlockView.build(self.tables, self.lens, self.block_size, config)
        picked = None
        if not self._view.everything_kept:
            scores = self.policy.scores(q[self.rows], self._view, num_kv_heads, key_max,
                                        key_min)
            picked = select_blocks(scores, self._view)
        self._picked[source] = picked
        return picked


def attend_selected(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    tables: torch.Tensor, lens: torch.Tensor, scale: float) -> torch.Tensor:
    """Decode attention where each (decode, kv head) reads its own blocks.

    q: (D, nh, hd); caches: (num_blocks, block_size, nkv, hd); tables: (D, nkv, K) int64 in
    context order; lens: (D, nkv) int64, the tokens those blocks hold (the last one partial).
    Returns (D, nh, hd). Gathers the picked blocks: the reference, not the fast path.
    """
    decodes, nkv, width = tables.shape
    block_size, head_dim = k_cache.shape[1], k_cache.shape[-1]
    heads = torch.arange(nkv).view(1, nkv, 1)
    keys = k_cache[tables, :, heads].reshape(decodes, nkv, width * block_size, head_dim)
    values = v_cache[tables, :, heads].reshape(decodes, nkv, width * block_size, head_dim)
    visible = torch.arange(width * block_size)[None, None, :] < lens[..., None]
    query = q.view(decodes, nkv, -1, head_dim)  # (D, nkv, G, hd)
    out = F.scaled_dot_product_attention(query, keys, values, attn_mask=visible[:, :, None, :],
                                         scale=scale)
    return out.reshape(decodes, -1, head_dim)
