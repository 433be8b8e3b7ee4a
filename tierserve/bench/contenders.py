"""The offline benchmark's contenders (tierserve, HF transformers, llama.cpp), each run in its own
process: ``python -m tierserve.bench.contenders JOB.pickle RESULT.json``.

A process per contender makes its peak RSS its own (``ru_maxrss`` of this process: the load,
the weights and every cache it built) and keeps contenders from sharing torch state. Every
contender gets the same prompt token ids and produces exactly each prompt's ``max_tokens``
greedy tokens (EOS is ignored or masked), so output token counts are equal by construction;
the parent checks that they are.
"""

from __future__ import annotations

import json
import pickle
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from tierserve.config import EngineConfig

CONTENDERS = ("tierserve", "hf", "llama.cpp")
WARMUP_TOKENS = 4


@dataclass(slots=True)
class WorkerJob:
    """One contender's run, as the parent hands it to the worker process."""

    contender: str  # one of CONTENDERS
    scenario: str  # throughput | prefill | single-decode
    model_path: str  # a .gguf file or an HF folder
    dtype: str  # tierserve and hf; llama.cpp runs the GGUF's tensor types as stored
    threads: int
    prompts: list[list[int]]
    max_tokens: list[int]
    engine: EngineConfig | None = None  # tierserve's engine settings
    hf_batch_sizes: tuple[int, ...] = (16, 32, 64)
    llama_cpp_n_batch: int = 512
    llama_cpp_batch_sizes: tuple[int, ...] = (1,)  # 1: sequential Llama.generate
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.contender not in CONTENDERS:
            raise ValueError(f"unknown contender {self.contender!r}; one of {CONTENDERS}")
        if len(self.prompts) != len(self.max_tokens) or not self.prompts:
            raise ValueError("give one max_tokens per prompt, and at least one prompt")


class Contender(Protocol):
    """What each scenario needs from a contender. Timestamps are ``time.monotonic()``."""

    def load(self) -> dict: ...  # load the model; returns settings for the result

    def warm_up(self) -> None: ...

    def generate_one(self, prompt: list[int], count: int) -> list[float]:
        """Generate ``count`` tokens for one prompt alone; the time of each output token."""
        ...

    def generate_all(self, prompts: list[list[int]], max_tokens: list[int]) -> dict:
        """Generate for every prompt at this contender's best; ``wall_s``, ``output_tokens``
        (counted: at most each prompt's ``max_tokens``) and settings chosen."""
        ...


# -- scenarios ---------------------------------------------------------------------------------
def run_job(job: WorkerJob) -> dict:
    """Load, warm up and run ``job``'s scenario; the result row (load and warm-up not in
    ``wall_s``)."""
    contender = _CONTENDER_CLASSES[job.contender](job)
    started = time.monotonic()
    settings = contender.load()
    load_s = time.monotonic() - started
    started = time.monotonic()
    contender.warm_up()
    warmup_s = time.monotonic() - started
    row = SCENARIOS[job.scenario](contender, job)
    prompt_tokens = sum(map(len, job.prompts))
    row.update(prompt_tokens=prompt_tokens, num_prompts=len(job.prompts),
               total_tokens_per_s=(prompt_tokens + row["output_tokens"]) / row["wall_s"],
               output_tokens_per_s=row["output_tokens"] / row["wall_s"])
    # The scenario's own record (e.g. the batched mode it ran) wins over load-time settings.
    settings = {key: value for key, value in settings.items() if key not in row}
    return {"contender": job.contender, "dtype": settings.pop("dtype", job.dtype),
            **_rounded(row), "load_s": round(load_s, 3), "warmup_s": round(warmup_s, 3),
            "peak_rss_mb": round(peak_rss_mb(), 1), "threads": job.threads, **settings}


def throughput(contender: Contender, job: WorkerJob) -> dict:
    """Every prompt through the contender's batched path."""
    return contender.generate_all(job.prompts, job.max_tokens)


def prefill(contender: Contender, job: WorkerJob) -> dict:
    """Each prompt alone with one output token: prompt tokens over the summed time to it."""
    wall, first, outputs = 0.0, [], 0
    for prompt in job.prompts:
        started = time.monotonic()
        times = contender.generate_one(prompt, 1)
        wall += time.monotonic() - started
        first.append(times[0] - started)
        outputs += len(times)
    return {"wall_s": wall, "output_tokens": outputs,
            "prefill_tokens_per_s": sum(map(len, job.prompts)) / wall,
            "first_token_s": sum(first) / len(first)}


