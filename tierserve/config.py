"""Engine configuration: small per-subsystem dataclasses composed into EngineConfig, validated once."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2,
               "mib": 1024**2, "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "t": 1000**4,
               "tb": 1000**4, "tib": 1024**4}


def parse_size(value: str | int | float) -> int:
    """Parse a memory size such as ``2GiB``, ``512MB`` or ``1e9`` into bytes."""
    if isinstance(value, (int, float)):
        size = int(value)
    else:
        match = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", value)
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _SIZE_UNITS:
            raise ValueError(f"cannot read {value!r} as a size; write e.g. 2GiB, 512MiB or 1e9")
        size = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if size < 0:
        raise ValueError(f"size must not be negative, got {value!r}")
    return size


def auto_dtype() -> str:
    """bfloat16 where the hardware computes it natively (a CUDA GPU, or a CPU with AVX-512 BF16
    or AMX: 2.3x float32 matmul and half the bytes on this project's Zen 4), else float32."""
    import torch

    if torch.cuda.is_available():
        return "bfloat16"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            flags = next((line for line in info if line.startswith("flags")), "")
    except OSError:
        return "float32"
    return "bfloat16" if {"avx512_bf16", "amx_bf16"} & set(flags.split()) else "float32"


QUANTIZATIONS = ("none", "gguf", "q8_0", "q4_0", "q4_1", "q4_k", "q5_k", "q6_k")


@dataclass(slots=True)
class ModelConfig:
    """Which checkpoint to run and how."""

    model: str = "smollm2"
    dtype: str = "float32"  # "float32" | "bfloat16" | "float16" | "auto" (resolved at init)
    max_model_len: int | None = None  # None: the checkpoint's context length
    seed: int = 0  # seeds the engine-wide generator used by unseeded sampling
    num_threads: int | None = None  # torch intra-op threads; None keeps torch's choice
    # Pad small float32 batches so every row goes through the same matmul kernel: a request's
    # logits then do not depend on what else is in the batch (see docs/design.md).
    batch_invariant: bool = True
    # Decodes whose block tables start with the same blocks (a shared prefix) read them together
    # in the native kernel (bfloat16 only: float32 keeps each row's arithmetic fixed).
    shared_prefix_attention: bool = True
    # Linear weights kept packed (tierserve/model/packed.py): "none" dequantizes everything to
    # dtype; "gguf" keeps a GGUF's Q8_0/Q4_0/Q4_1/Q4_K/Q5_K/Q6_K tensors as stored; the others
    # pack every linear (and the embedding) at load, from whatever the checkpoint holds (a K-quant
    # falls back to Q4_1 or Q8_0 for a weight whose columns are not whole super-blocks of 256).
    quantization: str = "none"

    def __post_init__(self) -> None:
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, "
                             f"got {self.quantization!r}")
        if self.dtype == "auto":
            self.dtype = auto_dtype()
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(
                f"dtype must be float32, bfloat16, float16 or auto, got {self.dtype!r}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be positive, got {self.max_model_len}")


@dataclass(slots=True)
class CacheConfig:
    """The paged KV cache: block size and how much memory the device tier may use."""

    block_size: int = 16
    kv_cache_memory: int = 1 << 30  # bytes (--kv-cache-memory)
    num_blocks: int | None = None  # overrides kv_cache_memory (tests, simulations)
    num_host_blocks: int | None = None  # overrides swap_space
    num_disk_blocks: int | None = None  # overrides disk_swap_space
    enable_prefix_caching: bool = True
    swap_space: int = 1 << 30  # bytes of host-tier KV (--swap-space); 0 disables swapping
    disk_swap_space: int = 0  # bytes of disk-tier KV (--disk-swap-space), a file in swap_dir
    swap_dir: str | None = None  # where the disk tier's file lives (default: a temp folder)
    # FastSwitch block groups: hand out runs of this many neighbouring blocks (0: plain LRU).
    block_group_size: int = 8
    # Write evicted prefix-cache blocks back to the host tier (a victim buffer) so a later turn
    # of the same conversation swaps them in instead of recomputing.
    save_evicted_to_host: bool = True

    def __post_init__(self) -> None:
        for name in ("swap_space", "disk_swap_space", "kv_cache_memory"):
            if isinstance(getattr(self, name), str):
                setattr(self, name, parse_size(getattr(self, name)))
        if self.block_group_size < 0:
            raise ValueError(f"block_group_size must be >= 0, got {self.block_group_size}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be positive, got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be positive, got {self.num_blocks}")


def tier_block_counts(cache: CacheConfig, bytes_per_block: int) -> tuple[int, int]:
    """(host, disk) blocks: explicit counts win, else the byte budgets over one block's size."""
    def count(override: int | None, space: int) -> int:
        if override is not None:
            return override
        return space // bytes_per_block if bytes_per_block else 0

    return (count(cache.num_host_blocks, cache.swap_space),
            count(cache.num_disk_blocks, cache.disk_swap_space))


