"""Grounded answers: the retrieved records become numbered facts in the prompt, the model (tierserve
or any OpenAI-compatible endpoint, by base_url) answers with a structured-output JSON object whose
citations can only name retrieved ids, and the reply is checked: any id it mentions that retrieval
did not give is marked unverified, and the figures it may quote are appended from the records."""

from __future__ import annotations

import json
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

from tierintel.retrieve import Retrieval

ID_RE = re.compile(r"\b(?:CVE-\d{4}-\d{4,}|CWE-\d{1,4})\b", re.IGNORECASE)
SYSTEM = ("You are a threat-intelligence analyst. Answer the question using only the numbered "
          "records given. Cite the CVE and CWE ids you use. Quote EPSS scores, KEV dates and "
          "required actions exactly as the records give them. If the records do not answer the "
          "question, say so. Be brief.")
BASELINE_SYSTEM = ("You are a threat-intelligence analyst. Answer the question. Cite CVE and CWE "
                   "ids and quote EPSS scores and CISA KEV dates where you know them. Be brief.")


class LLMError(RuntimeError):
    """The language-model endpoint refused the request (a 4xx: bad model name, prompt too long)."""


class LLMUnavailable(LLMError):
    """The language-model endpoint could not be reached, or failed (a 5xx)."""


@dataclass
class Answer:
    question: str
    text: str  # what the user sees: the model's answer, then the evidence lines
    model_text: str  # the model's own words
    cited: list[str]  # ids the answer cites (model's choice plus evidence shown)
    model_cited: list[str]  # ids the model itself cited
    unverified: list[str]  # ids the model wrote that retrieval did not give (marked in text)
    sources: list[dict]  # the records shown, with their links
    intent: str
    empty: bool  # the index had nothing for the question
    seconds: float = 0.0
    usage: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def link(doc_id: str) -> str:
    if doc_id.startswith("CWE-"):
        return f"https://cwe.mitre.org/data/definitions/{doc_id[4:]}.html"
    return f"https://nvd.nist.gov/vuln/detail/{doc_id}"


def evidence_line(doc: dict) -> str:
    """The facts of one record as one line; an answer's figures come from here verbatim."""
    if doc["kind"] == "cwe":
        related = "; ".join(f"{r['nature']} {r['id']}" for r in doc["related"][:6])
        return f"[{doc['id']}] {doc['name']} ({doc['abstraction'] or doc['cwe_kind']}). " \
               f"Relations: {related or 'none listed'}."
    parts = [f"[{doc['id']}] published {doc['published']}"]
    if doc["cvss"] >= 0:
        parts.append(f"CVSS {doc['cvss_version']} {doc['cvss']} {doc['severity']}")
    if doc["epss"] >= 0:
        parts.append(f"EPSS {doc['epss']:.5f} (percentile {doc['percentile']:.5f})")
    if doc["kev"]:
        parts.append(f"in CISA KEV since {doc['kev_date_added']}, due {doc['kev_due_date']}, "
                     f"required action: {doc['kev_required_action']}")
    else:
        parts.append("not in CISA KEV")
    parts.append(f"weakness {', '.join(doc['cwes']) or 'unknown'}")
    parts.append(f"priority by rule: {doc['priority']} ({doc['priority_reason']})")
    return "; ".join(parts) + "."


