"""Structured outputs: constrain what a request samples to a JSON schema, any JSON object, a
regular expression, a list of choices or a Lark/GBNF grammar.

The grammar engine is llguidance (maintained by Microsoft's guidance team; vLLM and llama.cpp
integrate it). It was chosen over xgrammar, vLLM's default, because its wheel depends on nothing
(xgrammar 0.2.9 requires triton, apache-tvm-ffi and transformers at any version, which would
pull a GPU compiler into a CPU install and fight the pinned transformers); xgrammar was not
measured here.

``StructuredOutputs`` (``SamplingParams.structured_outputs``; vLLM's name
``StructuredOutputsParams`` works too) says what to follow; ``Constraints`` (one per engine,
owned by the sampler, in constraints.py) turns it into a grammar once per distinct spec
(cached), keeps a matcher per request, writes the next-token bitmask of every constrained row of
a step in one call and applies it to their logits in one op, and advances each matcher by the
token sampled. This module imports neither torch nor llguidance at import time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache

from tierserve.errors import InvalidRequestError

# JSON layout: whitespace between tokens may be any run of up to 32 spaces, tabs and newlines
# (so a model may indent as it likes), never unbounded: llguidance's default lets a model emit
# whitespace until max_tokens (measured: 10 of 50 seeded schemas ran out that way with SmolLM2,
# none with this). A schema's own "x-guidance" replaces it.
JSON_LAYOUT = {"whitespace_pattern": r"[ \t\n\r]{0,32}"}


@dataclass(frozen=True, slots=True)
class StructuredOutputs:
    """Exactly one of: ``json`` (a JSON schema, dict or text), ``json_object`` (any JSON
    object), ``regex``, ``choice`` (the output is one of these strings), ``grammar`` (Lark or
    GBNF). ``param`` names the request field it came from, for error messages."""

    json: dict | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    param: str = "structured_outputs"

    def __post_init__(self) -> None:
        given = [name for name in ("json", "regex", "choice", "grammar")
                 if getattr(self, name) is not None] + (["json_object"] if self.json_object
                                                        else [])
        if len(given) != 1:
            raise InvalidRequestError(
                f"give exactly one kind of structured output (json, json_object, regex, "
                f"choice or grammar); got {', '.join(given) or 'none'}", self.param)
        if self.choice is not None:
            if not self.choice or not all(isinstance(c, str) and c for c in self.choice):
                raise InvalidRequestError("choice must be a non-empty list of non-empty "
                                          "strings", self.param)
            object.__setattr__(self, "choice", tuple(self.choice))

    def key(self) -> tuple[str, str]:
        """(format, text) as llguidance's grammar_from takes them; hashable, the cache key."""
        if self.json is not None or self.json_object:
            schema = {"type": "object"} if self.json_object else self.json
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except json.JSONDecodeError as exc:
                    raise InvalidRequestError(f"the JSON schema is not JSON: {exc}",
                                              self.param) from None
            if isinstance(schema, dict) and "x-guidance" not in schema:
                schema = {**schema, "x-guidance": JSON_LAYOUT}
            return "json_schema", json.dumps(schema)  # property order is the output's order
        if self.regex is not None:
            return "regex", self.regex
        if self.choice is not None:
            return "choice", json.dumps(list(self.choice))
        return "grammar", self.grammar


@lru_cache(maxsize=512)
def grammar_text(kind: str, text: str) -> str:
    """The llguidance grammar of a spec (cached: the same schema compiles once)."""
    import llguidance

    try:
        return llguidance.grammar_from(kind, text)
    except Exception as exc:  # noqa: BLE001 - whatever it refuses is the request's fault
        raise InvalidRequestError(f"the {kind.replace('_', ' ')} cannot be compiled: {exc}",
                                  None) from None


StructuredOutputsParams = StructuredOutputs  # vLLM's name for the same thing
