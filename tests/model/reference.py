"""Reference helpers: greedy decoding and logits from transformers, one prompt at a time."""

from __future__ import annotations

import torch


@torch.inference_mode()
def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens and the (steps, vocab) logits that chose them.

    attention_mask is passed explicitly: otherwise transformers masks every token equal to the
    pad id, and SmolLM2's pad id is <|im_end|>, which chat prompts contain.
    """
    ids = torch.tensor([prompt_ids])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, eos_token_id=None, pad_token_id=0,
                         output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[0, len(prompt_ids):].tolist()
    return tokens, torch.stack(out.logits)[:, 0].float()


@torch.inference_mode()
def hf_logits(model, token_ids: list[int]) -> torch.Tensor:
    """(len(token_ids), vocab) float32 logits of one full forward pass."""
    return model(torch.tensor([token_ids])).logits[0].float()


def tierserve_logits(llm, token_ids: list[int]) -> torch.Tensor:
    """All-position logits from tierserve's model for one prompt (one chunk, fresh blocks)."""
    from tierserve.request import SamplingParams
    from tierserve.sched.plan import ScheduledChunk

    runner = llm.engine.runner
    pool = llm.core.kv.pool  # borrow free blocks (evicting their cache entries) and give them back
    table = pool.allocate(-(-len(token_ids) // runner.block_size))
    try:
        chunk = ScheduledChunk("ref", token_ids, 0, table, True, SamplingParams(), token_ids, [])
        inputs = runner._prepare([chunk])
        hidden = runner.model.forward(inputs.input_ids, inputs.positions, runner.kv_cache,
                                      inputs.meta)
        return runner.model.compute_logits(hidden[: len(token_ids)])
    finally:
        pool.release(table)
