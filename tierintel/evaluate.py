"""Evaluation on the labelled query set: retrieval recall@5, rule checks of every answer (right ids
cited, EPSS and KEV figures equal to the records, no invented ids, an honest "nothing found"), the
model-alone baseline side by side, and latency/throughput."""

from __future__ import annotations

import json
import re
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tierintel.answer import ID_RE, Answer, known_ids
from tierintel.retrieve import CVE_RE

QUERIES = Path(__file__).parent / "fixtures" / "queries.jsonl"
EPSS_QUOTE = re.compile(r"EPSS[^0-9]{0,25}(0\.\d+|1\.0+)", re.IGNORECASE)
KEV_QUOTE = re.compile(r"KEV[^0-9]{0,40}(\d{4}-\d{2}-\d{2})", re.IGNORECASE)
NOTHING = re.compile(r"no records|not (?:in|found)|nothing|no (?:known|information|data)|"
                     r"(?:do not|don't|cannot|can't) (?:know|find|have)|unaware", re.IGNORECASE)


def load_queries(path: Path = QUERIES) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def recall_at(retrieved: list[str], expected: list[str], k: int = 5) -> float:
    return len(set(retrieved[:k]) & set(expected)) / len(expected) if expected else 1.0


def check_answer(text: str, query: dict, catalog, known: set[str] | None = None,
                 empty: bool | None = None) -> dict:
    """The rules, on one answer text. ``known``: ids the answer may name (RAG); for the baseline,
    every id the catalog holds."""
    expected = query["expected"]
    mentioned = {m.upper() for m in ID_RE.findall(text)}
    if query.get("expect_empty"):
        says_nothing = bool(empty) if empty is not None else bool(NOTHING.search(text))
        asked = {m.upper() for m in ID_RE.findall(query["question"])}  # repeating it is no invention
        invented = sorted(i for i in mentioned - asked if i.startswith("CVE-") and
                          catalog.document(i) is None)
        return {"cited_expected": says_nothing, "facts_ok": says_nothing, "invented": invented}
    cited_expected = set(expected) <= mentioned
    quotes = attributed_figures(text, expected[0] if expected else None)
    truth = {cve_id: catalog.document(cve_id) if cve_id else None
             for cve_id in {c for c, _, _ in quotes} | {i for i in expected if i.startswith("CVE-")}}
    facts_ok = all(_matches(truth.get(cve_id), kind, value) for cve_id, kind, value in quotes)
    expected_cves = [i for i in expected if i.startswith("CVE-") and truth.get(i) is not None]
    if query["type"] in ("cve", "top_epss") and any(truth[i]["epss"] >= 0 for i in expected_cves):
        facts_ok &= any(k == "epss" and c in expected for c, k, _ in quotes)
    if query["type"] in ("cve", "kev_product") and any(truth[i]["kev"] for i in expected_cves):
        facts_ok &= any(k == "kev" and c in expected for c, k, _ in quotes)
    if known is None:  # the baseline: an id is invented when no record of the catalog has it
        invented = sorted(i for i in mentioned if catalog.document(i) is None)
    else:
        invented = sorted(mentioned - known)
    return {"cited_expected": cited_expected, "facts_ok": facts_ok, "invented": invented}


def attributed_figures(text: str, default: str | None) -> list[tuple[str | None, str, str]]:
    """(CVE id, "epss" | "kev", value) for every EPSS score and KEV date the text quotes, each
    credited to the last CVE id written before it (``default`` before any id): figures about
    another record are checked against that record."""
    marks = sorted([(m.start(), "id", m.group(0).upper()) for m in CVE_RE.finditer(text)]
                   + [(m.start(), "epss", m.group(1)) for m in EPSS_QUOTE.finditer(text)]
                   + [(m.start(), "kev", m.group(1)) for m in KEV_QUOTE.finditer(text)])
    current, out = default, []
    for _, kind, value in marks:
        if kind == "id":
            current = value
        else:
            out.append((current, kind, value))
    return out


