"""Batched greedy decoding on llama-cpp-python's low-level API for the llama.cpp baseline: up to
B sequences advance together, one ``llama_decode`` call per step, each sequence in its own KV
cache (``kv_unified=False``); its high-level ``Llama`` API decodes one sequence at a time.

``llama_cpp`` is imported inside the decoder only: ``prefill_chunks`` is a pure helper.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True, frozen=True)
class PrefillSpan:
    """Prompt tokens ``start:end`` of sequence ``seq`` (its positions) in one prefill batch."""

    seq: int
    start: int
    end: int

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.end:
            raise ValueError(f"empty or negative span {self.start}:{self.end}")


def prefill_chunks(lengths: list[int], n_batch: int) -> list[list[PrefillSpan]]:
    """Pack the prompts' tokens, prompt after prompt, into ``llama_decode`` batches of at most
    ``n_batch`` tokens; a prompt longer than the room left continues in the next batch."""
    if n_batch < 1:
        raise ValueError(f"n_batch must be positive, got {n_batch}")
    if any(length < 1 for length in lengths):
        raise ValueError("every prompt needs at least one token")
    chunks: list[list[PrefillSpan]] = []
    current: list[PrefillSpan] = []
    room = n_batch
    for seq, length in enumerate(lengths):
        start = 0
        while start < length:
            take = min(room, length - start)
            current.append(PrefillSpan(seq, start, start + take))
            start, room = start + take, room - take
            if room == 0:
                chunks.append(current)
                current, room = [], n_batch
    if current:
        chunks.append(current)
    return chunks


class BatchedGreedyDecoder:
    """A llama.cpp context for ``num_seqs`` sequences of ``seq_ctx`` tokens each (``n_ctx =
    num_seqs * seq_ctx``), made on a loaded ``llama_cpp.Llama``'s model and thread settings.
    ``generate`` runs one group of at most ``num_seqs`` prompts; call ``close`` when done."""

    def __init__(self, llm, num_seqs: int, seq_ctx: int, n_batch: int) -> None:
        import llama_cpp

        limit = llama_cpp.llama_max_parallel_sequences()
        if not 1 <= num_seqs <= limit:
            raise ValueError(f"--llama-cpp-batch-sizes: {num_seqs} sequences per llama_decode; "
                             f"this llama.cpp build allows 1 to {limit}")
        self._lib = llama_cpp
        params_type = type(llm.context_params)
        params = params_type.from_buffer_copy(llm.context_params)  # n_threads etc. as loaded
        # A decode step feeds one token per live sequence: n_batch and n_ubatch hold num_seqs.
        self.n_batch = max(n_batch, num_seqs)
        params.n_ctx = num_seqs * seq_ctx
        params.n_batch = self.n_batch
        params.n_ubatch = min(self.n_batch, max(512, num_seqs))
        params.n_seq_max = num_seqs
        self.kv_unified = None
        if "kv_unified" in dict(params_type._fields_):
            params.kv_unified = False  # one KV cache per sequence, each seq_ctx tokens
            self.kv_unified = False
        self.num_seqs, self.seq_ctx, self.n_ctx = num_seqs, seq_ctx, num_seqs * seq_ctx
        self.n_vocab = llm.n_vocab()
        self.ctx = llama_cpp.llama_init_from_model(llm.model, params)
        if self.ctx is None:
            raise RuntimeError(f"llama.cpp could not make a context of {self.n_ctx} tokens for "
                               f"{num_seqs} sequences; try smaller --llama-cpp-batch-sizes")
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)  # one seq id per token

    def settings(self) -> dict:
        """The context's settings, for the result row."""
        return {"n_ctx": self.n_ctx, "per_sequence_ctx": self.seq_ctx, "n_batch": self.n_batch,
                "n_seq_max": self.num_seqs, "kv_unified": self.kv_unified}

    def generate(self, prompts: list[list[int]], counts: list[int]) -> list[list[int]]:
        """Greedy: exactly ``counts[i]`` tokens for ``prompts[i]`` (EOS not special). Prefill
        packs every prompt into as few decodes as ``n_batch`` allows; then each step decodes
        the last token of every unfinished sequence in one batch; a finished sequence leaves
        the batch and its KV is cleared."""
        if not 1 <= len(prompts) <= self.num_seqs or len(counts) != len(prompts):
            raise ValueError(f"give 1 to {self.num_seqs} prompts and one count per prompt")
        for prompt, count in zip(prompts, counts):
            if count < 1 or len(prompt) + count > self.seq_ctx:
                raise ValueError(f"a prompt of {len(prompt)} tokens + {count} outputs does not "
                                 f"fit the per-sequence context of {self.seq_ctx}")
        for seq in range(len(prompts)):
            self._forget(seq)
        outputs: list[list[int]] = [[] for _ in prompts]
        for chunk in prefill_chunks([len(p) for p in prompts], self.n_batch):
            entries = [(prompts[s.seq][pos], pos, s.seq, pos == len(prompts[s.seq]) - 1)
                       for s in chunk for pos in range(s.start, s.end)]
            self._decode(entries)
            for row, (_token, _pos, seq, wants_logits) in enumerate(entries):
                if wants_logits:
                    outputs[seq].append(self._argmax(row))
        live = list(range(len(prompts)))
        while True:
            for seq in [s for s in live if len(outputs[s]) == counts[s]]:
                self._forget(seq)
            live = [s for s in live if len(outputs[s]) < counts[s]]
            if not live:
                return outputs
            # The newest output token of each live sequence, at position prompt + outputs - 1.
            self._decode([(outputs[s][-1], len(prompts[s]) + len(outputs[s]) - 1, s, True)
                          for s in live])
            for row, seq in enumerate(live):
                outputs[seq].append(self._argmax(row))

    def close(self) -> None:
        """Free the batch and the context (and its KV caches)."""
        if self.ctx is not None:
            self._lib.llama_batch_free(self.batch)
            self._lib.llama_free(self.ctx)
            self.ctx = None

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> None:
        """One ``llama_decode`` of (token, position, sequence, wants logits) entries."""
        batch = self.batch
        for row, (token, pos, seq, wants_logits) in enumerate(entries):
            batch.token[row] = token
            batch.pos[row] = pos
            batch.n_seq_id[row] = 1
            batch.seq_id[row][0] = seq
            batch.logits[row] = wants_logits
        batch.n_tokens = len(entries)
        code = self._lib.llama_decode(self.ctx, batch)
        if code != 0:
            raise RuntimeError(f"llama_decode returned {code} for {len(entries)} tokens (1: no "
                               f"KV slot: the per-sequence context {self.seq_ctx} is too small; "
                               "negative: llama.cpp error)")

    def _argmax(self, row: int) -> int:
        import numpy as np

        logits = np.ctypeslib.as_array(self._lib.llama_get_logits_ith(self.ctx, row),
                                       shape=(self.n_vocab,))
        return int(logits.argmax())

    def _forget(self, seq: int) -> None:
        self._lib.llama_memory_seq_rm(self.memory, seq, -1, -1)
