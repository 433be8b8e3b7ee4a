"""The offline benchmark's baselines, HF transformers and llama.cpp, as ``Contender``s (see
``tierserve.bench.contenders``, which runs each in its own process)."""

from __future__ import annotations

import fcntl
import hashlib
import shutil
import sys
import tempfile
import time
from pathlib import Path

from tierserve.bench.batch_sizes import batch_groups, probe_then_run, timed
from tierserve.bench.contenders import WARMUP_TOKENS, WorkerJob


# -- HF transformers ---------------------------------------------------------------------------
def hf_dense_folder(gguf_path: Path, home=None) -> Path:
    """A folder holding ``gguf_path``'s weights dequantized to dense float32 safetensors, with
    its tokenizer: written once under ``$TIERSERVE_HOME/hf-dense`` (keyed by the file's path,
    size and modification time), reused after. HF's fastest correct configuration for a GGUF:
    transformers 5.24 loads a GGUF with its weights kept packed and casts every matmul's input
    and output, which is slower than plain dense weights in any dtype. One run converts at a
    time (a lock file); a run killed while writing leaves a ``*.partial-*`` folder that the next
    conversion removes."""
    from tierserve.model.hub import tierserve_home

    gguf_path = gguf_path.resolve()
    stat = gguf_path.stat()
    where = hashlib.sha256(str(gguf_path).encode()).hexdigest()[:8]
    root = tierserve_home(home) / "hf-dense"
    folder = root / f"{gguf_path.stem}-{where}-{stat.st_size}-{stat.st_mtime_ns}"
    if (folder / "config.json").is_file():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another run may be converting the same file
        if (folder / "config.json").is_file():
            return folder
        for stale in root.glob(f"{folder.name}.partial-*"):
            shutil.rmtree(stale, ignore_errors=True)
        print(f"hf: writing {gguf_path.name}'s weights dequantized to dense float32 into "
              f"{folder} (once; later runs reuse it)", file=sys.stderr, flush=True)
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        scratch = Path(tempfile.mkdtemp(prefix=f"{folder.name}.partial-", dir=root))
        try:
            model = AutoModelForCausalLM.from_pretrained(
                gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
            save_dense(model, scratch)
            AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name
                                          ).save_pretrained(scratch)
            scratch.rename(folder)  # whole or not at all
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return folder


def save_dense(model, folder) -> None:
    """Save a model transformers loaded from a GGUF as a plain dense checkpoint (it refuses to
    save one marked as GGUF-quantized); the model is unmarked in place."""
    model.config.quantization_config = None
    model.hf_quantizer = None
    model.is_quantized = False
    model.save_pretrained(folder)


class HFContender:
    """transformers ``generate`` on the same checkpoint: static batches, left padding, greedy,
    ``min_new_tokens = max_new_tokens``. A GGUF runs as dense weights in ``dtype``
    (``hf_dense_folder``: the parent converts it once, the worker loads the folder)."""

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
        return {"attn_implementation": model.config._attn_implementation,
                "weights": f"dense {self.job.dtype}" + (
                    " (dequantized from the GGUF)" if "hf-dense" in path.parts else "")}

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
            return timed(prompts, produced, time.monotonic() - started, mode=SEQUENTIAL_MODE)
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
        return timed(prompts, produced, wall, mode=mode, **decoder.settings())
