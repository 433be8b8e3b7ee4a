"""Build a ready engine from an EngineConfig: resolve the model, load weights and tokenizer,
size the KV pool from its memory budget, and wire scheduler, runner and core together."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from tierserve.config import EngineConfig, tier_block_counts
from tierserve.engine.core import EngineCore, EngineLimits
from tierserve.model.arch import ModelArchConfig
from tierserve.model.hub import resolve_model
from tierserve.model.llama import LlamaModel
from tierserve.model.loader import load_checkpoint
from tierserve.model.runner import ModelRunner
from tierserve.model.tokenizer import Tokenizer
from tierserve.selection.policies import make_policy
from tierserve.structured.constraints import Constraints

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(slots=True)
class LoadedEngine:
    core: EngineCore
    tokenizer: Tokenizer
    arch: ModelArchConfig
    runner: ModelRunner
    model_path: str


def build_engine(config: EngineConfig) -> LoadedEngine:
    """Load everything ``config`` names; raise a clear error for anything that does not fit."""
    started = time.perf_counter()
    if config.model.num_threads:
        torch.set_num_threads(config.model.num_threads)
    path = resolve_model(config.model.model)
    # An expert disk tier reads the experts from the files itself: never load them here.
    disk_experts = (config.experts.expert_cache is not None
                    and config.experts.expert_host_format == "none")
    checkpoint = load_checkpoint(path, DTYPES[config.model.dtype], skip_experts=disk_experts,
                                 quantization=config.model.quantization)
    arch = checkpoint.arch
    tokenizer = Tokenizer.from_path(path)
    max_model_len = _max_model_len(config, arch)
    offloaded = None
    if config.experts.expert_cache is not None:
        if not arch.num_experts:
            raise ValueError(f"--expert-cache offloads MoE experts; {path.name} is a dense model")
        from tierserve.experts.build import take_experts

        offloaded = take_experts(checkpoint.tensors)
    model = LlamaModel(arch, checkpoint.tensors, max_positions=max_model_len)
    block_size = config.cache.block_size
    key_bounds = make_policy(config.selection).needs_bounds
    bytes_per_block = model.bytes_per_block(block_size, key_bounds)
    num_blocks = config.cache.num_blocks or config.cache.kv_cache_memory // bytes_per_block
    if num_blocks < 1:
        raise ValueError(
            f"--kv-cache-memory {config.cache.kv_cache_memory:,} bytes holds no block; one block "
            f"of {block_size} tokens needs {bytes_per_block:,} bytes")
    num_host, num_disk = tier_block_counts(config.cache, bytes_per_block)
    runner = ModelRunner(model, num_blocks, block_size, seed=config.model.seed,
                         batch_invariant=config.model.batch_invariant,
                         shared_prefix_attention=config.model.shared_prefix_attention,
                         num_host_blocks=num_host,
                         num_disk_blocks=num_disk, swap_dir=config.cache.swap_dir,
                         max_num_batched_tokens=config.scheduler.max_num_batched_tokens,
                         max_num_seqs=config.scheduler.max_num_seqs,
                         selection=config.selection, key_bounds=key_bounds)
    if offloaded is not None:
        from tierserve.experts.build import attach_offload

        try:
            attach_offload(model, runner, config.experts, path, offloaded,
                           DTYPES[config.model.dtype])
        except BaseException:
            runner.close()
            raise
    limits = EngineLimits(max_model_len, arch.vocab_size, num_blocks * block_size,
                          bytes_per_block)
    eos = frozenset(tokenizer.stop_token_ids) | frozenset(arch.eos_token_ids)
    core = EngineCore(config, runner, limits, eos_token_ids=eos)
    # Structured outputs: the grammar engine sees the vocabulary as the tokenizer has it.
    core.constraints = runner.sampler.constraints = Constraints(
        tokenizer.backend.to_str(), arch.vocab_size, sorted(eos))
    log.info("loaded %s (%s, %d layers, %s, %s) in %.1f s; KV cache: %d blocks of %d tokens "
             "(%d tokens, %.0f MiB); host tier %d blocks, disk tier %d blocks; context %d tokens",
             path.name, arch.architecture, arch.num_layers, config.model.dtype,
             "native CPU kernels" if model.ops is not None else
             "AVX2 kernels" if model.fused_ops is not None else "plain torch ops",
             time.perf_counter() - started, num_blocks, block_size, num_blocks * block_size,
             runner.kv_cache.nbytes / 2**20, num_host, num_disk, max_model_len)
    return LoadedEngine(core, tokenizer, arch, runner, str(path))


def _max_model_len(config: EngineConfig, arch: ModelArchConfig) -> int:
    asked = config.model.max_model_len
    if asked is None:
        return arch.max_position_embeddings
    if asked > arch.max_position_embeddings:
        raise ValueError(
            f"--max-model-len {asked:,} is longer than this model's context of "
            f"{arch.max_position_embeddings:,} tokens; use at most that")
    return asked
