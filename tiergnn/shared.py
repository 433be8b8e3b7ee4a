"""One cache across workers: each node has a home worker, lookups travel by all_to_all.

```
 worker 0: batch ids ──split by owner──┐             ┌── rows back, in request order
 worker 1: batch ids ──split by owner──┤ all_to_all  │ all_to_all
                                       ▼             │
            each owner serves what it was asked through its own TieredCache
            (slab -> victim ring -> storage), so a line is cached once, system-wide
```

Every worker calls `gather` once per mini-batch, in lockstep (each must run the same number of
batches: split the seeds evenly). The look-ahead travels too: each worker sends the owners the ids
of each newly sampled batch once, tagged with its batch number, so every owner's policy sees the
next-reuse distances of its own lines across all workers, and prefetches its victim-ring lines
for the next step without another exchange.

`owner_of` is a hash (LSM-GNN's shared cache) or a partition map (the DistDGL-like baseline,
`tiergnn.baselines`). The transport is `torch.distributed` (gloo on CPU, NCCL on GPU); nothing here
assumes the workers share a machine. A peer that dies makes the exchange fail with `WorkerLost`,
never with wrong rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from tiergnn.cache import FeatureCache, TieredCache


class WorkerLost(RuntimeError):
    """A feature exchange failed because a peer died or stopped answering."""


def hash_owner(num_nodes: int, world_size: int) -> torch.Tensor:
    """Home worker of every node: a multiplicative hash, so hubs spread across workers."""
    nodes = torch.arange(num_nodes, dtype=torch.long)
    return ((nodes * 2654435761) % (1 << 32) % world_size).to(torch.int32)


def _is_transport_error(error: RuntimeError) -> bool:
    # gloo reports a dead peer as a plain RuntimeError ("Connection reset by peer", "Timed out").
    text = str(error)
    return isinstance(error, dist.DistError) or any(
        mark in text for mark in ("gloo", "Connection", "onnection closed", "imed out", "NCCL"))


@dataclass(slots=True)
class ExchangeStats:
    bytes_sent: int = 0            # ids and rows to other workers (this worker's share)
    rows_served_remote: int = 0    # rows this worker's cache served to peers
    rows_fetched_remote: int = 0   # rows this worker got from peers


class SharedCache(FeatureCache):
    """A system-wide cache: this worker's `local` cache holds the lines it owns."""

    def __init__(self, local: TieredCache, owner_of: torch.Tensor, group=None):
        self.local = local
        self.owner_of = owner_of
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.step = 0
        self.exchange = ExchangeStats()
        # batch number -> the ids this worker owns that any worker's batch needs (unique): one
        # all_to_all announces a batch from every worker at once, so it is complete on arrival.
        self._future: dict[int, torch.Tensor] = {}
        self._sent_upto = 0                  # batches up to this number were announced
        self._window: list[torch.Tensor] = []

    @property
    def stats(self):
        return self.local.stats

    def reset_stats(self) -> None:
        self.local.reset_stats()
        self.exchange = ExchangeStats()

    def restart_lookahead(self) -> None:
        """A new loader pass begins (every worker at the same step): forget what was announced
        for batches not yet run, so the new pass's batches are announced afresh."""
        for batch in [b for b in self._future if b > self.step]:
            del self._future[batch]
        self._sent_upto = self.step
        self._window = []

    def set_future(self, window: list[torch.Tensor]) -> None:
        """This worker's next batches (window[0] is batch step + 1); announced in `gather`."""
        self._window = window

    def prefetch(self, nodes: torch.Tensor) -> int:
        """Owner-side: move this worker's ring lines that any worker needs next step."""
        upcoming = self._future.get(self.step)
        if upcoming is None or len(upcoming) == 0:
            return 0
        return self.local.prefetch(upcoming)

    def gather(self, nodes: torch.Tensor) -> torch.Tensor:
        """Rows of `nodes` (unique global ids), from their owners' caches."""
        nodes = nodes.long()
        try:
            self._announce_window()
            self._set_owner_window()
            order = torch.argsort(self.owner_of[nodes], stable=True)
            send_counts = torch.bincount(self.owner_of[nodes], minlength=self.world)
            asked, recv_counts = self._all_to_all_ids(nodes[order], send_counts)
            unique, inverse = torch.unique(asked, return_inverse=True)
            served = self.local.gather(unique)[inverse]                     # (asked, dim)
            rows = self._all_to_all_rows(served, recv_counts, send_counts)
        except RuntimeError as error:
            if isinstance(error, WorkerLost) or not _is_transport_error(error):
                raise
            raise WorkerLost(f"worker {self.rank}: the feature exchange at step {self.step} "
                             f"failed ({error}); a peer died or timed out. No rows were returned."
                             ) from error
        out = torch.empty_like(rows)
        out[order.to(rows.device)] = rows
        self._future.pop(self.step, None)
        self._window = []                    # each step's window is set afresh
        self.step += 1
        return out

    # The exchanges ---------------------------------------------------------------------------
    def _announce_window(self) -> None:
        """Send owners the ids of batches sampled since the last step, tagged by number."""
        last = self.step + len(self._window)
        # Every worker must make the same exchanges: agree on how far the windows reach first.
        self._check_same_window_end(last)
        for batch in range(max(self._sent_upto, self.step) + 1, last + 1):
            ids = self._window[batch - self.step - 1].long()
            order = torch.argsort(self.owner_of[ids], stable=True)
            counts = torch.bincount(self.owner_of[ids], minlength=self.world)
            owned, _ = self._all_to_all_ids(ids[order], counts)
            self._future[batch] = torch.unique(owned)
        self._sent_upto = max(self._sent_upto, last)

    def _check_same_window_end(self, last: int) -> None:
        mine = torch.tensor([last], dtype=torch.long)
        everyone = [torch.zeros(1, dtype=torch.long) for _ in range(self.world)]
        dist.all_gather(everyone, mine, group=self.group)
        if len({int(t) for t in everyone}) != 1:
            raise WorkerLost(f"workers announced different look-ahead ends {everyone}: each must "
                             f"run the same number of batches with the same window")

    def _set_owner_window(self) -> None:
        empty = torch.empty(0, dtype=torch.long)
        self.local.policy.set_future([self._future.get(batch, empty)
                                      for batch in range(self.step + 1, self._sent_upto + 1)])

    def _all_to_all_ids(self, ids: torch.Tensor, send_counts: torch.Tensor):
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        received = torch.empty(int(recv_counts.sum()), dtype=torch.long)
        dist.all_to_all_single(received, ids, recv_counts.tolist(), send_counts.tolist(),
                               group=self.group)
        remote = int(send_counts.sum() - send_counts[self.rank])
        self.exchange.bytes_sent += remote * 8
        return received, recv_counts

    def _all_to_all_rows(self, served: torch.Tensor, recv_counts, send_counts) -> torch.Tensor:
        # Rows travel as raw bytes (gloo has no float16 or int16 all_to_all).
        out = torch.empty(int(send_counts.sum()), served.shape[1] * served.element_size(),
                          dtype=torch.uint8, device=served.device)
        dist.all_to_all_single(out, served.contiguous().view(torch.uint8), send_counts.tolist(),
                               recv_counts.tolist(), group=self.group)
        remote_out = int(recv_counts.sum() - recv_counts[self.rank])
        self.exchange.rows_served_remote += remote_out
        self.exchange.rows_fetched_remote += int(send_counts.sum() - send_counts[self.rank])
        self.exchange.bytes_sent += remote_out * served.shape[1] * served.element_size()
        return out.view(served.dtype)
