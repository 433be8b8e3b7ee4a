"""Sampler: logits -> next tokens. Greedy, temperature, top-k/p, min-p, penalties, seeds, logprobs.

Everything is batched over rows: penalties and early-stop masks gather every row's token ids into
one flat index and touch the logits once. The only per-row tensor work is drawing noise for
requests that carry their own seed (each such request owns a generator, so its samples do not
depend on what else is in the batch).

Sampling uses the exponential race: argmax(p / E) with E ~ Exp(1) draws from p exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain

import torch

from tierserve.sched.plan import ScheduledChunk, TokenLogprobs

NEG_INF = float("-inf")


class Sampler:
    """Stateful only in its generators: one engine-wide, one per seeded request."""

    def __init__(self, seed: int = 0) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self._request_generators: dict[str, torch.Generator] = {}

    def drop(self, request_ids: Sequence[str]) -> None:
        """Forget finished requests' generators."""
        for request_id in request_ids:
            self._request_generators.pop(request_id, None)

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, rows: Sequence[ScheduledChunk]
               ) -> tuple[list[int], list[TokenLogprobs | None]]:
        """logits: (N, vocab) float32, one row per chunk in ``rows``."""
        params = [row.sampling_params for row in rows]
        raw_logprobs = (torch.log_softmax(logits, dim=-1)
                        if any(p.logprobs is not None for p in params) else None)
        if any(_edits_logits(row) for row in rows):  # else argmax reads them untouched
            logits = logits.clone()
            self._mask_early_stops(logits, rows)
            self._apply_penalties(logits, rows)
        tokens = logits.argmax(dim=-1)
        if not all(p.greedy for p in params):
            greedy = torch.tensor([p.greedy for p in params])
            sampled = self._sample_random(logits, rows)
            tokens = torch.where(greedy, tokens, sampled)
        token_list = tokens.tolist()
        return token_list, self._logprobs(raw_logprobs, tokens, params)

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
        temperature = torch.tensor([p.temperature if p.temperature > 0 else 1.0 for p in params])
        logits = logits / temperature[:, None]
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


def _edits_logits(row: ScheduledChunk) -> bool:
    """Whether a row's logits are changed before sampling (an early stop masked, a penalty)."""
    params = row.sampling_params
    return (len(row.output_token_ids) < params.min_tokens or params.repetition_penalty != 1.0
            or bool(params.presence_penalty) or bool(params.frequency_penalty))


def _flat_index(ids_per_row: Sequence[Sequence[int]], vocab: int) -> torch.Tensor:
    """Indices into a flattened (rows, vocab) tensor: row * vocab + id for each row's ids."""
    lengths = torch.tensor([len(ids) for ids in ids_per_row], dtype=torch.long)
    flat = torch.tensor(list(chain.from_iterable(ids_per_row)), dtype=torch.long)
    rows = torch.repeat_interleave(torch.arange(len(ids_per_row)), lengths)
    return rows * vocab + flat


def _top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """Mask logits outside each row's top-k and nucleus (top-p); at least one token survives."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[1]
    k = torch.tensor([t if t > 0 else vocab for t in top_k])
    positions = torch.arange(vocab)[None, :]
    mask = positions >= k[:, None]
    probs = torch.softmax(sorted_logits.masked_fill(mask, NEG_INF), dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass strictly before each token
    mask |= before > torch.tensor(top_p)[:, None]
    mask[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(mask, NEG_INF)
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)
