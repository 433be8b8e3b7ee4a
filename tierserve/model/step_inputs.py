"""StepInputBuilder: a plan's chunks -> input ids, positions and attention metadata, in buffers
allocated once and reused every step.

Each buffer is a numpy array and a torch tensor over the same memory: chunks are copied in with
numpy slice assignments (one per chunk, never one per token), and the model reads torch views of
the filled prefix. A step larger than the buffers grows them (doubling), so sizes are a hint,
never a limit. On a GPU the same buffers would be the pinned host side of one non-blocking copy.

The views are valid until the next ``build``: the runner consumes them within the step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from tierserve.config import SelectionConfig
from tierserve.model.layers import AttentionMetadata
from tierserve.sched.plan import RequestError, ScheduledChunk
from tierserve.selection.policies import FullKV
from tierserve.selection.step import StepSelection

log = logging.getLogger(__name__)


@dataclass(slots=True)
class StepInputs:
    """One step's model inputs. ``input_ids`` and ``positions`` have ``meta.num_tokens`` real
    rows, maybe followed by zero padding."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    sample_rows: torch.Tensor  # (S,) int64: the last row of each chunk that samples, in order


class _Buffer:
    """A growable int64 array shared by numpy (for filling) and torch (for reading)."""

    def __init__(self, name: str, size: int) -> None:
        self.name = name
        self.array = np.zeros(size, dtype=np.int64)
        self.tensor = torch.from_numpy(self.array)

    def reserve(self, size: int) -> None:
        if size > self.array.shape[0]:
            grown = max(size, 2 * self.array.shape[0])
            log.debug("step buffer %s grown from %d to %d entries", self.name,
                      self.array.shape[0], grown)
            self.array = np.zeros(grown, dtype=np.int64)
            self.tensor = torch.from_numpy(self.array)