def single_decode(contender: Contender, job: WorkerJob) -> dict:
    """Each prompt alone; decode tokens/s from the output token timestamps, the first token
    (the prefill) excluded: (tokens - 1) / (last token time - first token time)."""
    wall, first, outputs, decode_tokens, decode_s = 0.0, [], 0, 0, 0.0
    for prompt, count in zip(job.prompts, job.max_tokens):
        started = time.monotonic()
        times = contender.generate_one(prompt, count)
        wall += time.monotonic() - started
        first.append(times[0] - started)
        outputs += len(times)
        decode_tokens += len(times) - 1
        decode_s += times[-1] - times[0]
    return {"wall_s": wall, "output_tokens": outputs,
            "decode_tokens_per_s": decode_tokens / decode_s if decode_s > 0 else float("nan"),
            "first_token_s": sum(first) / len(first)}


SCENARIOS = {"throughput": throughput, "prefill": prefill, "single-decode": single_decode}


# -- tierserve ---------------------------------------------------------------------------------
class TierserveContender:
    """``LLM.generate`` with greedy ``ignore_eos`` sampling; all prompts at once."""

    def __init__(self, job: WorkerJob) -> None:
        self.job = job

    def load(self) -> dict:
        from tierserve.bench.harness import open_engine

        self.llm = open_engine(self.job.engine, warmup=False)
        scheduler, cache = self.job.engine.scheduler, self.job.engine.cache
        return {"dtype": self.job.engine.model.dtype, "policy": scheduler.policy,
                "max_num_batched_tokens": scheduler.max_num_batched_tokens,
                "max_num_seqs": scheduler.max_num_seqs,
                # Sized by --kv-cache-memory and --swap-space; the pages of them that are
                # touched count in peak_rss_mb.
                "kv_cache_tokens": self.llm.core.limits.kv_capacity_tokens,
                "swap_space_bytes": cache.swap_space,
                "mode": "continuous batching, all prompts submitted at once"}

    def warm_up(self) -> None:
        from tierserve.bench.harness import warm_up

        warm_up(self.llm)

    def _params(self, count: int):
        from tierserve.request import SamplingParams

        return SamplingParams(temperature=0.0, max_tokens=count, ignore_eos=True)

    def generate_one(self, prompt: list[int], count: int) -> list[float]:
        self.llm.generate([prompt], self._params(count), use_tqdm=False)
        # The core stamps each output token when its step finishes (time.monotonic).
        return list(self.llm.core.metrics.finished_timelines()[-1].token_times)

    def generate_all(self, prompts: list[list[int]], max_tokens: list[int]) -> dict:
        params = [self._params(count) for count in max_tokens]
        started = time.monotonic()
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        wall = time.monotonic() - started
        return {"wall_s": wall,
                "output_tokens": sum(len(out.outputs[0].token_ids) for out in outputs)}


