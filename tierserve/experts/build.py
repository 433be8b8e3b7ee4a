"""Wire expert offloading into a loaded model: take the experts out of the checkpoint's tensors,
put them in their tier (host memory, maybe quantized, or the checkpoint's files on disk), and
attach an ExpertOffload with the configured policy to the model's MoE layers."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from tierserve.config import ExpertConfig
from tierserve.experts.policies import make_expert_policy
from tierserve.experts.routes import read_traces
from tierserve.experts.tiers import DiskExperts, ExpertWeights, HostExperts
from tierserve.model.loader import ROUTED_EXPERT

log = logging.getLogger(__name__)


def take_experts(tensors: dict[str, torch.Tensor]) -> dict[tuple[int, int], ExpertWeights]:
    """Remove every routed expert's weights from ``tensors``; (layer, expert) -> weights."""
    parts: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    for name in [n for n in tensors if ROUTED_EXPERT.match(n)]:
        match = ROUTED_EXPERT.match(name)
        parts.setdefault((int(match.group(1)), int(match.group(2))), {})[match.group(3)] = (
            tensors.pop(name))
    return {key: ExpertWeights(torch.cat([p["gate"], p["up"]]).contiguous(), p["down"].contiguous())
            for key, p in parts.items()}


def expert_bytes(arch, dtype: torch.dtype) -> int:
    return 3 * arch.hidden_size * arch.moe_intermediate_size * torch.empty((), dtype=dtype).element_size()


def make_source(config: ExpertConfig, path: Path, arch, experts: dict, dtype: torch.dtype):
    """The lower tier the configuration names; ``experts`` are the weights taken out."""
    if config.expert_host_format != "none":
        return HostExperts(experts, config.expert_host_format)
    if path.suffix == ".gguf":
        source = DiskExperts.from_gguf(path, dtype)
    else:
        from tierserve.model.loader_hf import FAMILIES, _safetensors_files

        renames = [(re.compile(p), t) for p, t in FAMILIES[arch.architecture].renames]
        source = DiskExperts.from_safetensors(_safetensors_files(path), renames, dtype)
    source.check_shapes(arch.moe_intermediate_size, arch.hidden_size,
                        [(layer, e) for layer in range(arch.num_layers) if arch.is_moe_layer(layer)
                         for e in range(arch.num_experts)])
    if config.drop_page_cache:
        source.drop_page_cache()
    return source


def attach_offload(model, runner, config: ExpertConfig, path: Path, experts: dict,
                   dtype: torch.dtype):
    """Build the ExpertOffload for ``model`` and hand it to ``runner``; returns it."""
    from tierserve.experts.offload import ExpertOffload
    from tierserve.model.llama import Linear
    from tierserve.model.moe import MoEBlock

    blocks = [layer.mlp for layer in model.layers if isinstance(layer.mlp, MoEBlock)]
    num_slots = config.num_slots(expert_bytes(model.arch, dtype))
    traces = read_traces(config.expert_trace) if config.expert_trace else None
    predictor = None
    if config.expert_policy == "expertflow":
        if not config.expert_predictor:
            raise ValueError("--expert-policy expertflow needs --expert-predictor DIR (train one "
                             "with `tierserve moe train-predictor`)")
        from tierserve.experts.predictor import RoutePredictor

        predictor = RoutePredictor.load(config.expert_predictor)
    policy = make_expert_policy(config.expert_policy, traces, config.expert_prefetch_depth,
                                config.expert_pin_fraction)
    source = make_source(config, path, model.arch, experts, dtype)
    total = len(blocks) * blocks[0].num_experts
    victim_slots = config.num_victim_slots(expert_bytes(model.arch, dtype))
    if victim_slots and config.expert_host_format == "float":
        log.warning("--expert-victim-buffer in front of --expert-host-format float only copies "
                    "experts that host memory already holds in the model dtype; leaving it out")
        victim_slots = 0
    victim_slots = min(victim_slots, max(0, total - num_slots))  # more could never hold anything
    on_gpu = blocks[0].router.device.type == "cuda"
    offload = ExpertOffload(blocks, source, num_slots, policy,
                            lambda weight: Linear(weight, None, model.ops, False), predictor,
                            traces if config.expert_policy == "oracle" else None,
                            config.expert_prefetch_window, victim_slots,
                            config.expert_host_compute,
                            # host runs on a GPU machine take the CPU's torch path
                            (lambda weight: Linear(weight, None, None, False)) if on_gpu else None)
    runner.experts = offload
    log.info("experts offloaded: %d of %d in fast slots (%.0f MiB of %.0f), the rest in the %s "
             "tier%s%s; policy %s", num_slots, total, offload.resident_bytes() / 2**20,
             total * offload.expert_bytes / 2**20, source.tier,
             f" ({config.expert_host_format})" if source.tier == "host" else "",
             f" behind a victim buffer of {offload.victims.num_slots} experts"
             if offload.victims else "", config.expert_policy)
    if config.expert_host_compute:
        log.info("experts missed by at most %d rows of a forward run on the host tier's weights "
                 "instead of loading", config.expert_host_compute)
    return offload
