"""ModelRunner: StepPlan -> input tensors and attention metadata -> forward -> sample -> StepResult.

It owns the KV cache tensor and the sampler; it knows requests only as the chunks of a plan.
"""

from __future__ import annotations

import contextlib
import tempfile

import torch

from tierserve.config import SelectionConfig
from tierserve.model.kv_storage import KVStorage, SwapWorker
from tierserve.model.llama import LlamaModel
from tierserve.model.moe import MoEBlock
from tierserve.model.sampler import Sampler, score_tokens
from tierserve.model.step_inputs import StepInputBuilder, StepInputs
from tierserve.sched.plan import (
    CopyError,
    PromptLogprobs,
    ScheduledChunk,
    StepPlan,
    StepResult,
    SwapDone,
)
from tierserve.selection.eviction import compact, make_eviction
from tierserve.selection.policies import make_policy

# Below this many rows, float32 matmuls on CPU take a different kernel whose rounding differs;
# padding to it keeps a request's logits independent of the batch it runs in.
INVARIANT_MIN_ROWS = 16
PROMPT_SCORE_ROWS = 128  # prompt logprobs go through the LM head this many rows at a time


SHARED_PREFIX_MIN_TOKENS = 256


class ModelRunner:
    """Executes plans on a real model. Implements the executor side of the step transaction."""

    def __init__(self, model: LlamaModel, num_blocks: int, block_size: int, seed: int = 0,
                 batch_invariant: bool = True, num_host_blocks: int = 0,
                 num_disk_blocks: int = 0, swap_dir: str | None = None,
                 max_num_batched_tokens: int = 256, max_num_seqs: int = 128,
                 selection: SelectionConfig | None = None, key_bounds: bool | None = None,
                 shared_prefix_attention: bool = True) -> None:
        self.model = model
        self.block_size = block_size
        # Groups sharing a prefix of at least 256 tokens read it together (measured: shorter
        # ones gain nothing, docs/benchmarks.md); the kernel takes block sizes that are
        # multiples of 16.
        model.attention.shared_prefix_blocks = (
            max(1, SHARED_PREFIX_MIN_TOKENS // block_size)
            if shared_prefix_attention and block_size % 16 == 0 else 0)
        # KV selection: the policy, and per-block key bounds in the cache when it reads them
        # (``key_bounds`` True keeps them for any policy, e.g. to switch policies later).
        policy = (make_policy(selection) if selection is not None
                  and selection.kv_selection != "full" else None)
        if key_bounds is None:
            key_bounds = policy is not None and policy.needs_bounds
        self.kv_cache = torch.zeros(model.kv_cache_shape(num_blocks, block_size, key_bounds),
                                    dtype=model.dtype)
        self.key_bounds = key_bounds
        # Static eviction after prefill: the policy, and each prefilling request's observer.
        self.eviction = make_eviction(selection, block_size) if selection is not None else None
        self._observers: dict[str, tuple[int, object]] = {}
        self.sampler = Sampler(seed)
        invariant = batch_invariant and model.dtype == torch.float32
        if invariant:
            model.keep_packed_rows_invariant()
        # Padding serves float GEMMs; packed linears on the integer kernel are row-invariant as
        # they are, so where every linear is one, padding would only add work (16 rows a decode).
        self.pad_rows = INVARIANT_MIN_ROWS if invariant and not model.packed_throughout() else 1
        for layer in model.layers:  # each expert's rows too, not only the step's
            if isinstance(layer.mlp, MoEBlock):
                layer.mlp.min_rows = self.pad_rows
        self.inputs = StepInputBuilder(
            block_size, self.pad_rows, native=model.native_decode,
            max_tokens=max_num_batched_tokens, max_seqs=max_num_seqs,
            max_blocks_per_seq=min(num_blocks, -(-model.max_positions // block_size)),
            key_bounds=key_bounds, selection=policy)
        self.swapper: SwapWorker | None = None
        if num_host_blocks or num_disk_blocks:
            if num_disk_blocks and swap_dir is None:
                swap_dir = tempfile.gettempdir()
            storage = KVStorage(self.kv_cache, num_host_blocks, num_disk_blocks, swap_dir)
            self.swapper = SwapWorker(storage)
        self._outstanding: set[str] = set()  # copy keys submitted, not yet reported done
        self.experts = None  # an ExpertOffload when the MoE experts are offloaded
        self._routed: dict[str, object] = {}  # live requests whose expert_route is kept fresh
        self.step_hooks: list = []  # fn(plan) before each forward (router traces)

    def annotate(self, request) -> None:
        """A request arrived: with offloaded experts, predict its route (or find its trace)."""
        if self.experts is None:
            return
        self.experts.annotate(request.request_id, request.prompt_token_ids)
        request.expert_route = self.experts.hot_sets(request.request_id)
        if request.expert_route is not None:
            self._routed[request.request_id] = request

    def _refresh_routes(self, plan: StepPlan) -> None:
        """The scheduler's route hints (token regrouping) follow the policy's corrections."""
        for request_id in plan.finished_request_ids:
            self._routed.pop(request_id, None)
        for chunk in plan.chunks:
            request = self._routed.get(chunk.request_id)
            if request is not None:
                request.expert_route = self.experts.hot_sets(chunk.request_id)

    def close(self) -> None:
        """Stop the swap worker and remove the disk tier's file."""
        if self.experts is not None:
            self.experts.close()
            self.experts = None
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
        for request_id in (*plan.finished_request_ids, *plan.preempted_request_ids):
            self._observers.pop(request_id, None)
        if self.experts is not None:
            self.experts.begin_step(plan)
            self._refresh_routes(plan)
        for hook in self.step_hooks:
            hook(plan)
        self._start_copies(plan)
        result = self._forward(plan) if plan.chunks else StepResult()
        if not plan.chunks and self._outstanding:  # idle: nothing to overlap with
            with contextlib.suppress(CopyError):  # poll below reports failed ones
                self.swapper.wait(list(self._outstanding))
        if self.swapper is not None:
            for stats in self.swapper.poll():
                self._outstanding.discard(stats.key)
                result.swaps_done.append(SwapDone(stats.key, stats.num_blocks, stats.num_copies,
                                                  stats.bytes, stats.seconds, stats.error))
        return result

    def _start_copies(self, plan: StepPlan) -> None:
        """Submit every order of the plan first (so none is lost if a wait below raises), then
        wait for the ones this step's forward reads: earlier prefetches and ``wait`` orders."""
        if plan.swap_orders and self.swapper is None:
            raise RuntimeError("the plan moves KV between tiers but no host/disk tier exists")
        for order in plan.swap_orders:
            self.swapper.submit(order.key, order.ops)
            self._outstanding.add(order.key)
        # The forward reads what swap-ins and copy-ups write, and overwrites blocks victim
        # saves read: it waits for both. A copy that failed raises CopyError naming it.
        needed = [*plan.wait_keys, *(order.key for order in plan.swap_orders if order.wait)]
        if needed:
            self.swapper.wait(needed)

    def _forward(self, plan: StepPlan) -> StepResult:
        observers = self._window_observers(plan.chunks)
        inputs = self._prepare(plan.chunks, observers)
        hidden = self.model.forward(inputs.input_ids, inputs.positions, self.kv_cache, inputs.meta)
        result = StepResult()
        self._evict(plan.chunks, result)
        self._prompt_logprobs(plan.chunks, hidden, result)
        sampling = [chunk for chunk in plan.chunks if chunk.sample]
        if not sampling:
            return result
        selected = self._pad(hidden[inputs.sample_rows])
        logits = self.model.compute_logits(selected)[: len(sampling)]
        sampled = self.sampler.sample(logits, sampling)
        for index, reason in sampled.failed.items():
            result.failed[sampling[index].request_id] = reason
        for chunk, token, entry in zip(sampling, sampled.token_ids, sampled.logprobs):
            if token is None:
                continue
            result.sampled_token_ids[chunk.request_id] = token
            if entry is not None:
                result.logprobs[chunk.request_id] = entry
        return result

    def _window_observers(self, chunks: list[ScheduledChunk]) -> dict[str, tuple[int, object]]:
        """The observers of this step's chunks inside a static-eviction window (made when a
        request's prefill starts, kept until it evicts)."""
        if self.eviction is None:
            return {}
        arch = self.model.arch
        for chunk in chunks:
            if chunk.evict_at is None:
                continue
            if chunk.start_pos == 0 or chunk.request_id not in self._observers:
                length = chunk.evict_at
                self._observers[chunk.request_id] = (
                    length - self.eviction.window(length),
                    self.eviction.observer(arch.num_layers, arch.num_kv_heads, length))
        return self._observers

    def _evict(self, chunks: list[ScheduledChunk], result: StepResult) -> None:
        """Requests whose prefill this step ended keep their best prompt tokens, moved to the
        front of their blocks; the scheduler frees the rest. A failure fails that request."""
        for chunk in chunks:
            if not chunk.evicts:
                continue
            watch = self._observers.pop(chunk.request_id, None)
            try:
                if watch is None:
                    raise RuntimeError("its observation window was not scored")
                length = chunk.evict_at
                kept = self.eviction.keep(watch[1], length)
                if kept.shape[-1] >= length:
                    result.evicted[chunk.request_id] = 0
                    continue
                count = compact(self.kv_cache, chunk.block_table, kept, self.block_size,
                                self.key_bounds)
                result.evicted[chunk.request_id] = length - count
            except Exception as exc:  # noqa: BLE001 - fails this request only
                result.failed[chunk.request_id] = (
                    f"static KV eviction failed: {type(exc).__name__}: {exc}")

    def _prompt_logprobs(self, chunks: list[ScheduledChunk], hidden: torch.Tensor,
                         result: StepResult) -> None:
        """Score the prompt tokens of chunks that ask for prompt logprobs: row ``p`` of a chunk
        (position ``p``) gives the log-probability of the prompt token at ``p + 1``."""
        row = 0
        for chunk in chunks:
            k = chunk.sampling_params.prompt_logprobs
            num_prompt = len(chunk.prompt_token_ids)
            # positions start .. last - 1 score prompt tokens start + 1 .. last
            last = min(chunk.start_pos + chunk.num_tokens, num_prompt - 1)
            if k is not None and last > chunk.start_pos:
                try:
                    entries = []
                    for first in range(chunk.start_pos, last, PROMPT_SCORE_ROWS):
                        count = min(PROMPT_SCORE_ROWS, last - first)
                        start = row + first - chunk.start_pos
                        logits = self.model.compute_logits(self._pad(hidden[start:start + count]))
                        if not bool(torch.isfinite(logits[:count].sum(dim=-1)).all()):
                            raise ValueError("the model produced non-finite logits (NaN or inf)")
                        targets = chunk.prompt_token_ids[first + 1:first + count + 1]
                        entries += score_tokens(logits[:count], targets, k)
                    result.prompt_logprobs[chunk.request_id] = PromptLogprobs(
                        chunk.start_pos + 1, entries)
                except Exception as exc:  # noqa: BLE001 - fails this request only
                    result.failed[chunk.request_id] = (
                        f"scoring its prompt failed: {type(exc).__name__}: {exc}")
            row += chunk.num_tokens

    def _pad(self, rows: torch.Tensor) -> torch.Tensor:
        missing = self.pad_rows - rows.shape[0]
        if missing <= 0:
            return rows
        return torch.cat([rows, rows.new_zeros(missing, *rows.shape[1:])])

    def _prepare(self, chunks: list[ScheduledChunk], observers: dict | None = None
                 ) -> StepInputs:
        """The plan's chunks as model inputs, in this runner's reused step buffers."""
        return self.inputs.build(chunks, observers)
