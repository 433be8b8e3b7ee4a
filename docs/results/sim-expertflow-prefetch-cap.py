"""How wide a prefetch window? `expertflow` on three cases of `tierserve sim reproduce
expertflow`, under windows of 1, 2, 4 and 16 loads in flight and none (0), two ways:

- front (what ExpertBooks does): only the first ``window - in flight`` experts of the policy's
  list (most urgent first) are considered;
- anywhere: up to ``window - in flight`` loads start from anywhere down the list.

    python docs/results/sim-expertflow-prefetch-cap.py TRACE TRAIN_TRACE PREDICTIONS
"""

import sys

from tierserve.experts import books
from tierserve.sim import repro_expertflow as repro

front = books.ExpertBooks.prefetch


def anywhere(self, keys):
    window, self.prefetch_window = self.prefetch_window, None
    try:
        for key in keys:
            if len(self._load_key) >= window:
                return
            front(self, [key])
    finally:
        self.prefetch_window = window


inputs = repro.ExpertInputs(*sys.argv[1:4])
cases = (repro.ExpertCase(0.25, 1), repro.ExpertCase(0.25, 16), repro.ExpertCase(0.5, 16))
for case in cases:
    row = repro.run_case((case, "lru", inputs))
    print(f"lru          | {case.name} | {row['output_tokens_per_s']:5.2f} tok/s")
for mode, window in [("front", w) for w in (0, 1, 2, 4, 16)] + [("anywhere", 1), ("anywhere", 2)]:
    books.ExpertBooks.prefetch = front if mode == "front" else anywhere
    repro.PREFETCH_WINDOW = window
    for case in cases:
        row = repro.run_case((case, "expertflow", inputs))
        print(f"{mode:8s} {window:3d} | {case.name} | hit {row['hit_ratio']:.3f} | "
              f"{row['gib_loaded']:6.0f} GiB | {row['output_tokens_per_s']:5.2f} tok/s", flush=True)
