"""Recording router traces from a running engine, and the text prompts the MoE tools use.

``RouteRecorder`` sees every step's plan (a runner step hook) and every MoE layer's choices
(``MoEBlock.on_route``, real rows only), and files each row's top-k under its request and
position, with the gate lookahead's guess beside it: the next MoE layer's router run on this
layer's input. ``text_requests`` cuts prompts from real text (the Python documentation CPython ships,
``pydoc_data``): random token ids would give the router nothing to predict.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from tierserve.experts.routes import RequestTrace, by_votes
from tierserve.model.moe import MoEBlock


class RouteRecorder:
    """Attach to an engine's runner; ``trace(request_id, prompt, output)`` once it finished."""

    def __init__(self, runner, lookahead: bool = True) -> None:
        """``lookahead``: also record the gate lookahead's guesses (one more router GEMM and
        top-k per MoE layer; off where the recorded run is timed)."""
        self._chunks: list[tuple[str, int, int]] = []
        self.routes: dict[str, dict[int, dict[int, list[int]]]] = {}
        self.guesses: dict[str, dict[int, dict[int, list[int]]]] = {}
        self._guess: dict[int, torch.Tensor] = {}  # layer -> this forward's lookahead guesses
        runner.step_hooks.append(self._on_plan)
        blocks = [layer.mlp for layer in runner.model.layers if isinstance(layer.mlp, MoEBlock)]
        for block, after in zip(blocks, blocks[1:] + [None]):
            block.on_route = self._on_route
            if after is not None and lookahead:
                block.route = self._guessing(block, after, block.route)

    def _guessing(self, block: MoEBlock, after: MoEBlock, route):
        def guessing(x: torch.Tensor):
            self._guess[block.layer_index] = torch.topk(F.linear(x, after.router), after.top_k,
                                                        dim=-1).indices
            return route(x)
        return guessing

    def _on_plan(self, plan) -> None:
        self._chunks = [(c.request_id, c.start_pos, c.num_tokens) for c in plan.chunks]

    def _on_route(self, layer: int, ids: torch.Tensor) -> None:
        self._file(self.routes, layer, ids.tolist())  # (real tokens, top_k), chunk after chunk
        guess = self._guess.pop(layer, None)
        if guess is not None:
            self._file(self.guesses, layer, guess[: ids.shape[0]].tolist())

    def _file(self, into, layer: int, rows: list[list[int]]) -> None:
        row = 0
        for request_id, start, count in self._chunks:
            per_layer = into.setdefault(request_id, {}).setdefault(layer, {})
            for offset in range(count):
                per_layer[start + offset] = sorted(rows[row + offset])
            row += count

    def trace(self, request_id: str, prompt: list[int], output: list[int]) -> RequestTrace:
        positions = len(prompt) + max(0, len(output) - 1)

        def per_position(layers):
            return {layer: [by_pos.get(p, []) for p in range(positions)]
                    for layer, by_pos in sorted(layers.items())}
        return RequestTrace(list(prompt), list(output),
                            per_position(self.routes.pop(request_id, {})),
                            per_position(self.guesses.pop(request_id, {})))


def text_requests(tokenizer, num_requests: int, seed: int, scale: float = 0.25,
                  max_prompt_len: int = 512, max_output_len: int = 256
                  ) -> list[tuple[list[int], int]]:
    """(prompt ids, max tokens) pairs: ShareGPT-like lognormal lengths (vLLM paper means 161 /
    338, times ``scale``), each prompt a window of the Python docs at a seeded random place."""
    from tierserve.bench.workloads import MIN_LEN, SHAREGPT_OUTPUT, SHAREGPT_PROMPT
    from tierserve.model.moefy import calibration_text

    ids = tokenizer.encode(calibration_text())
    rng = np.random.default_rng(seed)
    prompt_lens = SHAREGPT_PROMPT.sample(rng, num_requests, scale, MIN_LEN, max_prompt_len)
    output_lens = SHAREGPT_OUTPUT.sample(rng, num_requests, scale, MIN_LEN, max_output_len)
    requests = []
    for length, out in zip(prompt_lens, output_lens):
        start = int(rng.integers(0, len(ids) - length))
        requests.append((ids[start:start + length], out))
    return requests


class RouteReplay:
    """Force every MoE layer's choices to a trace's, found by the request's prompt and the
    token's position (positions the trace does not cover keep the router's choice). Used to
    run a random-weight model with realistic expert sizes on a real model's routes: each chosen
    expert's weight is 1 / top_k. With offloaded experts and a trace that recorded them, the
    gate lookahead's guesses are the traced model's too (its own router would guess at random
    weights)."""

    def __init__(self, runner, traces) -> None:
        from tierserve.experts.routes import prompt_key

        self._by_prompt = {prompt_key(t.prompt): t for t in traces}
        self._key = prompt_key
        self._rows: list[tuple[object, int, int]] = []  # (trace or None, start_pos, num_tokens)
        self._traces: dict[str, object] = {}
        runner.step_hooks.append(self._on_plan)
        blocks = [layer.mlp for layer in runner.model.layers if isinstance(layer.mlp, MoEBlock)]
        self._next = {a.layer_index: b.layer_index for a, b in zip(blocks, blocks[1:])}
        for block in blocks:
            block.route = self._forced(block, block.route)
        if runner.experts is not None and any(t.lookahead for t in traces):
            runner.experts.lookahead_guess = self._guess

    def _guess(self, layer: int) -> list[tuple[int, int]] | None:
        """The traced lookahead guesses of this forward's rows at ``layer``, as expert keys of
        the next MoE layer (None: a row the trace does not cover; run the router instead)."""
        after = self._next.get(layer)
        if after is None:
            return []
        rows: list[list[int]] = []
        for trace, start, count in self._rows:
            per_position = trace.lookahead.get(layer, []) if trace else []
            if start + count > len(per_position):
                return None
            rows += per_position[start:start + count]
        return [(after, e) for e in by_votes(rows)]

    def _on_plan(self, plan) -> None:
        for request_id in plan.finished_request_ids:
            self._traces.pop(request_id, None)
        rows = []
        for chunk in plan.chunks:
            if chunk.request_id not in self._traces:
                self._traces[chunk.request_id] = self._by_prompt.get(
                    self._key(chunk.prompt_token_ids))
            rows.append((self._traces[chunk.request_id], chunk.start_pos, chunk.num_tokens))
        self._rows = rows

    def _forced(self, block: MoEBlock, route):
        def forced(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            ids, weights = route(x)
            ids = ids.clone()
            row = 0
            for trace, start, count in self._rows:
                per_position = trace.routes.get(block.layer_index, []) if trace else []
                for offset in range(count):
                    position = start + offset
                    if position < len(per_position) and per_position[position]:
                        ids[row + offset] = torch.tensor(per_position[position])
                row += count
            return ids, torch.full(ids.shape, 1.0 / block.top_k, dtype=weights.dtype)
        return forced
