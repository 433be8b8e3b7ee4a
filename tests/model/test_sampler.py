"""Sampler behaviour on synthetic logits: each knob does what it says, seeds are private."""

from __future__ import annotations

import math

import pytest
import torch

from tierserve.model.sampler import Sampler
from tierserve.request import SamplingParams
from tierserve.sched.plan import ScheduledChunk

VOCAB = 8


def _row(rid="r", prompt=(1,), output=(), **params):
    return ScheduledChunk(rid, [0], 0, [0], True, SamplingParams(**params), list(prompt),
                          list(output), frozenset({7}))


def _logits(*values):
    return torch.tensor([list(values)], dtype=torch.float32)


BASE = (4.0, 3.0, 2.0, 1.0, 0.0, -1.0, -2.0, 5.0)  # token 7 (eos) is the most likely


def _draws(params_kw, n=300, logits=BASE, seed=0, **row_kw):
    sampler = Sampler(seed)
    return [sampler.sample(_logits(*logits), [_row(**row_kw, **params_kw)]).token_ids[0]
            for _ in range(n)]


def test_greedy_takes_the_argmax():
    assert set(_draws({"temperature": 0.0}, n=5)) == {7}


def test_top_k_limits_draws_to_the_k_best():
    assert set(_draws({"temperature": 1.0, "top_k": 2})) == {7, 0}


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.softmax(torch.tensor(BASE), -1)
    assert probs[7] < 0.7 < probs[7] + probs[0]
    assert set(_draws({"temperature": 1.0, "top_p": 0.7})) == {7, 0}


def test_min_p_drops_tokens_below_a_fraction_of_the_best():
    # p(token)/p(best) = e^(logit - 5): tokens 0 (e^-1) and 1 (e^-2) stay above 0.1, token 2 not.
    assert set(_draws({"temperature": 1.0, "min_p": 0.1})) == {7, 0, 1}


def test_temperature_sharpens_and_flattens():
    cold = _draws({"temperature": 0.2})
    hot = _draws({"temperature": 5.0})
    assert cold.count(7) > 250 and len(set(hot)) >= 6


def test_sampling_frequencies_follow_the_probabilities():
    draws = _draws({"temperature": 1.0}, n=4000, logits=(0.0, math.log(3.0)) + (-50.0,) * 6)
    assert abs(draws.count(1) / 4000 - 0.75) < 0.03


def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    draws = _draws({"temperature": 0.0, "min_tokens": 2, "stop_token_ids": [0]}, n=1, output=(3,))
    assert draws == [1]  # eos (7) and stop id 0 masked: next best is token 1
    assert _draws({"temperature": 0.0, "min_tokens": 2}, n=1, output=(3, 4)) == [7]


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    sampler = Sampler()
    logits = _logits(*BASE)
    row = _row(prompt=(7,), output=(6,), repetition_penalty=2.0)
    sampler._apply_penalties(logits, [row])
    assert logits[0, 7].item() == 2.5 and logits[0, 6].item() == -4.0 and logits[0, 0].item() == 4.0


def test_presence_and_frequency_penalties_count_output_tokens_only():
    sampler = Sampler()
    logits = _logits(*BASE)
    row = _row(prompt=(0,), output=(7, 7, 1), presence_penalty=0.5, frequency_penalty=0.25)
    sampler._apply_penalties(logits, [row])
    assert logits[0, 7].item() == pytest.approx(5.0 - 0.5 - 0.5)
    assert logits[0, 1].item() == pytest.approx(3.0 - 0.5 - 0.25)
    assert logits[0, 0].item() == 4.0


def test_seeded_rows_do_not_depend_on_their_neighbours():
    def draw(neighbours):
        sampler = Sampler(seed=123)
        rows = [_row("seeded", temperature=1.0, seed=7)] + [
            _row(f"n{i}", temperature=1.0) for i in range(neighbours)]
        logits = torch.randn(1 + neighbours, VOCAB, generator=torch.Generator().manual_seed(0))
        logits[0] = torch.tensor(BASE)
        return [sampler.sample(logits, rows).token_ids[0] for _ in range(30)]

    assert draw(0) == draw(3) == draw(5)


def test_logprobs_report_rank_and_top_alternatives():
    sampler = Sampler()
    sampled = sampler.sample(_logits(*BASE), [_row(temperature=0.0, logprobs=3)])
    tokens, logprobs = sampled.token_ids, sampled.logprobs
    entry = logprobs[0]
    reference = torch.log_softmax(torch.tensor(BASE), -1)
    assert tokens == [7] and entry.rank == 1
    assert [t for t, _ in entry.top] == [7, 0, 1]
    assert entry.logprob == pytest.approx(reference[7].item())