class StepInputBuilder:
    """Fills preallocated buffers from a list of ``ScheduledChunk`` and hands out views.

    ``native``: decodes go to the native attention kernel as one batch (rows, tables, lengths);
    otherwise they are grouped in length buckets for the torch path. ``bucket_ratio``: within a
    bucket the longest context is at most this many times the shortest (plus one block); None
    puts every decode in one padded bucket (kept for the bucket benchmark).
    """

    def __init__(self, block_size: int, pad_rows: int = 1, native: bool = False,
                 max_tokens: int = 256, max_seqs: int = 128, max_blocks_per_seq: int = 64,
                 bucket_ratio: float | None = 2.0, key_bounds: bool = False,
                 selection=None) -> None:
        self.block_size = block_size
        self.pad_rows = pad_rows
        self.native = native
        self.bucket_ratio = bucket_ratio
        # KV selection: ``key_bounds`` when the cache has bound rows (kept true every step),
        # ``selection`` a tierserve.selection.policies.SelectionPolicy (settable between steps).
        self.key_bounds = key_bounds
        self.selection = selection
        self._full = FullKV(SelectionConfig())  # bounds kept, nothing selected
        self._written: list[tuple[np.ndarray, np.ndarray]] = []  # (blocks, rows filled)
        tokens = max(max_tokens, pad_rows)
        self._ids = _Buffer("input_ids", tokens)
        self._pos = _Buffer("positions", tokens)
        self._slot_blocks = _Buffer("slot_blocks", tokens)
        self._slot_offsets = _Buffer("slot_offsets", tokens)
        self._sample_rows = _Buffer("sample_rows", max_seqs)
        self._decode_rows = _Buffer("decode_rows", max_seqs)
        self._decode_lens = _Buffer("decode_lens", max_seqs)
        self._decode_tables = _Buffer("decode_tables", max_seqs * max_blocks_per_seq)
        self._arange = np.arange(max(max_tokens, 1024), dtype=np.int64)

    def build(self, chunks: list[ScheduledChunk], observers: dict | None = None) -> StepInputs:
        """``observers``: request id -> (first observed position, WindowObserver) for chunks
        whose queries score their keys for static eviction (several-token chunks only)."""
        num_tokens = sum(len(chunk.token_ids) for chunk in chunks)
        rows = max(num_tokens, self.pad_rows)
        for buffer in (self._ids, self._pos, self._slot_blocks, self._slot_offsets):
            buffer.reserve(rows)
        self._sample_rows.reserve(len(chunks))
        self._decode_rows.reserve(len(chunks))
        self._decode_lens.reserve(len(chunks))
        ids, pos = self._ids.array, self._pos.array
        self._written = []
        decode_tables: list[list[int]] = []
        spans: list[tuple[int, int, int, torch.Tensor]] = []
        masks: list[torch.Tensor] = []
        observe: dict[int, tuple[int, object]] = {}
        row = num_samples = 0
        for chunk in chunks:
            try:
                row, num_samples = self._fill(chunk, row, num_samples, decode_tables, spans,
                                              masks)
                watch = observers.get(chunk.request_id) if observers else None
                if watch is not None and chunk.num_tokens > 1:
                    first = max(0, watch[0] - chunk.start_pos)
                    if first < chunk.num_tokens:
                        observe[len(spans) - 1] = (first, watch[1])
            except Exception as exc:  # noqa: BLE001 - this chunk's inputs are malformed
                raise RequestError({chunk.request_id: f"its step inputs could not be built: "
                                    f"{type(exc).__name__}: {exc}"}) from exc
        ids[num_tokens:rows] = 0
        pos[num_tokens:rows] = 0
        num_decodes = len(decode_tables)
        native = self.native and num_decodes > 0
        selecting = self.key_bounds or self.selection is not None
        decodes = None
        if num_decodes and (native or selecting):
            decodes = (self._decode_rows.tensor[:num_decodes], self._tables(decode_tables),
                       self._decode_lens.tensor[:num_decodes])
        meta = AttentionMetadata(
            num_tokens=num_tokens,
            slot_blocks=self._slot_blocks.tensor[:num_tokens],
            slot_offsets=self._slot_offsets.tensor[:num_tokens],
            decode_buckets=[] if native or not num_decodes else self._buckets(decode_tables),
            chunks=spans,
            chunk_masks=masks,
            decodes=decodes if native else None,
            all_decodes=num_decodes > 0 and num_decodes == num_tokens,
            selection=self._step_selection(decodes) if selecting else None,
            key_bounds=self.key_bounds,
            observe=observe,
        )
        return StepInputs(self._ids.tensor[:rows], self._pos.tensor[:rows], meta,
                          self._sample_rows.tensor[:num_samples])

    def _step_selection(self, decodes) -> StepSelection:
        if self._written:
            blocks = torch.from_numpy(np.concatenate([b for b, _ in self._written]))
            fill = torch.from_numpy(np.concatenate([f for _, f in self._written]))
        else:
            blocks = fill = torch.zeros(0, dtype=torch.int64)
        rows, tables, lens = decodes if decodes is not None else (None, None, None)
        policy = self.selection if self.selection is not None else self._full
        return StepSelection(policy, self.block_size, rows, tables, lens, blocks, fill,
                             update=self.key_bounds)

    def _fill(self, chunk: ScheduledChunk, row: int, num_samples: int,
              decode_tables: list[list[int]], spans: list, masks: list) -> tuple[int, int]:
        """Copy one chunk into the buffers from ``row``; returns the next row and sample count."""
        ids, pos, slot_blocks = self._ids.array, self._pos.array, self._slot_blocks.array
        slot_offsets = self._slot_offsets.array
        block_size = self.block_size
        sample_rows, decode_rows, decode_lens = (self._sample_rows.array, self._decode_rows.array,
                                                 self._decode_lens.array)
        n, start = len(chunk.token_ids), chunk.start_pos
        end = start + n
        # Cache slots: the positions, less the tokens static eviction removed before them.
        offset = chunk.kv_offset
        slot, slot_end = start - offset, end - offset
        if n == 1:
            ids[row] = chunk.token_ids[0]
            pos[row] = start
            slot_blocks[row] = chunk.block_table[slot // block_size]
            slot_offsets[row] = slot % block_size
            decode_rows[len(decode_tables)] = row
            decode_lens[len(decode_tables)] = slot_end
            decode_tables.append(chunk.block_table)
        else:
            table = np.asarray(chunk.block_table, dtype=np.int64)
            slots = self._positions(slot, slot_end)
            ids[row:row + n] = chunk.token_ids
            pos[row:row + n] = slots + offset
            slot_blocks[row:row + n] = table[slots // block_size]
            np.remainder(slots, block_size, out=slot_offsets[row:row + n])
            spans.append((row, n, slot_end, torch.from_numpy(table)))
            query = torch.from_numpy(slots)
            masks.append(torch.from_numpy(self._positions(0, slot_end))[None, :]
                         <= query[:, None])
        if self.key_bounds:  # the blocks this chunk writes, and the rows each then holds
            start, end = slot, slot_end
            if n == 1:
                self._written.append((np.array([slot_blocks[row]]),
                                      np.array([start % block_size + 1])))
            else:
                written = np.arange(start // block_size, (end - 1) // block_size + 1)
                self._written.append((table[written],
                                      np.minimum(block_size, end - written * block_size)))
        row += n
        if chunk.sample:
            sample_rows[num_samples] = row - 1
            num_samples += 1
        return row, num_samples

    def _positions(self, start: int, end: int) -> np.ndarray:
        if end > self._arange.shape[0]:
            self._arange = np.arange(max(end, 2 * self._arange.shape[0]), dtype=np.int64)
        return self._arange[start:end]

    def _tables(self, tables: list[list[int]]) -> torch.Tensor:
        """(B, widest) block tables, rows padded with block 0, as one contiguous view."""
        width = max(len(table) for table in tables)
        self._decode_tables.reserve(len(tables) * width)
        view = self._decode_tables.array[: len(tables) * width].reshape(len(tables), width)
        for index, table in enumerate(tables):
            view[index, : len(table)] = table
            view[index, len(table):] = 0
        return self._decode_tables.tensor[: len(tables) * width].view(len(tables), width)

    def _buckets(self, tables: list[list[int]]
                 ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Decodes grouped so that within a group the longest context is at most ``bucket_ratio``
        times the shortest (plus one block): padding then costs at most about that factor,
        whatever the batch's longest request. Torch path only; each bucket owns its tensors."""
        count = len(tables)
        rows = self._decode_rows.array[:count]
        lens = self._decode_lens.array[:count]
        order = np.argsort(lens, kind="stable")
        sorted_lens = lens[order]
        bounds, first = [], 0
        while first < count:
            if self.bucket_ratio is None:
                last = count
            else:
                limit = self.bucket_ratio * sorted_lens[first] + self.block_size
                last = int(np.searchsorted(sorted_lens, limit, side="right"))
            bounds.append((first, last))
            first = last
        buckets = []
        for first, last in bounds:
            members = order[first:last]
            bucket_tables = [tables[i] for i in members]
            width = max(len(table) for table in bucket_tables)
            padded = np.zeros((len(members), width), dtype=np.int64)
            for index, table in enumerate(bucket_tables):
                padded[index, : len(table)] = table
            visible = (np.arange(width * self.block_size)[None, :] < lens[members][:, None])
            buckets.append((torch.from_numpy(rows[members].copy()), torch.from_numpy(padded),
                            torch.from_numpy(visible).view(len(members), 1, 1, -1)))
        return buckets
