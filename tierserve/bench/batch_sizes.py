"""Batch sizes for baselines that batch statically (HF ``generate``, llama.cpp's batched mode):
prompts grouped longest first, a few sizes probed on the first prompts, the fastest run on all."""

from __future__ import annotations


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


def timed(prompts: list[list[int]], produced: int, wall: float, **settings) -> dict:
    """A run's record in the shape ``probe_then_run`` reads."""
    return {"num_prompts": len(prompts), "wall_s": round(wall, 4), "output_tokens": produced,
            "output_tokens_per_s": round(produced / wall, 3), **settings}