@dataclass(slots=True)
class SchedulerConfig:
    """The per-step token budget and the policy that orders requests."""

    # Token budget of one step (--max-num-batched-tokens); measured: docs/benchmarks.md "token budget".
    max_num_batched_tokens: int = 256
    max_num_seqs: int = 128  # most running at once; below the budget so prefills always get some
    policy: str = "sarathi"  # sarathi | fcfs | fcfs-prefill-first | fair (--scheduling-policy)
    max_waiting_requests: int | None = None
    preemption_mode: str = "auto"  # swap | recompute | auto (cheaper of the two, estimated)
    priority_update_interval: int = 1  # steps between fair-policy priority refreshes
    # Cost model for preemption_mode="auto"; defaults measured on a 2-core Zen 4 with SmolLM2.
    recompute_tokens_per_s: float = 1500.0
    swap_bytes_per_s: float = 4e9
    # While online requests are in flight, background (Batch API) prompt chunks take at most
    # this share of each step's token budget, so online decodes keep their step time
    # (tierserve serve sets it to --batch-share).
    background_token_share: float = 1.0

    def __post_init__(self) -> None:
        if not 0 < self.background_token_share <= 1:
            raise ValueError(f"background_token_share must be in (0, 1], got "
                             f"{self.background_token_share}")
        if self.preemption_mode not in ("swap", "recompute", "auto"):
            raise ValueError(
                f"preemption_mode must be swap, recompute or auto, got {self.preemption_mode!r}")
        if self.priority_update_interval < 1:
            raise ValueError("priority_update_interval must be at least 1")
        if self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be positive, got {self.max_num_batched_tokens}"
            )
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be positive, got {self.max_num_seqs}")


EXPERT_POLICIES = ("lru", "static", "lookahead", "expertflow", "oracle")


@dataclass(slots=True)
class ExpertConfig:
    """MoE expert offloading (issue 14). ``expert_cache`` None keeps every expert resident."""

    expert_cache: str | int | None = None  # experts ("120") or bytes ("64MiB") in fast slots
    expert_policy: str = "lru"  # lru | static | lookahead | expertflow | oracle
    expert_host_format: str = "none"  # none (disk only) | float | q8 | q4: the host tier
    expert_trace: str | None = None  # router trace (static, oracle)
    expert_predictor: str | None = None  # routing-path predictor (expertflow)
    expert_prefetch_depth: int = 2  # MoE layers ahead that predictive policies load
    expert_pin_fraction: float = 0.0  # expertflow: slots pinned to the trace's hot experts
    # No prefetch starts past this many loads in flight (0 or None: no limit); the default is
    # experts.books.PREFETCH_WINDOW (not imported: this module stays free of the engine's).
    expert_prefetch_window: int | None = 2
    # Host-memory buffer of experts evicted from the fast slots, in the model dtype (experts or
    # bytes, like expert_cache): a later miss copies them back instead of reading the disk or
    # dequantizing again (LSM-GNN's victim buffer; the KV tiers' save_evicted_to_host).
    expert_victim_buffer: str | int | None = None
    # A missed expert that at most this many of a forward's rows chose runs on the host tier's
    # weights instead of loading into a fast slot (Fiddler's cold experts on the CPU); 0: off.
    expert_host_compute: int = 0
    drop_page_cache: bool = True  # posix_fadvise(DONTNEED) the expert files at start

    def __post_init__(self) -> None:
        if self.expert_policy not in EXPERT_POLICIES:
            raise ValueError(f"expert_policy must be one of {', '.join(EXPERT_POLICIES)}, "
                             f"got {self.expert_policy!r}")
        if self.expert_host_format not in ("none", "float", "q8", "q4"):
            raise ValueError("expert_host_format must be none, float, q8 or q4, got "
                             f"{self.expert_host_format!r}")
        if self.expert_prefetch_depth < 0:
            raise ValueError("expert_prefetch_depth must be >= 0")
        if not 0.0 <= self.expert_pin_fraction < 1.0:
            raise ValueError(f"expert_pin_fraction must be in [0, 1), got {self.expert_pin_fraction}")
        if self.expert_prefetch_window is not None and self.expert_prefetch_window < 0:
            raise ValueError("expert_prefetch_window must be >= 0 (0: no limit)")
        if self.expert_host_compute < 0:
            raise ValueError("expert_host_compute must be >= 0 (0: off)")
        if self.expert_host_compute and self.expert_host_format == "none":
            raise ValueError("--expert-host-compute runs experts on the host tier's weights; "
                             "keep them in host memory with --expert-host-format float|q8|q4")

    def num_slots(self, expert_bytes: int) -> int | None:
        """Fast slots: a plain number is experts, a size (with a unit) is bytes."""
        return _experts(self.expert_cache, expert_bytes)

    def num_victim_slots(self, expert_bytes: int) -> int:
        """Victim-buffer slots (0: none), counted like ``num_slots``."""
        return _experts(self.expert_victim_buffer, expert_bytes) or 0


def _experts(value: str | int | None, expert_bytes: int) -> int | None:
    if value is None:
        return None
    value = str(value).strip()
    if value.isdigit():
        return int(value)
    return parse_size(value) // expert_bytes


