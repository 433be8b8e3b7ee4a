"""Structured outputs in the engine: every output follows its schema, regex or choice, in one
batch with unconstrained requests that stay as they were; bad specs are refused up front."""

from __future__ import annotations

import json
import re

import pytest

from tierserve.engine.llm import LLM
from tierserve.errors import InvalidRequestError
from tierserve.request import SamplingParams
from tierserve.structured import StructuredOutputs

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 20},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "tags": {"type": "array", "items": {"enum": ["a", "b"]},
                                  "maxItems": 3}}}


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    llm = LLM(str(smollm2_path), num_blocks=256, max_model_len=1024)
    yield llm
    llm.engine.runner.close()


def _valid_person(text: str) -> bool:
    value = json.loads(text)
    return (set(value) == {"name", "age", "tags"} and isinstance(value["name"], str)
            and len(value["name"]) <= 20 and isinstance(value["age"], int)
            and 0 <= value["age"] <= 120 and len(value["tags"]) <= 3
            and set(value["tags"]) <= {"a", "b"})


def test_constrained_and_free_requests_share_a_batch(smollm2):
    prompts = [[{"role": "user", "content": f"Describe person number {i} as JSON."}]
               for i in range(3)]
    free = SamplingParams(temperature=0.0, max_tokens=24)
    alone = smollm2.chat(prompts[:1], free, use_tqdm=False)[0].outputs[0].token_ids
    json_params = SamplingParams(temperature=0.0, max_tokens=120,
                                 structured_outputs=StructuredOutputs(json=PERSON))
    sampled = SamplingParams(temperature=0.9, seed=3, max_tokens=120,
                             structured_outputs=StructuredOutputs(json=PERSON))
    choice = SamplingParams(temperature=0.0, max_tokens=8,
                            structured_outputs=StructuredOutputs(choice=("yes", "no", "maybe")))
    regex = SamplingParams(temperature=0.9, seed=1, max_tokens=20,
                           structured_outputs=StructuredOutputs(regex=r"[0-9]{3}-[0-9]{4}"))
    outputs = smollm2.chat(prompts[:1] * 5, [free, json_params, sampled, choice, regex],
                           use_tqdm=False)
    assert outputs[0].outputs[0].token_ids == alone  # the masks touch only their own rows
    for output in outputs[1:3]:
        assert output.outputs[0].finish_reason == "stop"
        assert _valid_person(output.outputs[0].text), output.outputs[0].text
    assert outputs[3].outputs[0].text in ("yes", "no", "maybe")
    assert re.fullmatch(r"[0-9]{3}-[0-9]{4}", outputs[4].outputs[0].text)


def test_any_json_object_and_a_lark_grammar(smollm2):
    params = [SamplingParams(temperature=0.0, max_tokens=80,
                             structured_outputs=StructuredOutputs(json_object=True)),
              SamplingParams(temperature=0.0, max_tokens=10, structured_outputs=StructuredOutputs(
                  grammar='start: "ok " NUMBER\nNUMBER: /[1-9][0-9]?/'))]
    outputs = smollm2.generate(["Output a JSON object:", "Answer:"], params, use_tqdm=False)
    assert isinstance(json.loads(outputs[0].outputs[0].text), dict)
    assert re.fullmatch(r"ok [1-9][0-9]?", outputs[1].outputs[0].text)


@pytest.mark.parametrize("spec, says", [
    (dict(regex="(unclosed"), "regex"),
    (dict(json={"type": "object", "properties": {"a": {"type": "no-such-type"}}}), "json"),
    (dict(grammar="start: undefined_rule"), "grammar"),
])
def test_a_spec_that_cannot_compile_is_refused_before_it_runs(smollm2, spec, says):
    with pytest.raises(InvalidRequestError) as refused:
        smollm2.core.make_request("bad", [1, 2, 3], SamplingParams(
            structured_outputs=StructuredOutputs(**spec, param="structured_outputs")))
    assert refused.value.param == "structured_outputs" and says in refused.value.message.lower()


def test_a_spec_names_exactly_one_kind():
    with pytest.raises(InvalidRequestError, match="exactly one"):
        StructuredOutputs(regex="a", choice=("b",))
    with pytest.raises(InvalidRequestError, match="exactly one"):
        StructuredOutputs()
    with pytest.raises(InvalidRequestError, match="non-empty"):
        StructuredOutputs(choice=())


def test_a_batch_file_line_with_guided_choice(tiny_llama_dir, tmp_path):
    """`tierserve batch` reads the same fields as the server (here vLLM's guided_choice)."""
    from tierserve.batch.jobfile import run_batch_file

    lines = [{"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions",
              "body": {"prompt": f"pick {i}", "max_tokens": 6, "temperature": 1.0, "seed": i,
                       "guided_choice": ["alpha", "beta", "gamma"]}} for i in range(4)]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    llm = LLM(str(tiny_llama_dir), num_blocks=64)
    run_batch_file(llm, source, tmp_path / "out.jsonl", show_progress=False)
    texts = [json.loads(line)["response"]["body"]["choices"][0]["text"]
             for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(texts) == 4 and set(texts) <= {"alpha", "beta", "gamma"}


def test_a_grammar_that_dead_ends_fails_that_request_alone(tiny_llama_dir):
    """'yes' is the whole grammar, then only EOS; min_tokens forbids EOS: nothing is left. The
    request fails with a message saying so; the one beside it finishes."""
    llm = LLM(str(tiny_llama_dir), num_blocks=64)
    stuck = SamplingParams(max_tokens=8, min_tokens=6, temperature=0.0,
                           structured_outputs=StructuredOutputs(choice=("yes",)))
    fine = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    outputs = llm.generate(["a", "b"], [stuck, fine], use_tqdm=False)
    assert outputs[0].error and "structured output" in outputs[0].error
    assert outputs[0].outputs[0].finish_reason == "error"
    assert len(outputs[1].outputs[0].token_ids) == 4 and not outputs[1].error
    assert llm.core.kv.num_free_blocks == llm.core.kv.num_blocks


def test_a_mask_that_raises_fails_only_the_constrained_rows(tiny_llama_dir, monkeypatch):
    from tierserve.structured.constraints import Constraints

    def broken(*args, **kwargs):
        raise RuntimeError("grammar engine down")

    llm = LLM(str(tiny_llama_dir), num_blocks=64)
    monkeypatch.setattr(Constraints, "mask", broken)
    constrained = SamplingParams(max_tokens=4, temperature=0.0,
                                 structured_outputs=StructuredOutputs(regex="[ab]+"))
    free = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    outputs = llm.generate(["x", "y"], [constrained, free], use_tqdm=False)
    assert "grammar engine down" in outputs[0].error
    assert not outputs[1].error and len(outputs[1].outputs[0].token_ids) == 4
