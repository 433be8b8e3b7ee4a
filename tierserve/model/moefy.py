"""MoEfication (Zhang et al., ACL Findings 2022): a dense Llama-family checkpoint's feed-forward
layers split into experts, with a router fitted per layer, written as an HF-style MoE folder.

For each layer, the FFN's intermediate neurons are clustered into ``num_experts`` equal groups
(balanced k-means on each neuron's gate and up rows, seeded); expert e is the FFN restricted to
its group, so all experts' outputs sum to the dense FFN's exactly. The router is linear: while the
dense model reads calibration text, each FFN input x and each expert's contribution norm
||down_e(silu(gate_e x) * up_e x)|| are recorded, and the router is the ridge least-squares map
from x to those norms, so it ranks experts by how much they would add. The text is the Python
documentation shipped with every CPython (``pydoc_data.topics``): real English prose and code,
on every machine, with nothing fetched.

The folder's model_type is ``tierserve_moefied``: experts count unweighted (transformers' MoE
families weigh them by router probabilities, which would break the exactness), so other tools
refuse it rather than compute something else.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tierserve.model.moe import DenseMLP

log = logging.getLogger(__name__)

DENSE_SOURCES = ("llama", "mistral", "qwen2")


@dataclass(slots=True)
class MoefySpec:
    """How to split a model: experts per layer, the top-k the folder's config asks for, how much
    calibration text fits the routers, and the seed for the clustering."""

    num_experts: int = 16
    top_k: int = 4
    calibration_tokens: int = 16384
    sequence_len: int = 256
    kmeans_iterations: int = 20
    ridge: float = 1e-3  # relative to the mean diagonal of the inputs' second moments
    seed: int = 0
    # What the clustering compares: "activations" (each neuron's |activation| over a sample of
    # calibration tokens: neurons that fire together share an expert, MoEfication's
    # co-activation split) or "weights" (its gate and up rows).
    clustering: str = "activations"
    activation_sample_tokens: int = 2048

    def __post_init__(self) -> None:
        if self.num_experts < 2:
            raise ValueError(f"--experts must be at least 2, got {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"--top-k must be in 1..{self.num_experts}, got {self.top_k}")
        if self.clustering not in ("activations", "weights"):
            raise ValueError(f"--clustering is activations or weights, got {self.clustering!r}")


@dataclass(slots=True)
class MoefyReport:
    """What was written and how well each layer's router ranks its experts on held-out tokens."""

    folder: str
    spec: dict
    source: str
    expert_size: int
    calibration_tokens: int
    # per layer: fraction of the true top-k experts (by contribution) the router's top-k holds
    router_recall: list[float] = field(default_factory=list)


def balanced_kmeans(features: torch.Tensor, clusters: int, iterations: int,
                    seed: int) -> list[np.ndarray]:
    """Split the rows of ``features`` (N, D) into ``clusters`` groups of N / clusters rows each,
    near their centroids. Assignment is greedy over all (row, cluster) distances, nearest
    first, each cluster taking rows until full: balanced, deterministic for a seed."""
    count = features.shape[0]
    if count % clusters:
        raise ValueError(f"{count} neurons do not split into {clusters} equal experts; pick a "
                         "divisor of the FFN width")
    size = count // clusters
    generator = torch.Generator().manual_seed(seed)
    centroids = features[torch.randperm(count, generator=generator)[:clusters]].clone()
    assignment = np.zeros(count, dtype=np.int64)
    for _ in range(iterations):
        distances = torch.cdist(features, centroids).numpy()  # (N, clusters)
        order = np.argsort(distances, axis=None, kind="stable")
        assignment.fill(-1)
        filled = np.zeros(clusters, dtype=np.int64)
        assigned = 0
        for flat in order.tolist():
            row, cluster = divmod(flat, clusters)
            if assignment[row] < 0 and filled[cluster] < size:
                assignment[row] = cluster
                filled[cluster] += 1
                assigned += 1
                if assigned == count:
                    break
        moved = [features[torch.from_numpy(assignment == c)].mean(0) for c in range(clusters)]
        new = torch.stack(moved)
        if torch.allclose(new, centroids):
            break
        centroids = new
    return [np.flatnonzero(assignment == c) for c in range(clusters)]