def test_batched_penalties_and_masks_equal_each_row_alone():
    """Mixed rows in one batch get exactly what each would get alone (flat-index scatter)."""
    rows = [
        _row("a", prompt=(1, 2, 2), output=(3, 3, 5), repetition_penalty=1.3,
             frequency_penalty=0.2),
        _row("b", prompt=(0,), output=(), temperature=0.0),
        _row("c", prompt=(4,), output=(7, 1, 1), presence_penalty=0.7, min_tokens=5,
             stop_token_ids=[2]),
        _row("d", prompt=(6, 6), output=(6,), repetition_penalty=0.8, min_tokens=2,
             ignore_eos=True),
    ]
    logits = torch.randn(len(rows), VOCAB, generator=torch.Generator().manual_seed(4))
    together = logits.clone()
    Sampler._mask_early_stops(together, rows)
    Sampler._apply_penalties(together, rows)
    for index, row in enumerate(rows):
        alone = logits[index : index + 1].clone()
        Sampler._mask_early_stops(alone, [row])
        Sampler._apply_penalties(alone, [row])
        assert torch.equal(together[index], alone[0]), row.request_id
    assert together[2, 7] == -math.inf and together[2, 2] == -math.inf  # eos and stop id
    assert together[3, 7] != -math.inf  # ignore_eos keeps eos
    assert torch.equal(together[1], logits[1])  # a plain row is untouched
    expected = logits[0, 3] / 1.3 if logits[0, 3] > 0 else logits[0, 3] * 1.3
    assert together[0, 3].item() == pytest.approx(expected.item() - 2 * 0.2)


# -- a row that cannot be sampled fails alone -----------------------------------------------------
def _mixed_rows():
    """Greedy, seeded and penalised rows: their tokens must not change when another row fails."""
    return [_row("greedy", temperature=0.0), _row("seeded", temperature=1.0, seed=7),
            _row("penalised", temperature=0.0, output=(7, 7), repetition_penalty=3.0,
                 frequency_penalty=1.0)]


def _sample_with(bad_row, bad_logits=None, draws=5):
    """Tokens of the mixed rows over ``draws`` steps, with ``bad_row`` second in the batch."""
    sampler, out = Sampler(0), []
    for _ in range(draws):
        rows = _mixed_rows()
        logits = _logits(*BASE).repeat(len(rows), 1)
        if bad_row is not None:
            rows.insert(1, bad_row)
            logits = torch.cat([logits[:1], bad_logits if bad_logits is not None
                                else _logits(*BASE), logits[1:]])
        sampled = sampler.sample(logits, rows)
        tokens = list(sampled.token_ids)
        if bad_row is not None:
            assert list(sampled.failed) == [1] and tokens.pop(1) is None
        out.append((tokens, sampled.failed.get(1)))
    return out


def _raises(output_ids, row):
    raise ValueError("user code broke")


@pytest.mark.parametrize("case", ["nan", "inf", "processor_raises", "masks_everything",
                                  "bad_stop_id", "bad_seed"])
def test_a_row_that_cannot_be_sampled_fails_alone_and_the_others_are_unchanged(case):
    bad_logits = None
    if case in ("nan", "inf"):
        bad_logits = _logits(*BASE)
        bad_logits[0, 3] = float("nan") if case == "nan" else float("inf")
        bad = _row("bad", temperature=0.0)
    elif case == "processor_raises":
        bad = _row("bad", temperature=0.0, logits_processors=[_raises])
    elif case == "masks_everything":
        bad = _row("bad", temperature=0.5, logits_processors=[
            lambda prompt, output, row: row.fill_(float("-inf"))])
    elif case == "bad_stop_id":  # outside the vocabulary: a batched index op raises
        bad = _row("bad", temperature=0.0, min_tokens=3)
        bad.sampling_params.stop_token_ids = [VOCAB + 5]
    else:  # a seed mutated past what a generator takes, after validation
        bad = _row("bad", temperature=1.0)
        bad.sampling_params.seed = 2**70
    expected = [tokens for tokens, _ in _sample_with(None)]
    results = _sample_with(bad, bad_logits)
    assert [tokens for tokens, _ in results] == expected
    reason = results[0][1]
    assert {"nan": "non-finite", "inf": "non-finite", "processor_raises": "user code broke",
            "masks_everything": "no token is left", "bad_stop_id": "sampling failed",
            "bad_seed": "seed"}[case] in reason


def test_logits_processors_take_both_vllm_signatures_and_steer_the_row():
    def only_token_2(output_ids, row):
        mask = torch.full_like(row, float("-inf"))
        mask[2] = 0.0
        return row + mask

    def saw_prompt(prompt_ids, output_ids, row):
        seen.append((list(prompt_ids), list(output_ids)))
        return None  # None: the row is used as edited in place (here untouched)

    seen = []
    rows = [_row("a", temperature=0.0, logits_processors=[only_token_2]),
            _row("b", prompt=(4, 5), output=(6,), temperature=0.0, logits_processors=[saw_prompt]),
            _row("c", temperature=0.0)]
    sampled = Sampler(0).sample(_logits(*BASE).repeat(3, 1), rows)
    assert sampled.token_ids == [2, 7, 7] and not sampled.failed
    assert seen == [([4, 5], [6])]


def test_score_tokens_gives_log_softmax_ranks_and_top_alternatives():
    from tierserve.model.sampler import score_tokens

    logits = torch.tensor([BASE, tuple(reversed(BASE))], dtype=torch.float32)
    entries = score_tokens(logits, [0, 0], top=2)
    expected = torch.log_softmax(logits, dim=-1)
    assert [e.token_id for e in entries] == [0, 0]
    assert entries[0].logprob == pytest.approx(expected[0, 0].item())
    assert entries[0].rank == 2 and entries[1].rank == 1  # token 7 (5.0) beats 0 (4.0) in row 0
    assert [t for t, _ in entries[0].top] == [7, 0] and entries[1].top[0][0] == 0
    assert entries[1].top[0][1] == pytest.approx(expected[1].max().item())
