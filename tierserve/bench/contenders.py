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
    contender = contender_class(job.contender)(job)
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
        return {"dtype": self.job.engine.model.dtype,
                "quantization": self.job.engine.model.quantization, "policy": scheduler.policy,
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


def contender_class(name: str) -> type:
    """The class that runs contender ``name``; the baselines' module is imported only when one
    of them runs."""
    if name == "tierserve":
        return TierserveContender
    from tierserve.bench import baselines

    return {"hf": baselines.HFContender, "llama.cpp": baselines.LlamaCppContender}[name]


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