class _RouterFit:
    """Wraps one layer's DenseMLP while the dense model reads calibration text: passes every
    call through, and accumulates the least-squares normal equations of x -> expert scores
    (a held-out share of the tokens is kept aside to measure the fitted router)."""

    def __init__(self, mlp: DenseMLP, groups: list[np.ndarray], holdout_every: int = 8) -> None:
        self.mlp, self.groups = mlp, [torch.from_numpy(g) for g in groups]
        hidden = mlp.down.weight.shape[0]
        self.xtx = torch.zeros(hidden, hidden, dtype=torch.float64)
        self.xts = torch.zeros(hidden, len(groups), dtype=torch.float64)
        self.held_x: list[torch.Tensor] = []
        self.held_scores: list[torch.Tensor] = []
        self.holdout_every = holdout_every
        self.calls = 0
        self.tokens = 0

    def __call__(self, x: torch.Tensor, ops=None, num_rows: int | None = None) -> torch.Tensor:
        out = self.mlp(x, ops)
        x = x[:num_rows]  # the step's real tokens, not its padding
        scores = self.scores(x.float())
        self.calls += 1
        if self.calls % self.holdout_every == 0:
            self.held_x.append(x.float())
            self.held_scores.append(scores)
        else:
            x64 = x.double()
            self.xtx += x64.T @ x64
            self.xts += x64.T @ scores.double()
            self.tokens += x.shape[0]
        return out

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """(T, hidden) -> (T, experts): the norm of each expert's share of the FFN output."""
        gate, up = F.linear(x, self.mlp.gate_up.weight.float()).chunk(2, dim=-1)
        act = F.silu(gate) * up  # (T, ffn)
        down = self.mlp.down.weight.float()  # (hidden, ffn)
        return torch.stack([(act[:, g] @ down[:, g].T).norm(dim=-1) for g in self.groups], -1)

    def solve(self, ridge: float) -> torch.Tensor:
        """The router (experts, hidden), float32."""
        scale = self.xtx.diagonal().mean().clamp(min=1e-12)
        eye = torch.eye(self.xtx.shape[0], dtype=torch.float64)
        return torch.linalg.solve(self.xtx + ridge * scale * eye, self.xts).T.float()

    def recall(self, router: torch.Tensor, top_k: int) -> float:
        """Share of each held-out token's true top-k experts that the router's top-k picks."""
        if not self.held_x:
            return float("nan")
        x, scores = torch.cat(self.held_x), torch.cat(self.held_scores)
        truth = scores.topk(top_k, dim=-1).indices
        chosen = (x @ router.T).topk(top_k, dim=-1).indices
        hits = (truth[:, :, None] == chosen[:, None, :]).any(-1).float()
        return float(hits.mean())


def _weight_features(mlp: DenseMLP) -> torch.Tensor:
    """(ffn, 2 * hidden): each neuron's gate and up rows, normalised."""
    gate, up = mlp.gate_up.weight.float().chunk(2, dim=0)
    return F.normalize(torch.cat([gate, up], dim=1), dim=1)


class _ActivationSample:
    """Wraps a DenseMLP; keeps |silu(gate x) * up x| of the first ``limit`` tokens it sees."""

    def __init__(self, mlp: DenseMLP, limit: int) -> None:
        self.mlp, self.limit, self.rows = mlp, limit, []
        self.seen = 0

    def __call__(self, x: torch.Tensor, ops=None, num_rows: int | None = None) -> torch.Tensor:
        if self.seen < self.limit:
            real = x[:num_rows]  # not the step's padding rows
            gate, up = F.linear(real.float(), self.mlp.gate_up.weight.float()).chunk(2, dim=-1)
            self.rows.append((F.silu(gate) * up).abs()[: self.limit - self.seen])
            self.seen += self.rows[-1].shape[0]
        return self.mlp(x, ops)