# -- HF transformers ---------------------------------------------------------------------------
class HFContender:
    """transformers ``generate`` on the same checkpoint (a GGUF is dequantized to ``dtype``):
    static batches, left padding, greedy, ``min_new_tokens = max_new_tokens``."""

    def __init__(self, job: WorkerJob) -> None:
        self.job = job

    def load(self) -> dict:
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(self.job.threads)
        path = Path(self.job.model_path)
        dtype = getattr(torch, self.job.dtype)
        if path.suffix == ".gguf":
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                         dtype=dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        self.model = model.eval()
        config = model.generation_config
        eos = config.eos_token_id
        eos = eos[0] if isinstance(eos, list) else eos
        self.pad_id = config.pad_token_id if config.pad_token_id is not None else (eos or 0)
        return {"attn_implementation": model.config._attn_implementation}

    def warm_up(self) -> None:
        prompts = [prompt[:16] for prompt in self.job.prompts[:2]]
        self._generate(prompts, WARMUP_TOKENS)

    def _generate(self, prompts: list[list[int]], count: int, streamer=None):
        """One static batch, left-padded with the pad (or EOS) id; (batch, new tokens) ids."""
        import torch

        width = max(map(len, prompts))
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt):] = torch.tensor(prompt)
            mask[row, width - len(prompt):] = 1
        with torch.inference_mode():
            out = self.model.generate(ids, attention_mask=mask, do_sample=False,
                                      max_new_tokens=count, min_new_tokens=count,
                                      pad_token_id=self.pad_id, streamer=streamer)
        return out[:, width:]

    def generate_one(self, prompt: list[int], count: int) -> list[float]:
        clock = _TokenClock()
        self._generate([prompt], count, streamer=clock)
        return clock.token_times

    def generate_all(self, prompts: list[list[int]], max_tokens: list[int]) -> dict:
        full = probe_then_run(self.job.hf_batch_sizes, prompts, max_tokens, self._batches)
        full.update(batching="static batches of batch_size prompts sorted by output then prompt "
                    "length (longest first), left-padded; a batch generates its longest "
                    "max_tokens and each row counts only its own")
        return full

    def _batches(self, prompts: list[list[int]], max_tokens: list[int], size: int) -> dict:
        counted = computed = 0
        started = time.monotonic()
        for batch in batch_groups(prompts, max_tokens, size):
            count = max(max_tokens[i] for i in batch)
            new = self._generate([prompts[i] for i in batch], count)  # (batch, count)
            computed += new.numel()
            counted += sum(min(new.shape[1], max_tokens[i]) for i in batch)
        wall = time.monotonic() - started
        return {"num_prompts": len(prompts), "wall_s": round(wall, 4), "output_tokens": counted,
                "computed_output_tokens": computed,
                "output_tokens_per_s": round(counted / wall, 3)}


def batch_groups(prompts: list[list[int]], max_tokens: list[int], size: int) -> list[list[int]]:
    """Prompt indices in groups of ``size``, sorted by output then prompt length, longest
    first, so a group's sequences finish close together."""
    if size < 1:
        raise ValueError(f"batch size must be positive, got {size}")
    order = sorted(range(len(prompts)), key=lambda i: (max_tokens[i], len(prompts[i])),
                   reverse=True)
    return [order[first: first + size] for first in range(0, len(order), size)]


def probe_then_run(sizes: tuple[int, ...], prompts: list[list[int]], max_tokens: list[int],
                   run) -> dict:
    """With several ``sizes``, ``run(prompts, max_tokens, size)`` each on its ``probe_size``
    first prompts, then the best by output tokens/s on all of them (one size: just that).
    ``run`` returns ``num_prompts``, ``wall_s``, ``output_tokens``, ``output_tokens_per_s``;
    the full run's record gains ``batch_size`` and ``per_batch_size`` (the probes)."""
    per_batch_size: dict[int, dict] = {}
    if len(sizes) > 1:  # probe each size on the first prompts, run the best on all
        for size in sizes:
            count = probe_size(len(prompts), size)
            per_batch_size[size] = run(prompts[:count], max_tokens[:count], size)
    best = best_batch_size(per_batch_size) if per_batch_size else sizes[0]
    probed = per_batch_size.get(best)
    if probed is not None and probed["num_prompts"] == len(prompts):
        full = dict(probed)  # the probe already ran every prompt
    else:
        full = run(prompts, max_tokens, best)
    full.update(batch_size=best, per_batch_size={str(k): v for k, v in per_batch_size.items()})
    return full


def probe_size(num_prompts: int, batch_size: int) -> int:
    """Prompts a batch size is probed on: two batches' worth, at most all of them."""
    return min(num_prompts, 2 * batch_size)


def best_batch_size(per_batch_size: dict[int, dict]) -> int:
    """The probed batch size with the most output tokens/s (the smaller one on a tie)."""
    if not per_batch_size:
        raise ValueError("no batch size was probed; give --hf-batch-sizes or "
                         "--llama-cpp-batch-sizes")
    return max(sorted(per_batch_size), key=lambda size: per_batch_size[size]["output_tokens_per_s"])


