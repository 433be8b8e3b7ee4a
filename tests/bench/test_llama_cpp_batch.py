"""The llama.cpp batched baseline's prefill packing (pure; llama-cpp-python not needed)."""

from __future__ import annotations

import pytest

from tierserve.bench.llama_cpp_batch import PrefillSpan, prefill_chunks


def test_prompts_share_a_prefill_batch_while_they_fit():
    assert prefill_chunks([3, 2, 4], 16) == [
        [PrefillSpan(0, 0, 3), PrefillSpan(1, 0, 2), PrefillSpan(2, 0, 4)]]


def test_a_prompt_longer_than_the_room_left_continues_in_the_next_batch():
    chunks = prefill_chunks([5, 6], 4)
    assert chunks == [[PrefillSpan(0, 0, 4)],
                      [PrefillSpan(0, 4, 5), PrefillSpan(1, 0, 3)],
                      [PrefillSpan(1, 3, 6)]]
    assert all(sum(s.end - s.start for s in chunk) <= 4 for chunk in chunks)


def test_empty_prompts_and_batches_are_refused():
    with pytest.raises(ValueError, match="at least one token"):
        prefill_chunks([3, 0], 4)
    with pytest.raises(ValueError, match="n_batch"):
        prefill_chunks([3], 0)