def _activation_features(llm, chunks: list[list[int]], spec: MoefySpec) -> list[torch.Tensor]:
    """Per layer (ffn, tokens): each neuron's activation magnitudes over the first chunks,
    normalised, so that neurons active on the same tokens are near each other."""
    layers = llm.engine.runner.model.layers
    samples = [_ActivationSample(layer.mlp, spec.activation_sample_tokens) for layer in layers]
    count = -(-spec.activation_sample_tokens // spec.sequence_len)
    _run_wrapped(llm, samples, chunks[:count], progress=False)
    return [F.normalize(torch.cat(sample.rows).T, dim=1) for sample in samples]


def _run_wrapped(llm, wrappers: list, chunks: list[list[int]], progress: bool) -> None:
    """Prefill ``chunks`` through the dense model with each layer's MLP wrapped (in order)."""
    from tierserve.request import SamplingParams

    layers = llm.engine.runner.model.layers
    for layer, wrapper in zip(layers, wrappers):
        layer.mlp = wrapper
    try:
        llm.generate([{"prompt_token_ids": c} for c in chunks], SamplingParams(max_tokens=0),
                     use_tqdm=progress)
    finally:
        for layer, wrapper in zip(layers, wrappers):
            layer.mlp = wrapper.mlp


def calibration_text() -> str:
    """The Python documentation topics every CPython ships (pydoc_data), in a fixed order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def token_chunks(tokenizer, text: str, total: int, length: int, skip: int = 0
                 ) -> list[list[int]]:
    """``total`` tokens of ``text`` (after the first ``skip``) as chunks of ``length``."""
    ids = tokenizer.encode(text, add_special_tokens=False)[skip:skip + total]
    if len(ids) < total:
        raise ValueError(f"the calibration text has only {len(ids)} tokens after {skip}; ask "
                         f"for fewer than {total}")
    return [ids[i:i + length] for i in range(0, len(ids) - length + 1, length)]


def moefy(model: str, out: str | Path, spec: MoefySpec, progress: bool = True) -> MoefyReport:
    """Split ``model`` (a name, .gguf or HF folder of a dense Llama-family model) and write
    the MoE folder ``out``: config.json, model.safetensors, the tokenizer, moefy.json."""
    from tierserve.engine.llm import LLM

    # No prefix cache: the router pass must compute the chunks the clustering pass already saw.
    llm = LLM(model, dtype="float32", max_num_batched_tokens=max(256, spec.sequence_len),
              enable_prefix_caching=False)
    model_obj, arch = llm.engine.runner.model, llm.engine.arch
    if arch.architecture not in DENSE_SOURCES or arch.num_experts:
        raise ValueError(f"moefy splits dense {', '.join(DENSE_SOURCES)} models; "
                         f"{model} is {arch.architecture}")
    chunks = token_chunks(llm.tokenizer, calibration_text(), spec.calibration_tokens,
                          spec.sequence_len)
    features = (_activation_features(llm, chunks, spec) if spec.clustering == "activations"
                else [_weight_features(layer.mlp) for layer in model_obj.layers])
    groups = [balanced_kmeans(f, spec.num_experts, spec.kmeans_iterations, spec.seed + index)
              for index, f in enumerate(features)]
    fits = [_RouterFit(layer.mlp, layer_groups)
            for layer, layer_groups in zip(model_obj.layers, groups)]
    _run_wrapped(llm, fits, chunks, progress)
    routers = [fit.solve(spec.ridge) for fit in fits]
    report = MoefyReport(str(out), asdict(spec), str(llm.engine.model_path),
                         arch.intermediate_size // spec.num_experts,
                         sum(fit.tokens for fit in fits) // len(fits),
                         [fit.recall(r, spec.top_k) for fit, r in zip(fits, routers)])
    _write_folder(Path(out), llm, groups, routers, spec, report)
    return report


def perplexity(model: str, chunks: list[list[int]], top_k: int | None = None,
               oracle: bool = False, progress: bool = False) -> float:
    """exp(mean negative log-likelihood) of ``chunks`` under ``model`` (every token after each
    chunk's first); ``top_k`` overrides the experts per token of an MoE model; ``oracle``
    routes each token to the experts whose outputs are largest (every expert computed: the
    best a router could do with this split)."""
    from tierserve.engine.llm import LLM

    llm = LLM(model, dtype="float32", enable_prefix_caching=False)
    for layer in llm.engine.runner.model.layers:
        if hasattr(layer.mlp, "top_k"):
            layer.mlp.top_k = top_k or layer.mlp.top_k
            if oracle:
                layer.mlp.route = _oracle_route(layer.mlp)
    return engine_perplexity(llm, chunks, progress)


def engine_perplexity(llm, chunks: list[list[int]], progress: bool = False) -> float:
    """exp(mean negative log-likelihood) of ``chunks`` under an open LLM (every token after
    each chunk's first, from its prompt logprobs)."""
    from tierserve.request import SamplingParams

    outputs = llm.generate([{"prompt_token_ids": c} for c in chunks],
                           SamplingParams(max_tokens=0, prompt_logprobs=0), use_tqdm=progress)
    logprobs = [step[token].logprob for output in outputs
                for token, step in zip(output.prompt_token_ids[1:], output.prompt_logprobs[1:])]
    return float(np.exp(-np.mean(logprobs)))


def _oracle_route(block):
    def route(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        norms = torch.stack([expert(x).norm(dim=-1) for expert in block.experts], dim=-1)
        ids = norms.topk(block.top_k, dim=-1).indices
        return ids, torch.ones(ids.shape, dtype=x.dtype)

    return route


def _write_folder(out: Path, llm, groups: list[list[np.ndarray]], routers: list[torch.Tensor],
                  spec: MoefySpec, report: MoefyReport) -> None:
    from safetensors.torch import save_file

    arch, model = llm.engine.arch, llm.engine.runner.model
    tensors: dict[str, torch.Tensor] = {"model.embed_tokens.weight": model.embed,
                                        "model.norm.weight": model.norm}
    if not arch.tie_word_embeddings:
        tensors["lm_head.weight"] = model.lm_head.weight
    q, kv = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    for index, (layer, layer_groups, router) in enumerate(zip(model.layers, groups, routers)):
        prefix = f"model.layers.{index}."
        qw, kw, vw = layer.qkv.weight.split([q, kv, kv])
        tensors |= {f"{prefix}self_attn.q_proj.weight": qw, f"{prefix}self_attn.k_proj.weight": kw,
                    f"{prefix}self_attn.v_proj.weight": vw,
                    f"{prefix}self_attn.o_proj.weight": layer.o.weight,
                    f"{prefix}input_layernorm.weight": layer.input_norm,
                    f"{prefix}post_attention_layernorm.weight": layer.post_attention_norm,
                    f"{prefix}mlp.gate.weight": router}
        if arch.attention_bias:
            qb, kb, vb = layer.qkv.bias.split([q, kv, kv])
            tensors |= {f"{prefix}self_attn.q_proj.bias": qb,
                        f"{prefix}self_attn.k_proj.bias": kb, f"{prefix}self_attn.v_proj.bias": vb}
        gate, up = layer.mlp.gate_up.weight.chunk(2, dim=0)
        down = layer.mlp.down.weight
        for expert, rows in enumerate(layer_groups):
            index_rows = torch.from_numpy(rows)
            tensors |= {f"{prefix}mlp.experts.{expert}.gate_proj.weight": gate[index_rows],
                        f"{prefix}mlp.experts.{expert}.up_proj.weight": up[index_rows],
                        f"{prefix}mlp.experts.{expert}.down_proj.weight": down[:, index_rows]}
    out.mkdir(parents=True, exist_ok=True)
    save_file({name: t.contiguous() for name, t in tensors.items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(_config(arch, spec), indent=2))
    llm.tokenizer.save(out)
    (out / "moefy.json").write_text(json.dumps(asdict(report), indent=2))
    log.info("wrote %s: %d layers x %d experts of %d neurons", out, arch.num_layers,
             spec.num_experts, report.expert_size)


def _config(arch, spec: MoefySpec) -> dict:
    rope = {"rope_theta": arch.rope_theta, "rope_type": "default", **(arch.rope_scaling or {})}
    return {
        "model_type": "tierserve_moefied", "architectures": ["TierserveMoefiedForCausalLM"],
        "moefied_from": arch.architecture, "vocab_size": arch.vocab_size,
        "hidden_size": arch.hidden_size, "intermediate_size": arch.intermediate_size,
        "moe_intermediate_size": arch.intermediate_size // spec.num_experts,
        "num_local_experts": spec.num_experts, "num_experts_per_tok": spec.top_k,
        "num_hidden_layers": arch.num_layers, "num_attention_heads": arch.num_heads,
        "num_key_value_heads": arch.num_kv_heads, "head_dim": arch.head_dim,
        "rms_norm_eps": arch.rms_norm_eps, "rope_parameters": rope,
        "max_position_embeddings": arch.max_position_embeddings,
        "tie_word_embeddings": arch.tie_word_embeddings,
        "qkv_bias": arch.attention_bias, "bos_token_id": arch.bos_token_id,
        "eos_token_id": arch.eos_token_ids,
    }
