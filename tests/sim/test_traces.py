"""Traces: the papers' length statistics, conversations, CSV import."""

import numpy as np
import pytest

from tierserve.sim.traces import (
    LENGTH_TRACES,
    conversation_trace,
    length_trace,
    load_csv_trace,
    make_trace,
    poisson_arrivals,
)


@pytest.mark.parametrize("name", ["sharegpt4", "arxiv"])
def test_length_traces_match_the_papers_median_and_p90(name):
    spec = LENGTH_TRACES[name]
    trace = length_trace(name, 20000, seed=0)
    prompts = np.array([r.prompt_len for r in trace])
    outputs = np.array([r.output_len for r in trace])
    for values, stats in ((prompts, spec.prompt), (outputs, spec.output)):
        assert np.median(values) == pytest.approx(stats.median, rel=0.03)
        assert np.percentile(values, 90) == pytest.approx(stats.p90, rel=0.03)
    assert (prompts + outputs).max() <= spec.max_total


def test_traces_are_reproducible_from_a_seed():
    first = [(r.prompt_len, r.output_len) for r in length_trace("sharegpt4", 50, seed=4)]
    again = [(r.prompt_len, r.output_len) for r in length_trace("sharegpt4", 50, seed=4)]
    other = [(r.prompt_len, r.output_len) for r in length_trace("sharegpt4", 50, seed=5)]
    assert first == again != other


def test_conversations_average_five_and_a_half_turns_within_the_context():
    trace = conversation_trace(1000, seed=0, max_context=8192)
    assert len(trace) / 1000 == pytest.approx(5.5, rel=0.05)
    by_id = {r.request_id: r for r in trace}
    starts = [r for r in trace if r.follows is None]
    assert len(starts) == 1000
    for request in trace:
        if request.follows is not None:
            assert by_id[request.follows].client_id == request.client_id
            assert request.think_s >= 0


def test_poisson_arrivals_have_the_rate_and_leave_follow_ups_alone():
    trace = conversation_trace(2000, seed=1)
    poisson_arrivals(trace, rate=2.0, seed=1)
    firsts = [r.arrival_s for r in trace if r.follows is None]
    assert all(r.arrival_s is None for r in trace if r.follows is not None)
    assert firsts == sorted(firsts)
    assert len(firsts) / firsts[-1] == pytest.approx(2.0, rel=0.1)  # sd ~2% at 2000


def test_vidur_and_azure_csv_traces(tmp_path):
    vidur = tmp_path / "vidur.csv"
    vidur.write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n"
                     "10.5,100,20\n11.0,2000,5\n")
    assert [(r.prompt_len, r.output_len, r.arrival_s) for r in load_csv_trace(vidur)] == [
        (100, 20, 0.0), (2000, 5, 0.5)]
    azure = tmp_path / "azure.csv"
    azure.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                     "2023-11-16 18:15:46.6805900,374,44\n2023-11-16 18:15:50.9951690,396,109\n")
    trace = make_trace(str(azure), 0)
    assert [(r.prompt_len, r.output_len) for r in trace] == [(374, 44), (396, 109)]
    assert trace[1].arrival_s == pytest.approx(4.314579, abs=1e-5)
    no_times = tmp_path / "lengths.csv"
    no_times.write_text("num_prefill_tokens,num_decode_tokens\n5,6\n")
    assert load_csv_trace(no_times)[0].arrival_s is None
    bad = tmp_path / "bad.csv"
    bad.write_text("prompt,output\n1,2\n")
    with pytest.raises(ValueError, match="Vidur columns"):
        load_csv_trace(bad)
    with pytest.raises(ValueError, match="unknown trace"):
        make_trace("nope", 3)


def test_jsonl_dataset_keeps_its_token_ids(tmp_path):
    import json

    path = tmp_path / "batch.jsonl"
    path.write_text("\n".join(json.dumps({"prompt_token_ids": [20, 21, 22, i], "max_tokens": 5,
                                          "client_id": "u"}) for i in range(3)) + "\n")
    trace = make_trace(str(path), 0)
    assert [(r.prompt_len, r.output_len, r.client_id) for r in trace] == [(4, 5, "u")] * 3
    assert trace[2].prompt_token_ids == [20, 21, 22, 2]