KV_SELECTIONS = ("full", "streaming", "quest", "mpcache")
KV_EVICTIONS = ("none", "mpcache", "snapkv")


@dataclass(slots=True)
class SelectionConfig:
    """Long-context KV selection (issue 15): which cached blocks each decode attends to.

    ``kv_budget`` up to 1 is a share of the context's blocks, above 1 a number of tokens. Every
    policy keeps the first ``kv_sink_blocks`` and the last ``kv_recent_blocks`` blocks, and the
    first ``kv_dense_layers`` layers attend to everything (as MPCache's reference does).

    Static eviction (``kv_eviction``) runs once, right after a prompt's prefill: it keeps
    ``kv_eviction_budget`` of the prompt's tokens (a share up to 1, or tokens above 1) per layer
    and kv head, or with ``kv_eviction_threshold`` every token some window query gives that
    much attention (MPCache's rule); the rest leave the cache for good and their blocks are
    freed. ``mpcache`` scores with the last ``kv_eviction_window`` of the prompt's queries
    (half that beyond 24k tokens), averaged over heads, max over queries; ``snapkv`` with its
    last ``snapkv_window`` queries, summed per kv head and max-pooled.
    """

    kv_selection: str = "full"  # full | streaming | quest | mpcache (--kv-selection)
    kv_budget: float = 0.1  # (--kv-budget)
    kv_dense_layers: int = 2
    kv_sink_blocks: int = 1
    kv_recent_blocks: int = 1
    mpcache_alpha: float = 0.6  # a cluster's score: q . (a * kmax + (1 - a) * kmin)
    mpcache_level1_keep: float = 0.5  # share of 32-token clusters kept before the block level
    kv_eviction: str = "none"  # none | mpcache | snapkv (--kv-eviction)
    kv_eviction_budget: float = 0.5  # (--kv-eviction-budget)
    kv_eviction_threshold: float | None = None  # (--kv-eviction-threshold) instead of a budget
    kv_eviction_window: float = 0.2  # mpcache: share of the prompt's last queries that observe
    snapkv_window: int = 32
    snapkv_pool: int = 7

    def __post_init__(self) -> None:
        if self.kv_selection not in KV_SELECTIONS:
            raise ValueError(f"kv_selection must be one of {', '.join(KV_SELECTIONS)}, "
                             f"got {self.kv_selection!r}")
        if self.kv_budget <= 0:
            raise ValueError(f"kv_budget must be positive (a share up to 1, or tokens), got "
                             f"{self.kv_budget}")
        if self.kv_dense_layers < 0 or self.kv_sink_blocks < 0 or self.kv_recent_blocks < 1:
            raise ValueError("kv_dense_layers and kv_sink_blocks must be >= 0, "
                             "kv_recent_blocks >= 1 (the block being written is always read)")
        if not 0.0 <= self.mpcache_alpha <= 1.0 or not 0.0 < self.mpcache_level1_keep <= 1.0:
            raise ValueError("mpcache_alpha must be in [0, 1] and mpcache_level1_keep in (0, 1]")
        if self.kv_eviction not in KV_EVICTIONS:
            raise ValueError(f"kv_eviction must be one of {', '.join(KV_EVICTIONS)}, "
                             f"got {self.kv_eviction!r}")
        if self.kv_eviction_budget <= 0:
            raise ValueError("kv_eviction_budget must be positive (a share up to 1, or tokens), "
                             f"got {self.kv_eviction_budget}")
        if self.kv_eviction_threshold is not None and not 0 < self.kv_eviction_threshold < 1:
            raise ValueError("kv_eviction_threshold is an attention weight in (0, 1), got "
                             f"{self.kv_eviction_threshold}")
        if not 0 < self.kv_eviction_window <= 1 or self.snapkv_window < 1 or self.snapkv_pool < 1:
            raise ValueError("kv_eviction_window must be in (0, 1], snapkv_window and "
                             "snapkv_pool >= 1")


@dataclass(slots=True)
class EngineConfig:
    """Everything an engine needs, built once at the edge (CLI, server, LLM()) and passed down."""

    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    experts: ExpertConfig = field(default_factory=ExpertConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)

    @classmethod
    def from_kwargs(cls, **kwargs) -> EngineConfig:
        """Build from flat keyword arguments (field names of the sub-configs; sizes may be
        strings such as "2GiB"; ``scheduling_policy`` is an alias of ``policy``)."""
        if "scheduling_policy" in kwargs:
            kwargs["policy"] = kwargs.pop("scheduling_policy")
        parts = {}
        for name, part in (("model", ModelConfig), ("cache", CacheConfig),
                           ("scheduler", SchedulerConfig), ("experts", ExpertConfig),
                           ("selection", SelectionConfig)):
            names = set(part.__dataclass_fields__)
            parts[name] = part(**{k: kwargs.pop(k) for k in list(kwargs) if k in names})
        if kwargs:
            raise TypeError(f"unknown engine option(s): {', '.join(sorted(kwargs))}")
        return cls(**parts)