def context(retrieval: Retrieval, max_chars: int = 6000) -> str:
    """The records as numbered blocks, within max_chars: descriptions are shortened first (evenly),
    then whole records dropped from the end, so a small context window still gets every figure it
    can hold."""
    heads = [f"Record {n}: {evidence_line(d)}" for n, d in enumerate(retrieval.docs, start=1)]
    bodies = [d.get("description", "") for d in retrieval.docs]
    tail = ("\n\nRelation path: " + " -> ".join(retrieval.path)) if len(retrieval.path) > 1 else ""
    budget = max_chars - len(tail) - sum(len(h) + 3 for h in heads)
    while heads and budget < 0:  # even the figures do not fit: fewer records
        budget += len(heads.pop()) + 3
        bodies.pop()
    share = max(0, budget // max(1, len(bodies)))
    blocks = [h + ("\n" + b[:share] if share else "") for h, b in zip(heads, bodies)]
    return "\n\n".join(blocks) + tail


class Answerer:
    def __init__(self, base_url: str, model: str, api_key: str = "none", max_tokens: int = 160,
                 structured: bool = True, timeout_s: float = 120.0, temperature: float = 0.0,
                 max_answer_chars: int | None = 500, frequency_penalty: float = 0.3,
                 max_prompt_chars: int = 6000):
        from openai import OpenAI

        self.base_url, self.model = base_url, model
        self.client = OpenAI(base_url=base_url, api_key=api_key, timeout=timeout_s, max_retries=0)
        self.max_tokens, self.structured, self.temperature = max_tokens, structured, temperature
        # maxLength keeps a small model from running on; OpenAI's strict mode may refuse it, so
        # max_answer_chars=None (--max-answer-chars 0) leaves it out.
        self.max_answer_chars, self.frequency_penalty = max_answer_chars, frequency_penalty
        self.max_prompt_chars = max_prompt_chars  # the records' share of the model's context

    def answer(self, question: str, retrieval: Retrieval) -> Answer:
        start = time.perf_counter()
        if not retrieval.docs:
            missing = f" ({', '.join(retrieval.missing)} not found)" if retrieval.missing else ""
            text = (f"The index has no records for {retrieval.asked}{missing}. Nothing was sent to "
                    "the model, so there is no answer to ground.")
            return Answer(question, text, "", [], [], [], [], retrieval.intent, True,
                          time.perf_counter() - start)
        allowed = retrieval.ids
        user = f"Records:\n{context(retrieval, self.max_prompt_chars)}\n\nQuestion: {question}"
        reply, usage = self._chat(SYSTEM, user, allowed)
        model_text, model_cited = self._parse(reply, allowed)
        unverified = sorted({m.upper() for m in ID_RE.findall(model_text)} - known_ids(retrieval))
        flagged = set(unverified)
        model_text = ID_RE.sub(lambda m: m.group(0) + " [unverified: not in the retrieved records]"
                               if m.group(0).upper() in flagged else m.group(0), model_text)
        shown = retrieval.docs
        text = model_text.strip() + "\n\nEvidence:\n" + "\n".join(
            f"- {evidence_line(d)}" for d in shown)
        if retrieval.missing:
            text += f"\n\nNot in the index: {', '.join(retrieval.missing)}."
        cited = list(dict.fromkeys(model_cited + [d["id"] for d in shown]))
        sources = [{"id": d["id"], "url": link(d["id"]), "line": evidence_line(d)} for d in shown]
        return Answer(question, text, model_text, cited, model_cited, unverified, sources,
                      retrieval.intent, False, time.perf_counter() - start, usage)

    def baseline(self, question: str) -> Answer:
        """The model alone, no retrieval: the paper's comparison."""
        start = time.perf_counter()
        reply, usage = self._chat(BASELINE_SYSTEM, question, None)
        ids = list(dict.fromkeys(m.upper() for m in ID_RE.findall(reply)))
        return Answer(question, reply, reply, ids, ids, [], [], "baseline", False,
                      time.perf_counter() - start, usage)

    def first_model(self) -> str:
        """The endpoint's first listed model (what an unset --model means)."""
        with self._endpoint_errors():
            models = self.client.models.list().data
        if not models:
            raise LLMUnavailable(f"the endpoint {self.base_url} lists no models; pass --model")
        return models[0].id

    @contextmanager
    def _endpoint_errors(self):
        """The openai client's errors as ours: unreachable or 5xx is LLMUnavailable, 4xx LLMError."""
        import openai

        try:
            yield
        except openai.APIConnectionError as e:
            raise LLMUnavailable(f"the language-model endpoint {self.base_url} is unreachable "
                                 f"({e.__cause__ or e})") from None
        except openai.APIStatusError as e:
            kind = LLMUnavailable if e.status_code >= 500 else LLMError
            raise kind(f"the language-model endpoint {self.base_url} answered {e.status_code}: "
                       f"{e.message}") from None

    def _chat(self, system: str, user: str, allowed: list[str] | None) -> tuple[str, dict]:
        kwargs = dict(model=self.model, max_tokens=self.max_tokens, temperature=self.temperature,
                      frequency_penalty=self.frequency_penalty,
                      messages=[{"role": "system", "content": system},
                                {"role": "user", "content": user}])
        if allowed is not None and self.structured:
            kwargs["response_format"] = {"type": "json_schema", "json_schema": {
                "name": "grounded_answer", "strict": True, "schema": answer_schema(allowed, self.max_answer_chars)}}
        with self._endpoint_errors():
            response = self.client.chat.completions.create(**kwargs)
        usage = response.usage.model_dump() if response.usage else {}
        return response.choices[0].message.content or "", usage

    def _parse(self, reply: str, allowed: list[str]) -> tuple[str, list[str]]:
        if self.structured:
            try:
                data = json.loads(reply)
                return str(data["answer"]), [i for i in data["cited"] if i in allowed]
            except (ValueError, KeyError, TypeError):
                # Cut off by max_tokens inside the JSON: keep the answer string written so far.
                partial = re.search(r'"answer"\s*:\s*"((?:[^"\\]|\\.)*)', reply)
                if partial is not None:
                    raw = re.sub(r"\\(u[0-9a-fA-F]{0,3})?$", "", partial.group(1))  # a cut escape
                    try:
                        text = json.loads('"' + raw + '"') + " [cut off]"
                    except ValueError:
                        text = raw + " [cut off]"
                    ids = [m.upper() for m in ID_RE.findall(text)]
                    return text, [i for i in dict.fromkeys(ids) if i in allowed]
        ids = [m.upper() for m in ID_RE.findall(reply)]
        return reply, [i for i in dict.fromkeys(ids) if i in allowed]


def answer_schema(allowed: list[str], max_chars: int | None = None) -> dict:
    """The reply's shape: the answer text and citations drawn only from the retrieved ids."""
    text = {"type": "string"} | ({"maxLength": max_chars} if max_chars else {})
    return {"type": "object", "additionalProperties": False, "required": ["answer", "cited"],
            "properties": {"answer": text,
                           "cited": {"type": "array", "items": {"type": "string", "enum": allowed}}}}


def known_ids(retrieval: Retrieval) -> set[str]:
    """Ids an answer may name: the retrieved records, and the ids those records themselves name
    (a CVE's CWEs, a CWE's relations, an id quoted in a description)."""
    known = set(retrieval.ids) | set(retrieval.path)
    for doc in retrieval.docs:
        known |= set(doc.get("cwes", [])) | {r["id"] for r in doc.get("related", [])}
        known |= {m.upper() for m in ID_RE.findall(doc.get("description", ""))}
    return known

