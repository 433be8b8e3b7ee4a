"""Sampler: logits -> next tokens. Greedy, temperature, top-k/p, min-p, penalties, seeds, logprobs,
per-request logits processors; a row that cannot be sampled fails alone.

Everything is batched over rows: penalties and early-stop masks gather every row's token ids into
one flat index and touch the logits once. The only per-row tensor work is drawing noise for
requests that carry their own seed (each such request owns a generator, so its samples do not
depend on what else is in the batch).

Sampling uses the exponential race: argmax(p / E) with E ~ Exp(1) draws from p exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import chain

import torch

from tierserve.request import call_logits_processor
from tierserve.sched.plan import ScheduledChunk, TokenLogprobs

NEG_INF = float("-inf")


@dataclass(slots=True)
class Sampled:
    """One sampler call's results, row by row; a failed row has token None and a reason."""

    token_ids: list[int | None]
    logprobs: list[TokenLogprobs | None]
    failed: dict[int, str] = field(default_factory=dict)  # row index -> what went wrong


class Sampler:
    """Stateful only in its generators: one engine-wide, one per seeded request.

    A row that cannot be sampled (its logits are not finite, its logits processor raises, every
    token is masked, its parameters break a batched op) fails alone: the other rows get the
    tokens they would have had. Greedy and seeded rows are exactly unchanged by a failure
    elsewhere; unseeded random rows draw from the engine-wide stream, which a failed batch
    rewinds before the rows are retried one by one.
    """

    def __init__(self, seed: int = 0) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self._request_generators: dict[str, torch.Generator] = {}
        # tierserve.structured.constraints.Constraints (set by the loader), or None
        self.constraints = None

    def drop(self, request_ids: Sequence[str]) -> None:
        """Forget finished requests' generators (and grammar state)."""
        for request_id in request_ids:
            self._request_generators.pop(request_id, None)
        if self.constraints is not None:
            self.constraints.drop(request_ids)

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, rows: Sequence[ScheduledChunk]) -> Sampled:
        """logits: (N, vocab) float32, one row per chunk in ``rows``."""
        failed: dict[int, str] = {}
        finite = torch.isfinite(logits.sum(dim=-1))  # a NaN or inf anywhere makes the sum so
        if not bool(finite.all()):
            for index in (~finite).nonzero().flatten().tolist():
                failed[index] = "the model produced non-finite logits (NaN or inf) for it"
        if any(row.sampling_params.logits_processors for row in rows):
            logits = self._run_logits_processors(logits.clone(), rows, failed)
        constrained = [i for i, row in enumerate(rows)
                       if row.sampling_params.structured_outputs is not None and i not in failed]
        if constrained:  # every constrained row's grammar mask, in one op
            logits = logits.clone()
            if self.constraints is None:
                for index in constrained:
                    failed[index] = "structured outputs need a grammar engine; none is set up"
            else:
                try:
                    self.constraints.mask(
                        logits, constrained, [rows[i].request_id for i in constrained],
                        [rows[i].sampling_params.structured_outputs for i in constrained],
                        failed)
                except Exception as exc:  # noqa: BLE001 - only the constrained rows fail
                    for index in constrained:
                        failed.setdefault(index, f"its structured output could not be "
                                          f"applied: {type(exc).__name__}: {exc}")
        for index, row in enumerate(rows):
            if row.sampling_params.seed is not None and index not in failed:
                try:
                    self._generator_for(row)
                except Exception as exc:  # noqa: BLE001 - e.g. a seed the generator refuses
                    failed[index] = f"its seed cannot seed a generator: {exc}"
        if failed:  # failed rows stay in the batch (the others' noise is unchanged), as zeros
            logits = logits.clone()
            logits[list(failed)] = 0.0
        states = self._generator_states(rows)
        try:
            tokens, logprobs = self._sample_rows(logits, rows, range(len(rows)), failed)
        except Exception:  # noqa: BLE001 - find the rows at fault one by one
            self._restore(states)
            tokens, logprobs = [None] * len(rows), [None] * len(rows)
            for index in range(len(rows)):
                if index in failed:
                    continue
                try:
                    (tokens[index],), (logprobs[index],) = self._sample_rows(
                        logits[index:index + 1], rows[index:index + 1], [index], failed)
                except Exception as exc:  # noqa: BLE001
                    failed[index] = f"sampling failed: {type(exc).__name__}: {exc}"
        if constrained and self.constraints is not None:
            for index in constrained:
                if index not in failed and tokens[index] is not None:
                    refused = self.constraints.advance(rows[index].request_id, tokens[index])
                    if refused:
                        failed[index] = refused
        for index in failed:
            tokens[index], logprobs[index] = None, None
        return Sampled(tokens, logprobs, failed)

    def _sample_rows(self, logits: torch.Tensor, rows: Sequence[ScheduledChunk],
                     indices: Sequence[int], failed: dict[int, str]
                     ) -> tuple[list[int], list[TokenLogprobs | None]]:
        """Sample ``rows`` (their logits); rows found unusable are added to ``failed``."""
        params = [row.sampling_params for row in rows]
        raw_logprobs = (torch.log_softmax(logits, dim=-1)
                        if any(p.logprobs is not None for p in params) else None)
        if any(_edits_logits(row) for row in rows):  # else argmax reads them untouched
            logits = logits.clone()
            self._mask_early_stops(logits, rows)
            self._apply_penalties(logits, rows)
        if any(_edits_logits(row) or row.sampling_params.logits_processors for row in rows):
            # A penalty can push a logit to +inf (say repetition_penalty=1e-300): that token
            # is then simply the most likely one. -inf stays a mask; NaN fails the row.
            logits.clamp_(max=torch.finfo(logits.dtype).max)
            usable = torch.isfinite(logits.max(dim=-1).values)
            if not bool(usable.all()):
                for local in (~usable).nonzero().flatten().tolist():
                    why = ("no token is left to sample: every logit is -inf or NaN after its "
                           "logits processing")
                    if params[local].structured_outputs is not None:
                        why += (" (its structured output allows only what min_tokens, "
                                "stop_token_ids or a logits processor forbid here)")
                    failed.setdefault(indices[local], why)
                    logits[local] = 0.0
        tokens = logits.argmax(dim=-1)
        if not all(p.greedy for p in params):
            greedy = torch.tensor([p.greedy for p in params])
            sampled = self._sample_random(logits, rows)
            tokens = torch.where(greedy, tokens, sampled)
        return tokens.tolist(), self._logprobs(raw_logprobs, tokens, params)

    @staticmethod
    def _run_logits_processors(logits: torch.Tensor, rows: Sequence[ScheduledChunk],
                               failed: dict[int, str]) -> torch.Tensor:
        """Each request's own processors on its own row; one that raises fails its row only."""
        for index, row in enumerate(rows):
            processors = row.sampling_params.logits_processors
            if not processors or index in failed:
                continue
            try:
                edited = logits[index].clone()
                for fn in processors:
                    result = call_logits_processor(fn, row.prompt_token_ids,
                                                   row.output_token_ids, edited)
                    if result is not None:
                        edited = torch.as_tensor(result, dtype=logits.dtype).reshape(
                            logits.shape[1])
                logits[index] = edited
            except Exception as exc:  # noqa: BLE001 - the request's own code
                failed[index] = f"its logits processor raised {type(exc).__name__}: {exc}"
        return logits

    def _generator_states(self, rows: Sequence[ScheduledChunk]) -> list | None:
        """What a retry after a failed batch must rewind: the generators random rows draw from."""
        if all(row.sampling_params.greedy for row in rows):
            return None
        states = [(self.generator, self.generator.get_state())]
        for row in rows:
            generator = self._request_generators.get(row.request_id)
            if generator is not None and not row.sampling_params.greedy:
                states.append((generator, generator.get_state()))
        return states

    @staticmethod
    def _restore(states: list | None) -> None:
        for generator, state in states or ():
            generator.set_state(state)

    # -- logits processing ---------------------------------------------------------------------
    @staticmethod
    def _mask_early_stops(logits: torch.Tensor, rows: Sequence[ScheduledChunk]) -> None:
        """Stop ids (and EOS unless ignored) of rows short of ``min_tokens``, all in one fill."""
        masked: list[list[int]] = []
        for row in rows:
            params = row.sampling_params
            stops: list[int] = []
            if len(row.output_token_ids) < params.min_tokens:
                stops.extend(params.stop_token_ids)
                if not params.ignore_eos:
                    stops.extend(row.eos_token_ids)
            masked.append(stops)
        index = _flat_index(masked, logits.shape[1])
        if index.numel():
            logits.view(-1).index_fill_(0, index, NEG_INF)

    @staticmethod
    def _apply_penalties(logits: torch.Tensor, rows: Sequence[ScheduledChunk]) -> None:
        """Repetition (prompt and output tokens), presence and frequency (output tokens) penalties
        for the whole batch at once: token ids are scattered into per-row counts by flat index."""
        vocab = logits.shape[1]
        params = [row.sampling_params for row in rows]
        repeat = [p.repetition_penalty != 1.0 for p in params]
        if any(repeat):
            seen = torch.zeros(logits.numel(), dtype=torch.bool)
            seen[_flat_index([row.prompt_token_ids + row.output_token_ids if on else []
                              for row, on in zip(rows, repeat)], vocab)] = True
            seen = seen.view_as(logits)
            penalty = torch.tensor([p.repetition_penalty for p in params],
                                   dtype=logits.dtype)[:, None]
            penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
            logits.copy_(torch.where(seen, penalized, logits))
        counted = [bool(p.presence_penalty or p.frequency_penalty) for p in params]
        if any(counted):
            index = _flat_index([row.output_token_ids if on else []
                                 for row, on in zip(rows, counted)], vocab)
            counts = torch.zeros(logits.numel(), dtype=logits.dtype)
            counts.index_add_(0, index, torch.ones(index.numel(), dtype=logits.dtype))
            counts = counts.view_as(logits)
            frequency = torch.tensor([p.frequency_penalty for p in params], dtype=logits.dtype)
            presence = torch.tensor([p.presence_penalty for p in params], dtype=logits.dtype)
            logits -= frequency[:, None] * counts
            logits -= presence[:, None] * (counts > 0).to(logits.dtype)

    def _sample_random(self, logits: torch.Tensor, rows: Sequence[ScheduledChunk]) -> torch.Tensor:
        params = [row.sampling_params for row in rows]
        temperature = torch.tensor([1.0 if p.greedy else p.temperature for p in params])
        logits = (logits / temperature[:, None]).clamp_(max=torch.finfo(logits.dtype).max)
        if any(p.top_k > 0 or p.top_p < 1.0 for p in params):
            logits = _top_k_top_p(logits, [p.top_k for p in params], [p.top_p for p in params])
        probs = torch.softmax(logits, dim=-1)
        if any(p.min_p > 0 for p in params):
            min_p = torch.tensor([p.min_p for p in params])
            threshold = probs.max(dim=-1, keepdim=True).values * min_p[:, None]
            probs = probs.masked_fill(probs < threshold, 0.0)
        noise = torch.empty_like(probs).exponential_(generator=self.generator)
        for index, row in enumerate(rows):
            if row.sampling_params.seed is not None:
                noise[index].exponential_(generator=self._generator_for(row))
        return (probs / noise).argmax(dim=-1)

    def _generator_for(self, row: ScheduledChunk) -> torch.Generator:
        generator = self._request_generators.get(row.request_id)
        if generator is None:
            generator = torch.Generator().manual_seed(row.sampling_params.seed)
            self._request_generators[row.request_id] = generator
        return generator

    # -- logprobs ------------------------------------------------------------------------------
    @staticmethod
    def _logprobs(raw: torch.Tensor | None, tokens: torch.Tensor, params
                  ) -> list[TokenLogprobs | None]:
        if raw is None:
            return [None] * len(params)
        chosen = raw.gather(1, tokens[:, None])  # (N, 1)
        ranks = (raw > chosen).sum(dim=-1) + 1
        max_k = max(p.logprobs or 0 for p in params)
        top_values, top_ids = raw.topk(max_k, dim=-1) if max_k else (None, None)
        token_list, chosen_list, rank_list = (tokens.tolist(), chosen[:, 0].tolist(),
                                              ranks.tolist())
        top_id_list = top_ids.tolist() if max_k else None
        top_value_list = top_values.tolist() if max_k else None
        out: list[TokenLogprobs | None] = []
        for index, p in enumerate(params):
            if p.logprobs is None:
                out.append(None)
                continue
            top = []
            if p.logprobs:
                top = list(zip(top_id_list[index][: p.logprobs],
                               top_value_list[index][: p.logprobs]))
            out.append(TokenLogprobs(token_list[index], chosen_list[index], rank_list[index], top))
        return out


