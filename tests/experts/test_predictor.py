"""The routing-path predictor: seeded training, a learnable signal, save and load."""

import random

import torch

from tierserve.experts.predictor import RoutePredictor, train_predictor
from tierserve.experts.routes import RequestTrace, prompt_key, read_traces, write_traces


def _traces(count=40, seed=0):
    """Prompts of low ids route to experts 0-1 and high ids to 2-3, at both layers."""
    rng = random.Random(seed)
    traces = []
    for index in range(count):
        high = index % 2
        prompt = [rng.randrange(30, 60) if high else rng.randrange(0, 30) for _ in range(8)]
        choice = [2, 3] if high else [0, 1]
        traces.append(RequestTrace(prompt, [5, 5, 5], {0: [choice] * 10, 3: [choice[::-1]] * 10}))
    return traces


def test_training_is_seeded_and_reproducible():
    traces = _traces()
    first, report = train_predictor(traces, [0, 3], 4, 2, epochs=40, seed=7)
    again, same = train_predictor(traces, [0, 3], 4, 2, epochs=40, seed=7)
    other, _ = train_predictor(traces, [0, 3], 4, 2, epochs=40, seed=8)
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name]), name
    assert report == same
    assert any(not torch.equal(t, other.state_dict()[n]) for n, t in first.state_dict().items())


def test_the_predictor_learns_what_the_prompt_says_about_routes():
    _, report = train_predictor(_traces(), [0, 3], 4, 2, epochs=200, seed=0)
    assert report.recall == 1.0 and report.precision == 1.0  # held-out requests
    assert report.prior_precision < 0.75  # the average alone cannot tell the two kinds apart
    assert report.kl < report.prior_kl


def test_a_saved_predictor_predicts_the_same(tmp_path):
    predictor, _ = train_predictor(_traces(), [0, 3], 4, 2, epochs=20)
    predictor.save(tmp_path / "p")
    loaded = RoutePredictor.load(tmp_path / "p")
    prompt = [5, 45, 7]
    assert predictor.predict(prompt).shares == loaded.predict(prompt).shares
    assert sorted(loaded.predict(prompt).shares) == [0, 3]


def test_traces_round_trip_through_their_file(tmp_path):
    traces = _traces(4)
    write_traces(tmp_path / "t.jsonl", traces)
    back = read_traces(tmp_path / "t.jsonl")
    assert [(t.prompt, t.output, t.routes) for t in back] == [
        (t.prompt, t.output, t.routes) for t in traces]
    assert prompt_key(back[0].prompt) == prompt_key(list(traces[0].prompt))
