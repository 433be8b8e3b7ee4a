"""Long-context task generators: seeded, near the asked length, the answer inside the prompt."""

from __future__ import annotations

import pytest

from tierserve.selection.tasks import correct, make_samples


class _WordTokenizer:
    def encode(self, text: str) -> list[str]:
        return text.split()


@pytest.mark.parametrize("task", ["passkey", "needle"])
def test_samples_are_seeded_hold_their_answer_and_fit_the_length(task):
    tokenizer = _WordTokenizer()
    first = make_samples(tokenizer, task, 1500, 3, seed=5)
    again = make_samples(tokenizer, task, 1500, 3, seed=5)
    other = make_samples(tokenizer, task, 1500, 3, seed=6)
    assert [s.prompt for s in first] == [s.prompt for s in again]
    assert [s.answer for s in first] != [s.answer for s in other]
    for sample in first:
        assert sample.answer in sample.prompt
        assert 1200 <= len(tokenizer.encode(sample.prompt)) <= 1500
        assert correct(sample, f" {sample.answer}.") and not correct(sample, " 0.")