def _matches(doc: dict | None, kind: str, value: str) -> bool:
    if doc is None or doc["kind"] != "cve":
        return False
    if kind == "epss":
        return doc["epss"] >= 0 and abs(float(value) - doc["epss"]) < 5e-4
    return doc["kev"] and value == doc["kev_date_added"]


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def run_eval(retriever, answerer, catalog, queries: list[dict], baseline: bool = True,
             concurrency: int = 4, progress: bool = True) -> dict:
    """Retrieval for every question (sequential, timed), then answers (RAG and, if asked, the model
    alone) through the endpoint with ``concurrency`` requests in flight."""
    rows, retrieval_s = [], []
    for query in queries:
        start = time.perf_counter()
        got = retriever.retrieve(query["question"], today=query.get("today"))
        retrieval_s.append(time.perf_counter() - start)
        rows.append({"query": query, "retrieval": got,
                     "recall@5": recall_at(got.ids, query["expected"]),
                     "empty_ok": (not got.docs) if query.get("expect_empty") else None})
    out = {"questions": len(queries), "retrieval": _retrieval_summary(rows, retrieval_s)}
    if answerer is None:
        out["rows"] = [_row_json(r) for r in rows]
        return out

    def rag(row: dict) -> Answer:
        return answerer.answer(row["query"]["question"], row["retrieval"])

    def alone(row: dict) -> Answer:
        return answerer.baseline(row["query"]["question"])

    for name, call in [("rag", rag)] + ([("baseline", alone)] if baseline else []):
        start = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            answers = list(_progress(pool.map(call, rows), len(rows), name, progress))
        wall = time.perf_counter() - start
        for row, answer in zip(rows, answers):
            known = known_ids(row["retrieval"]) if name == "rag" else None
            row[name] = {"answer": answer, "checks": check_answer(
                answer.text, row["query"], catalog, known, answer.empty if name == "rag" else None),
                "model_checks": check_answer(answer.model_text, row["query"], catalog, known,
                                             answer.empty if name == "rag" else None)}
        out[name] = _answer_summary(rows, name, wall, concurrency)
    out["by_type"] = by_type(rows)
    out["rows"] = [_row_json(r) for r in rows]
    return out


def _progress(iterable, total: int, desc: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="q")


def _retrieval_summary(rows: list[dict], seconds: list[float]) -> dict:
    scored = [r for r in rows if r["query"]["expected"]]
    by_type = {}
    for r in scored:
        by_type.setdefault(r["query"]["type"], []).append(r["recall@5"])
    empties = [r["empty_ok"] for r in rows if r["empty_ok"] is not None]
    return {"recall@5": round(statistics.mean(r["recall@5"] for r in scored), 4),
            "recall@5_by_type": {k: round(statistics.mean(v), 4) for k, v in by_type.items()},
            "no_match_questions_empty": f"{sum(empties)}/{len(empties)}",
            "p50_ms": round(1000 * _percentile(seconds, 0.5), 1),
            "p99_ms": round(1000 * _percentile(seconds, 0.99), 1),
            "queries_per_s": round(len(seconds) / sum(seconds), 1)}


