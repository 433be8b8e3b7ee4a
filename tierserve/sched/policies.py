"""Scheduling policies: who runs first and who is preempted. They never touch memory.

A policy is a small class registered by name; the Scheduler owns the budget loop and the
mechanics of allocation and preemption.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from tierserve.request import Request


class Policy(Protocol):
    """Orders requests for the Scheduler."""

    name: str

    def order_running(self, running: Sequence[Request]) -> list[Request]:
        """Running requests, the first served first."""
        ...

    def order_waiting(self, waiting: Sequence[Request]) -> list[Request]:
        """Waiting (new or preempted) requests, the first admitted first."""
        ...

    def pick_victim(self, candidates: Sequence[Request]) -> Request:
        """The running request to preempt when memory runs out."""
        ...


class FCFSPolicy:
    """First come, first served within priority classes (lower ``priority`` value goes first).

    The victim is the newest-arrived request of the worst class, as in vLLM.
    """

    name = "fcfs"

    @staticmethod
    def _key(request: Request) -> tuple[int, float, str]:
        return (request.priority, request.arrival_time, request.request_id)

    def order_running(self, running: Sequence[Request]) -> list[Request]:
        return sorted(running, key=self._key)

    def order_waiting(self, waiting: Sequence[Request]) -> list[Request]:
        return sorted(waiting, key=self._key)

    def pick_victim(self, candidates: Sequence[Request]) -> Request:
        return max(candidates, key=self._key)


POLICIES: dict[str, type] = {FCFSPolicy.name: FCFSPolicy}


def make_policy(name: str) -> Policy:
    """Instantiate a registered policy by name."""
    if name not in POLICIES:
        raise ValueError(f"unknown scheduling policy {name!r}; choose one of {', '.join(POLICIES)}")
    return POLICIES[name]()
