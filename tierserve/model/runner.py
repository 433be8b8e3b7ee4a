"""ModelRunner: StepPlan -> input tensors and attention metadata -> forward -> sample -> StepResult.

It owns the KV cache tensor and the sampler; it knows requests only as the chunks of a plan.
"""

from __future__ import annotations

import tempfile

import torch

from tierserve.model.kv_storage import KVStorage, SwapWorker
from tierserve.model.layers import AttentionMetadata
from tierserve.model.llama import LlamaModel
from tierserve.model.sampler import Sampler
from tierserve.sched.plan import ScheduledChunk, StepPlan, StepResult, SwapDone

# Below this many rows, float32 matmuls on CPU take a different kernel whose rounding differs;
# padding to it keeps a request's logits independent of the batch it runs in.
INVARIANT_MIN_ROWS = 16


class ModelRunner:
    """Executes plans on a real model. Implements the executor side of the step transaction."""

    def __init__(self, model: LlamaModel, num_blocks: int, block_size: int, seed: int = 0,
                 batch_invariant: bool = True, num_host_blocks: int = 0,
                 num_disk_blocks: int = 0, swap_dir: str | None = None) -> None:
        self.model = model
        self.block_size = block_size
        self.kv_cache = torch.zeros(model.kv_cache_shape(num_blocks, block_size),
                                    dtype=model.dtype)
        self.sampler = Sampler(seed)
        self.pad_rows = INVARIANT_MIN_ROWS if (batch_invariant and model.dtype == torch.float32) else 1
        self.swapper: SwapWorker | None = None
        if num_host_blocks or num_disk_blocks:
            if num_disk_blocks and swap_dir is None:
                swap_dir = tempfile.gettempdir()
            storage = KVStorage(self.kv_cache, num_host_blocks, num_disk_blocks, swap_dir)
            self.swapper = SwapWorker(storage)
        self._outstanding: set[str] = set()  # copy keys submitted, not yet reported done

    def close(self) -> None:
        """Stop the swap worker and remove the disk tier's file."""
        if self.swapper is not None:
            self.swapper.close()
            self.swapper.storage.close()
            self.swapper = None

    def execute(self, plan: StepPlan) -> StepResult:
        """Run one step. Chunks with ``sample`` get one new token each.

        Copies start first on the swap worker; the forward waits only for the orders it needs
        (swap-ins, victim saves). Swap-outs overlap the forward and are reported when done.
        """
        self.sampler.drop(plan.finished_request_ids)
        self._start_copies(plan)
        result = self._forward(plan) if plan.chunks else StepResult()
        if not plan.chunks and self._outstanding:  # idle: nothing to overlap with
            self.swapper.wait(list(self._outstanding))
        if self.swapper is not None:
            for stats in self.swapper.poll():
                self._outstanding.discard(stats.key)
                result.swaps_done.append(SwapDone(stats.key, stats.num_blocks, stats.num_copies,
                                                  stats.bytes, stats.seconds))
        return result

    def _start_copies(self, plan: StepPlan) -> None:
        if plan.wait_keys:
            self.swapper.wait(plan.wait_keys)
        if not plan.swap_orders:
            return
        if self.swapper is None:
            raise RuntimeError("the plan moves KV between tiers but no host/disk tier exists")
        for order in plan.swap_orders:
            self.swapper.submit(order.key, order.ops)
            self._outstanding.add(order.key)
        self.swapper.wait([order.key for order in plan.swap_orders if order.wait])

    def _forward(self, plan: StepPlan) -> StepResult:
        input_ids, positions, meta = self._prepare(plan.chunks)
        hidden = self.model.forward(input_ids, positions, self.kv_cache, meta)
        sampling = [chunk for chunk in plan.chunks if chunk.sample]
        if not sampling:
            return StepResult()
        rows, end = [], 0
        for chunk in plan.chunks:
            end += chunk.num_tokens
            if chunk.sample:
                rows.append(end - 1)
        selected = self._pad(hidden[torch.tensor(rows)])
        logits = self.model.compute_logits(selected)[: len(rows)]
        tokens, logprobs = self.sampler.sample(logits, sampling)
        result = StepResult()
        for chunk, token, entry in zip(sampling, tokens, logprobs):
            result.sampled_token_ids[chunk.request_id] = token
            if entry is not None:
                result.logprobs[chunk.request_id] = entry
        return result

    def _pad(self, rows: torch.Tensor) -> torch.Tensor:
        missing = self.pad_rows - rows.shape[0]
        if missing <= 0:
            return rows
        return torch.cat([rows, rows.new_zeros(missing, *rows.shape[1:])])

    def _prepare(self, chunks: list[ScheduledChunk]
                 ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        block_size = self.block_size
        token_ids: list[int] = []
        positions: list[int] = []
        decode_rows: list[int] = []
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        spans: list[tuple[int, int, int, torch.Tensor]] = []
        masks: list[torch.Tensor] = []
        for chunk in chunks:
            row = len(token_ids)
            end_pos = chunk.start_pos + chunk.num_tokens
            token_ids.extend(chunk.token_ids)
            positions.extend(range(chunk.start_pos, end_pos))
            if chunk.num_tokens == 1:
                decode_rows.append(row)
                decode_tables.append(chunk.block_table)
                decode_lens.append(end_pos)
            else:
                spans.append((row, chunk.num_tokens, end_pos, torch.tensor(chunk.block_table)))
                query_pos = torch.arange(chunk.start_pos, end_pos)
                masks.append(torch.arange(end_pos)[None, :] <= query_pos[:, None])
        num_tokens = len(token_ids)
        pos = torch.tensor(positions)
        tables = [chunk.block_table for chunk in chunks for _ in range(chunk.num_tokens)]
        slot_blocks = torch.tensor([t[p // block_size] for t, p in zip(tables, positions)])
        native = self.model.ops is not None and decode_rows
        meta = AttentionMetadata(
            num_tokens=num_tokens,
            slot_blocks=slot_blocks,
            slot_offsets=pos % block_size,
            decode_buckets=([] if native else
                            _decode_buckets(decode_rows, decode_tables, decode_lens, block_size)),
            chunks=spans,
            chunk_masks=masks,
            decodes=((torch.tensor(decode_rows), _pad_tables(decode_tables),
                      torch.tensor(decode_lens)) if native else None),
            all_decodes=bool(native) and len(decode_rows) == num_tokens,
        )
        missing = max(0, self.pad_rows - num_tokens)
        input_ids = torch.tensor(token_ids + [0] * missing)
        positions_tensor = torch.cat([pos, pos.new_zeros(missing)]) if missing else pos
        return input_ids, positions_tensor, meta


def _decode_buckets(rows: list[int], tables: list[list[int]], lens: list[int], block_size: int
                    ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Decodes grouped so that within a group the longest context is at most twice the shortest
    (plus one block): padding then costs at most about 2x, whatever the batch's longest request."""
    order = sorted(range(len(rows)), key=lambda i: lens[i])
    buckets, current = [], []
    for i in order:
        if current and lens[i] > 2 * lens[current[0]] + block_size:
            buckets.append(current)
            current = []
        current.append(i)
    if current:
        buckets.append(current)
    return [(torch.tensor([rows[i] for i in bucket], dtype=torch.long),
             _pad_tables([tables[i] for i in bucket]),
             _decode_mask([lens[i] for i in bucket], block_size, [tables[i] for i in bucket]))
            for bucket in buckets]


def _pad_tables(tables: list[list[int]]) -> torch.Tensor:
    width = max((len(t) for t in tables), default=0)
    return torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long).view(
        len(tables), width)


def _decode_mask(lens: list[int], block_size: int, tables: list[list[int]]) -> torch.Tensor:
    width = max((len(t) for t in tables), default=0) * block_size
    visible = torch.arange(width)[None, :] < torch.tensor(lens, dtype=torch.long)[:, None]
    return visible.view(len(lens), 1, 1, width)
