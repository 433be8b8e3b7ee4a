"""Constraints: the engine side of structured outputs, owned by the Sampler (engine thread).

One llguidance matcher per constrained request, created at its first sampled token (the grammar
text is compiled and cached per spec, and each request's was checked when it was made); each
step writes the bitmasks of every constrained row in one call (llguidance's thread pool) and
applies them to the logits rows in one op; each sampled token then advances its matcher.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Sequence

import torch

from tierserve.errors import InvalidRequestError
from tierserve.structured import StructuredOutputs, grammar_text

CHECKED_LIMIT = 4096  # distinct specs remembered as compiling
_BITS = torch.arange(32, dtype=torch.int32)


class Constraints:
    """Grammar state of the engine's constrained requests."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_ids: Sequence[int]) -> None:
        self._tokenizer_json = tokenizer_json
        self.vocab_size = vocab_size
        self._eos = sorted(eos_token_ids)
        self._tokenizer = None
        self._tokenizer_error: str | None = None
        self._executor = None
        self._lock = threading.Lock()  # the tokenizer is built once, from any thread
        self._checked: OrderedDict[tuple[str, str], None] = OrderedDict()  # an LRU
        self._matchers: dict[str, object] = {}

    @property
    def tokenizer(self):
        """llguidance's view of the vocabulary (built on first use: ~1 s for a large one). A
        tokenizer it cannot take is remembered: structured outputs are then refused, at once."""
        with self._lock:
            if self._tokenizer is None and self._tokenizer_error is None:
                import llguidance

                try:
                    size = len(json.loads(self._tokenizer_json)["model"]["vocab"])
                except (KeyError, TypeError, ValueError):
                    size = 0
                try:
                    if not self._eos:
                        raise ValueError("the model has no end-of-sequence token")
                    self._tokenizer = llguidance.LLTokenizer(
                        self._tokenizer_json, n_vocab=max(self.vocab_size, size),
                        eos_token=self._eos[0] if len(self._eos) == 1 else self._eos)
                    self._executor = llguidance.LLExecutor()
                except Exception as exc:  # noqa: BLE001 - the server's own limit, said once
                    self._tokenizer_error = f"{type(exc).__name__}: {exc}"
            if self._tokenizer is None:
                raise InvalidRequestError(
                    "structured outputs are not available for this model: the grammar engine "
                    f"cannot use its tokenizer ({self._tokenizer_error})", None,
                    "structured_outputs_unavailable")
            return self._tokenizer

    def check(self, spec: StructuredOutputs) -> None:
        """Raise InvalidRequestError (400) if the spec's grammar cannot be built for this model.
        Off the engine thread: the server calls it from a worker thread."""
        import llguidance

        key = spec.key()
        if key in self._checked:
            self._checked.move_to_end(key)
            return
        try:
            self.tokenizer  # noqa: B018 - a model the engine cannot constrain refuses here
        except InvalidRequestError as exc:
            raise InvalidRequestError(exc.message, spec.param, exc.code) from None
        what = key[0].replace("_", " ")
        try:
            grammar = grammar_text(*key)
            matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
            error = matcher.get_error() if matcher.is_error() else None
        except InvalidRequestError as exc:
            raise InvalidRequestError(exc.message, spec.param) from None
        except Exception as exc:  # noqa: BLE001 - whatever the grammar engine refuses is a 400
            error = f"{type(exc).__name__}: {exc}"
        if error is not None:
            raise InvalidRequestError(f"the {what} cannot be compiled: {error}", spec.param)
        self._checked[key] = None
        if len(self._checked) > CHECKED_LIMIT:
            self._checked.popitem(last=False)

    def _matcher(self, request_id: str, spec: StructuredOutputs):
        matcher = self._matchers.get(request_id)
        if matcher is None:
            import llguidance

            matcher = llguidance.LLMatcher(self.tokenizer, grammar_text(*spec.key()),
                                           log_level=0)
            if matcher.is_error():
                raise ValueError(matcher.get_error())
            self._matchers[request_id] = matcher
        return matcher

    def mask(self, logits: torch.Tensor, rows: Sequence[int], request_ids: Sequence[str],
             specs: Sequence[StructuredOutputs], failed: dict[int, str]) -> None:
        """Set to -inf, in place, every token the grammar does not allow next in ``rows`` of
        ``logits``; a row whose grammar cannot go on is added to ``failed``."""
        import llguidance.torch as llt

        live, matchers = [], []
        for row, request_id, spec in zip(rows, request_ids, specs):
            try:
                matcher = self._matcher(request_id, spec)
            except Exception as exc:  # noqa: BLE001 - this request alone
                failed[row] = f"its structured output cannot be followed: {exc}"
                continue
            if matcher.is_error():
                failed[row] = f"its structured output reached a dead end: {matcher.get_error()}"
                continue
            live.append(row)
            matchers.append(matcher)
        if not live:
            return
        width = self.tokenizer.vocab_size
        bitmask = llt.allocate_token_bitmask(len(live), width)
        llt.fill_next_token_bitmask_par(self._executor, [(m, i) for i, m in enumerate(matchers)],
                                        bitmask)
        # The bits unpacked in eager torch (llguidance's own apply is a torch.compile kernel:
        # a C++ compiler at run time and a ~2 s first call on the engine thread).
        vocab = logits.shape[1]
        banned = ((bitmask[:, :, None] >> _BITS) & 1).view(len(live), -1)[:, :vocab] == 0
        if banned.shape[1] < vocab:  # ids the tokenizer does not have: never allowed
            banned = torch.nn.functional.pad(banned, (0, vocab - banned.shape[1]), value=True)
        if live == list(range(logits.shape[0])):  # every row constrained: in place, no copies
            selected = logits.masked_fill_(banned, float("-inf"))
        else:
            index = torch.tensor(live)
            selected = logits.index_select(0, index).masked_fill_(banned, float("-inf"))
            logits.index_copy_(0, index, selected)
        allowed = torch.isfinite(selected.max(dim=-1).values).tolist()
        for row, ok, matcher in zip(live, allowed, matchers):
            if not ok:
                failed[row] = ("its structured output allows no token here (the grammar "
                               f"dead-ends{': ' + matcher.get_error() if matcher.is_error() else ''})")

    def advance(self, request_id: str, token: int) -> str | None:
        """Feed the sampled token to the request's matcher; an error message if it refused."""
        matcher = self._matchers.get(request_id)
        if matcher is None:
            return None
        if not matcher.consume_token(token) or matcher.is_error():
            return f"its structured output refused token {token}: {matcher.get_error()}"
        return None

    def drop(self, request_ids: Sequence[str]) -> None:
        for request_id in request_ids:
            self._matchers.pop(request_id, None)
