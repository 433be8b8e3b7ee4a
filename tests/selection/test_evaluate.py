"""The quality evaluation: fidelity metrics computed right, teacher forcing feeds the answer,
and every policy runs through the same engine path."""

from __future__ import annotations

import math

import pytest
import torch

from tierserve.selection.evaluate import evaluate, fidelity, policy_options


def test_fidelity_skips_the_first_token_and_measures_the_rest():
    reference = [torch.log_softmax(torch.tensor(r), -1)
                 for r in ([5.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 2.0])]
    same = fidelity(reference, reference, [0, 1, 2])
    assert same["top1"] == 1.0 and abs(same["kl"]) < 1e-7
    assert same["nll"] == pytest.approx(-(float(reference[1][1]) + float(reference[2][2])) / 2)
    uniform = [torch.log_softmax(torch.zeros(3), -1)] * 3
    swapped = [reference[0], uniform[1], torch.log_softmax(torch.tensor([9.0, 0.0, 0.0]), -1)]
    other = fidelity(swapped, reference, [0, 1, 2])
    assert other["top1"] == 0.0  # position 1 ties (argmax 0 != 1), position 2 differs
    expected_kl = float((reference[1].exp() * (reference[1] - uniform[1])).sum())
    expected_kl += float((reference[2].exp() * (reference[2] - swapped[2])).sum())
    assert other["kl"] == pytest.approx(expected_kl / 2)
    assert other["nll"] == pytest.approx((math.log(3) - float(swapped[2][2])) / 2)


def test_policy_options_name_the_engine_flags():
    assert policy_options("quest", 0.1) == dict(kv_selection="quest", kv_budget=0.1)
    assert policy_options("mpcache-static", 0.2) == dict(kv_eviction="mpcache",
                                                         kv_eviction_budget=0.2)
    both = policy_options("mpcache-both", 0.1)
    assert both["kv_eviction_budget"] * both["kv_budget"] == pytest.approx(0.1)


def test_every_policy_evaluates_through_the_engine(tiny_llama_dir):
    rows = evaluate(str(tiny_llama_dir), ["passkey"], [400], 2,
                    [("mpcache", 0.2), ("snapkv", 0.2), ("mpcache-both", 0.2)], dtype="float32")
    assert [r["policy"] for r in rows] == ["full", "mpcache", "snapkv", "mpcache-both"]
    full = rows[0]
    assert full["top1"] == 1.0 and abs(full["kl"]) < 1e-6 and full["agreement"] == 1.0
    assert all(r["nll"] > 0 for r in rows)
    assert any(r["kl"] > 1e-4 for r in rows[1:])  # a 20% budget changes the logits
