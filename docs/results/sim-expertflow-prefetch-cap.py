"""What if prefetches were throttled? ExpertBooks.prefetch wrapped to keep at most CAP loads in
flight (-1: no cap, as built), on three cases of `tierserve sim reproduce expertflow`.

    python docs/results/sim-expertflow-prefetch-cap.py TRACE TRAIN_TRACE PREDICTIONS
"""

import sys

from tierserve.experts import books
from tierserve.sim import repro_expertflow as repro

unthrottled = books.ExpertBooks.prefetch


def capped(cap):
    def prefetch(self, keys):
        if cap >= 0:
            keys = keys[:max(0, cap - len(self._load_key))]
        return unthrottled(self, keys)
    return prefetch


inputs = repro.ExpertInputs(*sys.argv[1:4])
for cap in (-1, 4, 16):
    books.ExpertBooks.prefetch = capped(cap)
    for case in (repro.ExpertCase(0.25, 1), repro.ExpertCase(0.25, 16), repro.ExpertCase(0.5, 16)):
        for policy in ("lru", "static", "expertflow", "oracle"):
            row = repro.run_case((case, policy, inputs))
            print(f"cap {cap:3d} | {case.name} | {policy:10s} | hit {row['hit_ratio']:.3f} | "
                  f"{row['gib_loaded']:6.0f} GiB | {row['output_tokens_per_s']:5.2f} tok/s")
