"""`tierserve bench grammar-engines`: the instances it walks are valid, and llguidance runs
(xgrammar too where it is installed)."""

from __future__ import annotations

import json
import random

import jsonschema

from tierserve.bench.cli import main
from tierserve.bench.grammar_engines import instance
from tierserve.bench.structured import random_schema


def test_the_smallest_instances_are_valid():
    for seed in range(40):
        schema = random_schema(random.Random(seed))
        jsonschema.validate(instance(schema), schema)


def test_bench_grammar_engines_times_llguidance(tiny_llama_dir, tmp_path):
    out = tmp_path / "engines.json"
    assert main(["grammar-engines", "--model", str(tiny_llama_dir), "--num-schemas", "4",
                 "--json", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    row = results["llguidance"]
    assert row["compile_ms_median"] > 0 and row["mask_ms_per_step"] > 0 and row["steps"] > 3
