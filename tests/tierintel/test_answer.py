"""Grounded answers through a real tierserve server (a tiny random Llama, over HTTP with the
official openai client): citations limited to retrieved ids by the JSON schema, evidence figures
from the records, unverified ids marked, nothing sent when nothing matched, a down endpoint named;
and the evaluation's answer rules."""

from __future__ import annotations

import json

import pytest

from tierintel.answer import Answerer, LLMUnavailable, answer_schema
from tierintel.evaluate import check_answer, load_queries, run_eval
from tierintel.retrieve import Retrieval

from .conftest import DEAD


@pytest.fixture(scope="module")
def answerer(tierserve):
    return tierserve_answerer(tierserve)


def tierserve_answerer(tierserve) -> Answerer:
    # The tiny model's context is 1,024 tokens of a byte-level vocabulary: a short prompt.
    return Answerer(tierserve.url + "/v1", "tiny", max_tokens=48, max_answer_chars=80,
                    max_prompt_chars=700)


def test_context_fits_its_budget_figures_first(intel):
    from tierintel.answer import context

    docs = [intel.catalog.document(i) for i in ("CVE-2026-41021", "CVE-2026-41033")]
    retrieval = Retrieval("cve", docs, [1.0, 1.0], "x")
    full, short = context(retrieval, 6000), context(retrieval, 1000)
    assert "Authentication bypass in the SAML" in full and len(short) <= 1000 < len(full)
    assert "EPSS 0.81020" in short and "EPSS 0.14500" in short  # both records' figures kept
    assert "logs an attacker in as any user" not in short  # the descriptions were cut first
    assert context(retrieval, 500).count("Record ") == 1  # then whole records go


def test_answer_through_tierserve_cites_only_retrieved_ids(intel, answerer):
    retrieval = intel.retriever().retrieve("Which KEV entries affect Northwind Gateway?")
    answer = answerer.answer("Which KEV entries affect Northwind Gateway?", retrieval)
    assert not answer.empty and answer.usage["completion_tokens"] > 0
    assert set(answer.model_cited) <= set(retrieval.ids)  # the schema's enum allows nothing else
    assert answer.cited[: len(answer.model_cited)] == answer.model_cited
    assert "EPSS 0.81020 (percentile 0.99480)" in answer.text  # the evidence: every record shown
    assert "in CISA KEV since 2026-11-05, due 2026-11-26" in answer.text
    assert [s["url"] for s in answer.sources][1] == "https://nvd.nist.gov/vuln/detail/CVE-2026-41021"


def test_baseline_is_the_model_alone(answerer):
    answer = answerer.baseline("What is CVE-2026-41021?")
    assert answer.intent == "baseline" and answer.sources == [] and answer.model_text


def test_nothing_found_is_said_without_calling_the_model(intel):
    retrieval = intel.retriever().retrieve("What is CVE-2031-00001 and should I patch it?")
    answer = Answerer(DEAD, "any").answer("What is CVE-2031-00001?", retrieval)  # no call: no error
    assert answer.empty and answer.cited == []
    assert answer.text.startswith("The index has no records for CVE-2031-00001")


def test_endpoint_down_is_a_clear_error(intel):
    retrieval = intel.retriever().retrieve("What is CVE-2026-41021?")
    with pytest.raises(LLMUnavailable, match=r"http://127.0.0.1:9/v1 is unreachable"):
        Answerer(DEAD, "any", timeout_s=5).answer("What is CVE-2026-41021?", retrieval)


def test_ids_retrieval_did_not_give_are_marked(intel, monkeypatch):
    retrieval = intel.retriever().retrieve("What is CVE-2026-41021?")
    answerer = Answerer(DEAD, "any")
    reply = json.dumps({"answer": "CVE-2026-41021 (CWE-287) resembles CVE-2019-0001; patch now.",
                        "cited": ["CVE-2026-41021"]})
    monkeypatch.setattr(answerer, "_chat", lambda *a: (reply, {}))
    answer = answerer.answer("What is CVE-2026-41021?", retrieval)
    assert answer.unverified == ["CVE-2019-0001"]  # CWE-287 is the record's own weakness: allowed
    assert "CVE-2019-0001 [unverified: not in the retrieved records]" in answer.text


