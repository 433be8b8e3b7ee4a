"""Expert offloading for MoE models: expert tiers (fast slots, host memory, disk), the slot books,
expert-caching policies (lru, static, lookahead, expertflow, oracle), router traces and the
routing-path predictor.

``cache.py``, ``policies.py`` and ``routes.py`` are pure bookkeeping (no torch), like ``sched/``
and ``kv/``; torch appears only where weights move or run (``tiers.py``, ``offload.py``,
``predictor.py``).
"""