@torch.inference_mode()
def score_tokens(logits: torch.Tensor, targets: Sequence[int], top: int) -> list[TokenLogprobs]:
    """Log-probability and rank of ``targets[i]`` under row ``i`` of ``logits``, with the ``top``
    most likely tokens of each row (prompt logprobs)."""
    raw = torch.log_softmax(logits, dim=-1)
    target = torch.tensor(list(targets), dtype=torch.long)[:, None]
    chosen = raw.gather(1, target)  # (N, 1)
    ranks = ((raw > chosen).sum(dim=-1) + 1).tolist()
    top_values, top_ids = raw.topk(top, dim=-1) if top else (None, None)
    top_ids = top_ids.tolist() if top else None
    top_values = top_values.tolist() if top else None
    return [TokenLogprobs(token, logprob, rank,
                          list(zip(top_ids[i], top_values[i])) if top else [])
            for i, (token, logprob, rank) in enumerate(zip(targets, chosen[:, 0].tolist(), ranks))]


def _edits_logits(row: ScheduledChunk) -> bool:
    """Whether a row's logits are changed before sampling (an early stop masked, a penalty)."""
    params = row.sampling_params
    return (len(row.output_token_ids) < params.min_tokens or params.repetition_penalty != 1.0
            or bool(params.presence_penalty) or bool(params.frequency_penalty))


def _flat_index(ids_per_row: Sequence[Sequence[int]], vocab: int) -> torch.Tensor:
    """Indices into a flattened (rows, vocab) tensor: row * vocab + id for each row's ids."""
    lengths = torch.tensor([len(ids) for ids in ids_per_row], dtype=torch.long)
    flat = torch.tensor(list(chain.from_iterable(ids_per_row)), dtype=torch.long)
    # An id outside the vocabulary would land in another row: refuse (the caller isolates it).
    if flat.numel() and not (0 <= int(flat.min()) and int(flat.max()) < vocab):
        raise IndexError(f"token id outside the vocabulary (0..{vocab - 1})")
    rows = torch.repeat_interleave(torch.arange(len(ids_per_row)), lengths)
    return rows * vocab + flat


def _top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """Mask logits outside each row's top-k and nucleus (top-p); at least one token survives."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[1]
    k = torch.tensor([min(t, vocab) if t > 0 else vocab for t in top_k])
    positions = torch.arange(vocab)[None, :]
    mask = positions >= k[:, None]
    probs = torch.softmax(sorted_logits.masked_fill(mask, NEG_INF), dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass strictly before each token
    mask |= before > torch.tensor(top_p)[:, None]
    mask[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(mask, NEG_INF)
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)
