"""`tierserve bench structured` on the tiny model: the three parts run and report."""

from __future__ import annotations

import json
import random

import jsonschema

from tierserve.bench.cli import main
from tierserve.bench.structured import random_schema


def test_random_schemas_are_valid_json_schemas_and_seeded():
    first = [random_schema(random.Random(7)) for _ in range(3)]
    assert first == [random_schema(random.Random(7)) for _ in range(3)]
    for schema in (random_schema(random.Random(i)) for i in range(50)):
        jsonschema.Draft202012Validator.check_schema(schema)
        assert schema["required"] == list(schema["properties"])


def test_bench_structured_reports_validity_compile_time_and_throughput(tiny_llama_dir, tmp_path):
    out = tmp_path / "structured.json"
    code = main(["structured", "--model", str(tiny_llama_dir), "--num-schemas", "3", "--batch",
                 "4", "--output-len", "24", "--no-progress", "--json", str(out)])
    assert code == 0
    document = json.loads(out.read_text())
    results = document["results"]
    assert results["json-schema"]["output_tokens"] == results["unconstrained"]["output_tokens"]
    assert document["validity"]["schemas"] == 3
    assert document["compile_ms"]["cold_median"] > 0
    assert 0 < document["throughput_ratio"]
