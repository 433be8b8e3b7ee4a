"""The victim buffer's rules on tiny tensors: exclusive, copied back bit for bit, and a full
buffer keeps the experts asked for most."""

import torch

from tierserve.experts.tiers import ExpertWeights, VictimBuffer


def _expert(value: float) -> ExpertWeights:
    return ExpertWeights(torch.full((4, 3), value), torch.full((3, 2), value))


def test_a_full_victim_buffer_keeps_the_most_used_experts_and_gives_them_back():
    buffer = VictimBuffer(2, _expert(0.0))
    slot = _expert(0.0)  # one fast slot, passed from expert to expert

    def load(key, evicted, holds):
        slot.gate_up.fill_(holds)
        slot.down.fill_(holds)  # the evicted expert's weights, still in the slot
        return buffer.exchange(evicted, key, slot.gate_up, slot.down)

    for _ in range(3):
        buffer.uses[(0, 1)] += 1  # expert 1 was asked for three times before
    buffer.uses[(0, 2)] += 1
    assert load((0, 5), (0, 1), 1.0) == 0  # kept: the buffer has room
    assert load((0, 6), (0, 2), 2.0) == 0  # kept too; now full
    buffer.uses[(0, 3)] += 2
    assert load((0, 7), (0, 3), 3.0) == 0  # asked for 2 times > expert 2's 1 time: replaces it
    assert load((0, 8), (0, 4), 4.0) == 0  # asked for 0 times: passed over
    assert buffer.saved == 3 and buffer.passed_over == 1
    moved = load((0, 1), (0, 8), 8.0)  # expert 1 comes back, bit for bit; 8 takes its place
    assert moved == slot.nbytes and torch.equal(slot.gate_up, torch.full((4, 3), 1.0))
    assert load((0, 1), None, 0.0) == 0  # exclusive: it left the buffer
    assert load((0, 3), None, 0.0) == slot.nbytes and torch.equal(slot.down, torch.full((3, 2), 3.0))
    assert buffer.hits == 2 and buffer.misses == 5
    buffer.check_invariants()
