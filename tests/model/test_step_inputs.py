"""StepInputBuilder: the step's inputs equal a plain per-token construction, buffers are reused
across steps and grow when a step is larger than they are."""

from __future__ import annotations

import random

import pytest

from tierserve.model.step_inputs import StepInputBuilder
from tierserve.request import SamplingParams
from tierserve.sched.plan import ScheduledChunk

BLOCK = 4
PARAMS = SamplingParams(temperature=0.0)


def _chunk(name: str, start: int, length: int, rng: random.Random, sample: bool = True
           ) -> ScheduledChunk:
    blocks = rng.sample(range(1000), -(-(start + length) // BLOCK))
    tokens = [rng.randrange(50) for _ in range(length)]
    return ScheduledChunk(name, tokens, start, blocks, sample, PARAMS, tokens, [])


def _plan(rng: random.Random, decodes: int, prefills: int) -> list[ScheduledChunk]:
    chunks = [_chunk(f"d{i}", rng.randrange(1, 90), 1, rng) for i in range(decodes)]
    chunks += [_chunk(f"p{i}", rng.randrange(0, 40), rng.randrange(2, 30), rng,
                      sample=rng.random() < 0.5) for i in range(prefills)]
    rng.shuffle(chunks)
    return chunks


def _reference(chunks: list[ScheduledChunk], pad_rows: int):
    """Token by token, the obvious way."""
    ids, pos, blocks, samples = [], [], [], []
    for chunk in chunks:
        for offset, token in enumerate(chunk.token_ids):
            p = chunk.start_pos + offset
            ids.append(token)
            pos.append(p)
            blocks.append(chunk.block_table[p // BLOCK])
        if chunk.sample:
            samples.append(len(ids) - 1)
    missing = max(0, pad_rows - len(ids))
    return ids + [0] * missing, pos + [0] * missing, blocks, samples


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("pad_rows", [1, 16])
def test_inputs_match_a_per_token_construction(native, pad_rows):
    rng = random.Random(7)
    builder = StepInputBuilder(BLOCK, pad_rows, native, max_tokens=8, max_seqs=2,
                               max_blocks_per_seq=2)  # tiny: most steps grow the buffers
    for step in range(30):
        chunks = _plan(rng, decodes=rng.randrange(0, 12), prefills=rng.randrange(0, 3)) or \
            _plan(rng, 1, 0)
        inputs = builder.build(chunks)
        ids, pos, blocks, samples = _reference(chunks, pad_rows)
        meta = inputs.meta
        assert inputs.input_ids.tolist() == ids, step
        assert inputs.positions.tolist() == pos
        assert meta.num_tokens == len(blocks)
        assert meta.slot_blocks.tolist() == blocks
        assert meta.slot_offsets.tolist() == [p % BLOCK for p in pos[: len(blocks)]]
        assert inputs.sample_rows.tolist() == samples
        starts = [0]
        for chunk in chunks:
            starts.append(starts[-1] + chunk.num_tokens)
        decodes = [(row, chunk) for row, chunk in zip(starts, chunks) if chunk.num_tokens == 1]
        multi = [(row, chunk) for row, chunk in zip(starts, chunks) if chunk.num_tokens > 1]
        assert [(s, n, ctx) for s, n, ctx, _ in meta.chunks] == [
            (row, c.num_tokens, c.start_pos + c.num_tokens) for row, c in multi]
        for (_, _, _, table), mask, (_, chunk) in zip(meta.chunks, meta.chunk_masks, multi):
            assert table.tolist() == chunk.block_table
            ctx = chunk.start_pos + chunk.num_tokens
            expected = [[k <= chunk.start_pos + q for k in range(ctx)]
                        for q in range(chunk.num_tokens)]
            assert mask.tolist() == expected
        _check_decodes(meta, decodes, native)


def _check_decodes(meta, decodes, native):
    if native and decodes:
        rows, tables, lens = meta.decodes
        assert tables.is_contiguous()
        assert rows.tolist() == [row for row, _ in decodes]
        assert lens.tolist() == [c.start_pos + 1 for _, c in decodes]
        for table, (_, chunk) in zip(tables.tolist(), decodes):
            assert table == chunk.block_table + [0] * (len(table) - len(chunk.block_table))
        assert meta.decode_buckets == []
        assert meta.all_decodes == (len(decodes) == meta.num_tokens)
        return
    assert meta.decodes is None
    seen = []
    for rows, tables, mask in meta.decode_buckets:
        lens = []
        for row, table, visible in zip(rows.tolist(), tables.tolist(), mask[:, 0, 0].tolist()):
            chunk = dict(decodes)[row]
            assert table[: len(chunk.block_table)] == chunk.block_table
            assert visible == [k < chunk.start_pos + 1 for k in range(len(visible))]
            lens.append(chunk.start_pos + 1)
            seen.append(row)
        assert max(lens) <= 2 * min(lens) + BLOCK  # the bucket rule
    assert sorted(seen) == sorted(row for row, _ in decodes)


def test_buffers_are_reused_between_steps():
    rng = random.Random(1)
    builder = StepInputBuilder(BLOCK, 1, native=True, max_tokens=64, max_seqs=16,
                               max_blocks_per_seq=32)
    first = builder.build(_plan(rng, 10, 1))
    second = builder.build(_plan(rng, 12, 1))
    assert second.input_ids.data_ptr() == first.input_ids.data_ptr()
    assert second.meta.slot_blocks.data_ptr() == first.meta.slot_blocks.data_ptr()
    assert second.meta.decodes[1].data_ptr() == first.meta.decodes[1].data_ptr()


def test_one_padded_bucket_when_bucketing_is_off():
    rng = random.Random(3)
    builder = StepInputBuilder(BLOCK, 1, native=False, bucket_ratio=None)
    chunks = [_chunk("short", 3, 1, rng), _chunk("long", 300, 1, rng)]
    meta = builder.build(chunks).meta
    assert len(meta.decode_buckets) == 1
    builder.bucket_ratio = 2.0
    assert len(builder.build(chunks).meta.decode_buckets) == 2


def test_runner_output_is_unchanged_by_buffer_growth(tiny_llama_dir):
    """A step far larger than the buffers' initial size gives the same tokens as small steps."""
    from tierserve.engine.llm import LLM

    tiny_llm = LLM(str(tiny_llama_dir), num_blocks=256)
    runner = tiny_llm.engine.runner
    runner.inputs = StepInputBuilder(runner.block_size, runner.pad_rows,
                                     runner.inputs.native, max_tokens=1, max_seqs=1,
                                     max_blocks_per_seq=1)
    params = SamplingParams(temperature=0.0, max_tokens=6)
    prompts = [[1 + i, 2, 3, 4 + i, 5] * (1 + i) for i in range(5)]
    together = [o.outputs[0].token_ids for o in tiny_llm.generate(
        [{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)]
    alone = [tiny_llm.generate([{"prompt_token_ids": p}], params, use_tqdm=False)[0]
             .outputs[0].token_ids for p in prompts]
    assert together == alone
    assert all(len(tokens) == 6 for tokens in together)