def _answer_summary(rows: list[dict], name: str, wall: float, concurrency: int) -> dict:
    def share(key: str, which: str = "checks", subset=None) -> float:
        chosen = [r for r in rows if subset is None or subset(r)]
        return round(sum(bool(r[name][which][key]) for r in chosen) / max(1, len(chosen)), 4)

    latencies = [r[name]["answer"].seconds for r in rows]
    return {
        "cited_expected": share("cited_expected"), "facts_ok": share("facts_ok"),
        "questions_with_invented_ids": sum(bool(r[name]["checks"]["invented"]) for r in rows),
        "questions_with_unflagged_invented_ids": sum(
            bool(set(r[name]["checks"]["invented"]) - set(r[name]["answer"].unverified))
            for r in rows),
        "model_text_cited_expected": share("cited_expected", "model_checks"),
        "model_text_facts_ok": share("facts_ok", "model_checks"),
        "model_text_questions_with_invented_ids": sum(bool(r[name]["model_checks"]["invented"])
                                                      for r in rows),
        "newer_than_training_cited_expected": share(
            "cited_expected", subset=lambda r: r["query"]["newer_than_training"]),
        "p50_s": round(_percentile(latencies, 0.5), 2), "p99_s": round(_percentile(latencies, 0.99), 2),
        "answers_per_s": round(len(rows) / wall, 3), "concurrency": concurrency,
        "completion_tokens": sum(r[name]["answer"].usage.get("completion_tokens", 0) for r in rows)}


def _row_json(row: dict) -> dict:
    out = {"id": row["query"]["id"], "type": row["query"]["type"],
           "question": row["query"]["question"], "expected": row["query"]["expected"],
           "retrieved": row["retrieval"].ids, "recall@5": row["recall@5"]}
    for name in ("rag", "baseline"):
        if name in row:
            out[name] = {"text": row[name]["answer"].text, "model_text": row[name]["answer"].model_text,
                         "cited": row[name]["answer"].cited, "seconds": row[name]["answer"].seconds,
                         "empty": row[name]["answer"].empty,
                         "unverified": row[name]["answer"].unverified, **row[name]["checks"]}
    return out


def rescore(result: dict, catalog, queries: list[dict]) -> dict:
    """Apply the current rules to a saved result's answers (no model calls): rows and summaries."""
    from tierintel.answer import Answer

    by_id = {q["id"]: q for q in queries}
    rows = []
    for saved in result["rows"]:
        query = by_id[saved["id"]]
        row = {"query": query}
        for name in ("rag", "baseline"):
            if name not in saved:
                continue
            text = saved[name]["text"]
            model_text = saved[name].get("model_text", text.split("\n\nEvidence:")[0])
            empty = saved[name].get("empty", name == "rag" and text.startswith("The index has no"))
            answer = Answer(query["question"], text, model_text, saved[name]["cited"], [],
                            saved[name]["unverified"], [], name, empty,
                            saved[name].get("seconds", 0.0))
            known = None
            if name == "rag":  # the ids the retrieved records name, as when it was answered
                from tierintel.retrieve import Retrieval

                docs = [d for i in saved["retrieved"] if (d := catalog.document(i)) is not None]
                known = known_ids(Retrieval(query["type"], docs, [], ""))
            empty_flag = empty if name == "rag" else None
            row[name] = {"answer": answer,
                         "checks": check_answer(text, query, catalog, known, empty_flag),
                         "model_checks": check_answer(model_text, query, catalog, known, empty_flag)}
            saved[name].update(row[name]["checks"])
        rows.append(row)
    for name in ("rag", "baseline"):
        if name in result:
            kept = {k: result[name][k] for k in ("p50_s", "p99_s", "answers_per_s", "concurrency",
                                                  "completion_tokens")}
            result[name] = {**_answer_summary(rows, name, 1.0, kept["concurrency"]), **kept}
    result["by_type"] = by_type(rows)
    return result


def by_type(rows: list[dict]) -> dict:
    """The share of questions passing each rule, per question type and system."""
    out: dict = {}
    for row in rows:
        for name in ("rag", "baseline"):
            if name in row:
                cell = out.setdefault(row["query"]["type"], {}).setdefault(
                    name, {"questions": 0, "cited_expected": 0, "facts_ok": 0, "invented": 0})
                cell["questions"] += 1
                cell["cited_expected"] += bool(row[name]["checks"]["cited_expected"])
                cell["facts_ok"] += bool(row[name]["checks"]["facts_ok"])
                cell["invented"] += bool(row[name]["checks"]["invented"])
    return out