class _TokenClock:
    """A transformers streamer that stamps each ``put``; the first put is the prompt."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.monotonic())

    def end(self) -> None:
        pass

    @property
    def token_times(self) -> list[float]:
        return self.times[1:]


# -- llama.cpp ---------------------------------------------------------------------------------
SEQUENTIAL_MODE = "sequential, one KV cache (Llama.generate, top_k=1, reset per prompt)"


class LlamaCppContender:
    """llama-cpp-python, greedy. Batch size 1: ``Llama.generate`` one prompt at a time on one
    KV cache (its high-level API has no batching), reset between prompts. Batch size B > 1
    (throughput only): B sequences per ``llama_decode`` on the low-level API, one KV cache per
    sequence (``BatchedGreedyDecoder``). ``llama_cpp_batch_sizes`` are probed like HF's."""

    def __init__(self, job: WorkerJob) -> None:
        self.job = job

    def load(self) -> dict:
        import llama_cpp

        longest = max(len(p) + n for p, n in zip(self.job.prompts, self.job.max_tokens))
        n_ctx = -(-(longest + 1) // 256) * 256
        n_batch = min(self.job.llama_cpp_n_batch, n_ctx)
        self.n_ctx, self.n_batch = n_ctx, n_batch
        self.llm = llama_cpp.Llama(model_path=self.job.model_path, n_ctx=n_ctx, n_batch=n_batch,
                                   n_threads=self.job.threads, n_threads_batch=self.job.threads,
                                   logits_all=False, verbose=False, seed=0)
        return {"dtype": "gguf tensor types as stored", "n_ctx": n_ctx, "n_batch": n_batch,
                "llama_cpp_python": llama_cpp.__version__,
                "mode": SEQUENTIAL_MODE}

    def warm_up(self) -> None:
        self.generate_one(self.job.prompts[0][:16], WARMUP_TOKENS)

    def generate_one(self, prompt: list[int], count: int) -> list[float]:
        self.llm.reset()  # no KV reuse across prompts
        times: list[float] = []
        tokens = self.llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0,
                                   repeat_penalty=1.0, reset=True)
        for _token in tokens:  # the iterator never stops at EOS: take exactly ``count``
            times.append(time.monotonic())
            if len(times) == count:
                break
        tokens.close()
        return times

    def generate_all(self, prompts: list[list[int]], max_tokens: list[int]) -> dict:
        return probe_then_run(self.job.llama_cpp_batch_sizes, prompts, max_tokens, self._run)

    def _run(self, prompts: list[list[int]], max_tokens: list[int], size: int) -> dict:
        if size == 1:
            started = time.monotonic()
            produced = sum(len(self.generate_one(p, n)) for p, n in zip(prompts, max_tokens))
            return _timed(prompts, produced, time.monotonic() - started, mode=SEQUENTIAL_MODE)
        from tierserve.bench.llama_cpp_batch import BatchedGreedyDecoder

        # The context (B x n_ctx tokens of KV) is made and warmed up outside wall_s.
        decoder = BatchedGreedyDecoder(self.llm, size, self.n_ctx, self.n_batch)
        try:
            warm = prompts[:size]
            decoder.generate([p[:16] for p in warm], [WARMUP_TOKENS] * len(warm))
            produced = 0
            started = time.monotonic()
            for group in batch_groups(prompts, max_tokens, size):
                outputs = decoder.generate([prompts[i] for i in group],
                                           [max_tokens[i] for i in group])
                produced += sum(map(len, outputs))
            wall = time.monotonic() - started
        finally:
            decoder.close()
        mode = (f"batched, {size} sequences per llama_decode, one KV cache per sequence "
                f"(kv_unified={decoder.kv_unified}), greedy argmax; prompts in groups of {size} "
                "sorted by output then prompt length, a finished sequence leaves the batch")
        return _timed(prompts, produced, wall, mode=mode, **decoder.settings())


def _timed(prompts: list[list[int]], produced: int, wall: float, **settings) -> dict:
    return {"num_prompts": len(prompts), "wall_s": round(wall, 4), "output_tokens": produced,
            "output_tokens_per_s": round(produced / wall, 3), **settings}


_CONTENDER_CLASSES = {"tierserve": TierserveContender, "hf": HFContender,
                      "llama.cpp": LlamaCppContender}


# -- process plumbing --------------------------------------------------------------------------
def peak_rss_mb() -> float:
    """This process's peak resident set size in MiB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def _rounded(row: dict) -> dict:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}


def main(argv: list[str]) -> int:
    """Worker entry: read the pickled WorkerJob, write its result row as JSON."""
    job_path, result_path = argv
    with open(job_path, "rb") as job_file:
        job: WorkerJob = pickle.load(job_file)  # written by our parent process
    try:
        result = run_job(job)
    except ImportError as exc:  # a baseline whose package is missing or broken
        result = {"contender": job.contender, "skipped": f"{job.contender}: {exc}"}
    Path(result_path).write_text(json.dumps(result), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
