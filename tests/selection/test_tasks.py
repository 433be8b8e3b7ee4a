"""Long-context task generators: seeded, near the asked length, the answer inside the prompt."""

from __future__ import annotations

import pytest

from tierserve.selection.tasks import correct, make_samples


class _WordTokenizer:
    def encode(self, text: str) -> list[str]:
        return text.split()


@pytest.mark.parametrize("task", ["passkey", "needle", "multikey", "vartrack"])
def test_samples_are_seeded_hold_their_answer_and_fit_the_length(task):
    tokenizer = _WordTokenizer()
    first = make_samples(tokenizer, task, 1500, 3, seed=5)
    again = make_samples(tokenizer, task, 1500, 3, seed=5)
    other = make_samples(tokenizer, task, 1500, 3, seed=6)
    assert [s.prompt for s in first] == [s.prompt for s in again]
    assert [s.answer for s in first] != [s.answer for s in other]
    for sample in first:
        assert all(word in sample.prompt for word in sample.answer.split())
        assert 1200 <= len(tokenizer.encode(sample.prompt)) <= 1500
        assert correct(sample, f" {sample.answer}.") and not correct(sample, " 0.")


def test_multikey_asks_for_one_of_four_needles_and_vartrack_for_the_whole_chain():
    tokenizer = _WordTokenizer()
    sample = make_samples(tokenizer, "multikey", 1500, 1, seed=2)[0]
    assert sample.prompt.count("The special magic number for") == 5  # four needles, one question
    chain = make_samples(tokenizer, "vartrack", 1500, 1, seed=2)[0]
    names = chain.answer.split()
    assert len(names) == 4 and chain.prompt.count("VAR ") == 7  # one value, three links
    assert not correct(chain, " ".join(names[:3])) and correct(chain, " ".join(names))
