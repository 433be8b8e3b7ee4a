"""Benchmarks on the in-process engine: seeded workloads, online latency, fairness, swap groups.

``tierserve bench online | fairness | swap`` (see tierserve.bench.cli); results are written as
JSON ``{machine, config, results}`` and quoted in docs/benchmarks.md with their command lines.
"""