def test_a_reply_cut_off_inside_the_json_keeps_its_answer(intel, monkeypatch):
    retrieval = intel.retriever().retrieve("What is CVE-2026-41021?")
    answerer = Answerer(DEAD, "any")
    monkeypatch.setattr(answerer, "_chat",
                        lambda *a: ('{"answer": "It is a \\"SAML\\" bypass in CVE-2026-41021 an', {}))
    answer = answerer.answer("What is CVE-2026-41021?", retrieval)
    assert answer.model_text == 'It is a "SAML" bypass in CVE-2026-41021 an [cut off]'
    assert answer.model_cited == ["CVE-2026-41021"]


def test_schema_limits_citations_to_retrieved_ids():
    schema = answer_schema(["CVE-1", "CWE-2"], 300)
    assert schema["properties"]["cited"]["items"]["enum"] == ["CVE-1", "CWE-2"]
    assert schema["properties"]["answer"]["maxLength"] == 300
    assert "maxLength" not in answer_schema(["CVE-1"])["properties"]["answer"]


def query(qid: str) -> dict:
    return next(q for q in load_queries() if q["id"] == qid)


def test_rules_on_hand_written_answers(intel):
    q = next(q for q in load_queries() if q["expected"] == ["CVE-2026-41021"] and q["type"] == "cve")
    good = "CVE-2026-41021: EPSS 0.81020, in CISA KEV since 2026-11-05. Patch now."
    assert check_answer(good, q, intel.catalog) == {"cited_expected": True, "facts_ok": True,
                                                    "invented": []}
    wrong_epss = good.replace("0.81020", "0.42")
    assert not check_answer(wrong_epss, q, intel.catalog)["facts_ok"]
    wrong_kev = good.replace("2026-11-05", "2026-10-01")
    assert not check_answer(wrong_kev, q, intel.catalog)["facts_ok"]
    no_figures = "CVE-2026-41021 is an authentication bypass."
    assert not check_answer(no_figures, q, intel.catalog)["facts_ok"]
    invented = good + " See also CVE-2026-99999."
    assert check_answer(invented, q, intel.catalog)["invented"] == ["CVE-2026-99999"]
    empty_q = next(q for q in load_queries() if q["question"].startswith("What is CVE-2031"))
    assert check_answer("I don't know that CVE.", empty_q, intel.catalog)["cited_expected"]
    assert not check_answer("CVE-2031-00001 is critical.", empty_q, intel.catalog)["facts_ok"]


def test_eval_runs_rag_and_baseline_side_by_side(intel, answerer):
    queries = [q for q in load_queries() if q["id"] in ("q001", "q021", "q078")] or load_queries()[:2]
    result = run_eval(intel.retriever(), answerer, intel.catalog, queries, concurrency=2,
                      progress=False)
    for name in ("rag", "baseline"):
        assert set(result[name]) >= {"cited_expected", "facts_ok", "questions_with_invented_ids",
                                     "p50_s", "p99_s", "answers_per_s"}
    assert result["rag"]["cited_expected"] >= 2 / 3  # evidence always cites what was retrieved
    assert len(result["rows"]) == len(queries)


def test_marking_leaves_longer_ids_alone(intel, monkeypatch):
    retrieval = intel.retriever().retrieve("What is CVE-2021-44228?")
    answerer = Answerer(DEAD, "any")
    reply = json.dumps({"answer": "CWE-20 and CWE-200; CVE-2021-4422 is not CVE-2021-44228.",
                        "cited": []})
    monkeypatch.setattr(answerer, "_chat", lambda *a: (reply, {}))
    answer = answerer.answer("What is CVE-2021-44228?", retrieval)
    assert answer.unverified == ["CVE-2021-4422", "CWE-200"]  # CWE-20 is the record's own
    assert "CWE-20 and CWE-200 [unverified" in answer.model_text
    assert "CVE-2021-4422 [unverified" in answer.model_text
    assert "CVE-2021-44228." in answer.model_text and "44228 [unverified" not in answer.model_text


def test_a_reply_cut_inside_an_escape(intel, monkeypatch):
    retrieval = intel.retriever().retrieve("What is CVE-2026-41021?")
    answerer = Answerer(DEAD, "any")
    monkeypatch.setattr(answerer, "_chat", lambda *a: ('{"answer": "caf\\u00', {}))
    assert answerer.answer("q", retrieval).model_text == "caf [cut off]"
