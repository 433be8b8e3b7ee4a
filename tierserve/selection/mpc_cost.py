"""Communication cost model of one private decode step under MPC (`tierserve mpc-cost`): full attention vs MPCache.

MPCache's claim (3.39-8.37x less communication per decoded token) is about secure multi-party
inference, where nothing runs on plaintext and every comparison, exponent and gather is a protocol
with a price in bits sent and rounds waited. This module prices one decode step of a decoder-only
transformer operation by operation, once with dense attention over the whole cache and once with
MPCache (static eviction already done after prefill, then per step: cluster bounds, two levels of
top-k by bitonic sort, one-hot gathers, attention over the selected blocks, index sharing between
layer pairs), under two protocols:

- ``aby3``: 3-party replicated secret sharing, semi-honest, ring Z_2^64 with fixed point, the
  protocol SecretFlow SPU runs for the reference's 3PC numbers (Mohassel & Rindal, ABY3, CCS'18).
- ``2pc``: 2-party additive sharing, ABY's arithmetic and Boolean protocols (Demmler et al.,
  NDSS'15) with Beaver triples (CRYPTO'91) from preprocessing (online cost only).

Nonlinear functions use CrypTen's approximations (Knott et al., NeurIPS'21): exp by the limit
(1 + x/2^8)^(2^8) (8 squarings), reciprocal by 10 Newton iterations from a 3*exp(1-2x)+0.003
start. Everything runs per layer in sequence; heads and elements inside one operation run in
parallel, so their rounds do not add. Counts are exact for the model; the model is an estimate of
a real protocol stack (see `ASSUMPTIONS`).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass, field

# Written into every JSON and table so the figures always travel with what they assume.
ASSUMPTIONS = (
    "semi-honest security; online communication only (preprocessing such as triples and "
    "truncation pairs is not counted); ring of 64 bits; fixed-point truncation costs nothing "
    "beyond its multiplication (ABY3's truncation pairs); all heads of a layer batched into one "
    "protocol invocation; the number of kept tokens and blocks is public (MPCache's threat "
    "model); cluster bounds are updated incrementally, one cluster per step; the static eviction "
    "is done once after prefill and not counted in a decode step; weights are secret-shared, so "
    "every linear layer is a secret x secret product"
)


@dataclass
class Cost:
    """Bits sent in total by all parties, and sequential communication rounds."""

    bits: float = 0.0
    rounds: int = 0

    def __add__(self, other: Cost) -> Cost:  # sequential composition
        return Cost(self.bits + other.bits, self.rounds + other.rounds)

    def par(self, other: Cost) -> Cost:  # run side by side: bits add, rounds overlap
        return Cost(self.bits + other.bits, max(self.rounds, other.rounds))

    def times(self, n: float) -> Cost:  # n sequential repetitions
        return Cost(self.bits * n, int(self.rounds * n))


@dataclass(frozen=True)
class Protocol:
    """Per-element prices of the primitive protocols; everything else is built from these."""

    name: str
    parties: int
    ring_bits: int = 64

    # -- primitives -------------------------------------------------------------------------
    def mul(self, n: float) -> Cost:
        """n independent secret x secret products (fixed point, truncated)."""
        ell = self.ring_bits
        if self.name == "aby3":  # each party reshares one element (Araki et al. CCS'16; ABY3 s3)
            return Cost(3 * ell * n, 1)
        return Cost(4 * ell * n, 1)  # Beaver: each of 2 parties opens d = x - a and e = y - b

    def matmul(self, m: int, k: int, n: int, rows: int = 1, rhs_fresh: int | None = None) -> Cost:
        """`rows` independent (m x k) @ (k x n) products of secret matrices.

        `rhs_fresh` is how many right-operand elements are new this step (a cached key or value
        set gains one row a step); None means all k * n."""
        ell = self.ring_bits
        if self.name == "aby3":  # local inner products, one reshare per output (ABY3 s5.1)
            return Cost(3 * ell * m * n * rows, 1)
        # Beaver matrix triples: both parties open the masked left (m x k) and right (k x n)
        # operands; a cached right operand keeps its mask across steps, so only its new
        # elements are opened.
        right = k * n if rhs_fresh is None else rhs_fresh
        return Cost(2 * ell * (m * k + right) * rows, 1)

    def and_gates(self, n: float) -> Cost:
        """n binary AND gates in one round (bits; XOR is free)."""
        return Cost((3 if self.name == "aby3" else 4) * n, 1)

    def a2b(self, n: float, bits: int | None = None) -> Cost:
        """Bit decomposition of n arithmetic shares, the low `bits` bits (default all)."""
        ell = self.ring_bits
        bits = ell if bits is None else bits
        logb = max(1, math.ceil(math.log2(bits)))
        # Kogge-Stone prefix adder over `bits` bits: bits*log2(bits) ANDs in log2(bits) rounds.
        # ABY3 first reduces its three summands to two with a full adder (bits ANDs, 1 round).
        adder = Cost(self.and_gates(n * bits * logb).bits, logb)
        if self.name == "aby3":
            return self.and_gates(n * bits) + adder
        return adder

    def b2a(self, n: float) -> Cost:
        """Bit injection: n shared bits to arithmetic shares."""
        ell = self.ring_bits
        if self.name == "aby3":  # two reshares of one element each (ABY3 s5.4)
            return Cost(2 * 3 * ell * n, 2)
        return Cost(2 * ell * n, 1)  # a preprocessed random bit in both worlds, one opening

    def cmp(self, n: float) -> Cost:
        """n secret comparisons x < y (the sign bit of x - y), as arithmetic shares."""
        return self.a2b(n) + self.b2a(n)

    def onehot(self, rows: int, k: int, n: int) -> Cost:
        """One-hot rows for k secret indices in [0, n), per row: (rows * k) x n shared bits.

        Decompose each index once (log2 n bits), then per class an AND tree over the bits of
        index XOR class, and inject the result to arithmetic."""
        bits = max(1, math.ceil(math.log2(max(n, 2))))
        tree = Cost()
        width = bits
        while width > 1:
            tree = tree + self.and_gates(rows * k * n * (width // 2))
            width -= width // 2
        return self.a2b(rows * k, bits) + tree + self.b2a(rows * k * n)

    # -- compositions -----------------------------------------------------------------------
    def mux(self, n: float) -> Cost:
        """n oblivious selections b ? x : y = y + b*(x - y)."""
        return self.mul(n)

    def max(self, rows: int, n: int) -> Cost:
        """Row-wise maximum of `rows` vectors of length n, by a tree of comparisons."""
        cost, width = Cost(), n
        while width > 1:
            pairs = width // 2
            cost = cost + self.cmp(rows * pairs) + self.mux(rows * pairs)
            width -= pairs
        return cost

    def exp(self, n: float) -> Cost:
        return self.mul(n).times(8)  # CrypTen: (1 + x / 2^8) ^ (2^8), 8 squarings

    def reciprocal(self, n: float) -> Cost:
        return self.exp(n) + self.mul(n).times(2 * 10)  # CrypTen: exp start, 10 Newton steps

    def softmax(self, rows: int, n: int) -> Cost:
        """Softmax over `rows` vectors of length n: max, exp, sum (free), reciprocal, scale."""
        return (self.max(rows, n) + self.exp(rows * n) + self.reciprocal(rows)
                + self.mul(rows * n))

    def rsqrt(self, n: float) -> Cost:
        # CrypTen's inverse square root: an exp-based start, 3 Newton steps of 3 products each
        return self.exp(n) + self.mul(n).times(3 * 3)

    def silu(self, n: float) -> Cost:
        return self.exp(n) + self.reciprocal(n) + self.mul(n)  # x * 1 / (1 + exp(-x))

    def sort_topk(self, rows: int, n: int, carry_index: bool = True) -> Cost:
        """Top-k of `rows` vectors of length n by a full bitonic sort (Batcher 1968).

        n pads to a power of two N = 2^m: m(m+1)/2 stages of N/2 compare-exchanges, each one
        comparison and one product per swapped column (the score, and its index)."""
        if n <= 1:
            return Cost()
        m = math.ceil(math.log2(n))
        half = (1 << m) // 2
        stage = self.cmp(rows * half) + self.mux(rows * half * (2 if carry_index else 1))
        return stage.times(m * (m + 1) // 2)

    def gather(self, rows: int, k: int, n: int, width: int, onehot: bool = True) -> Cost:
        """Pick k of n secret-indexed items of `width` elements, per row: one-hot, then a product."""
        cost = self.onehot(rows, k, n) if onehot else Cost()
        return cost + self.matmul(k, n, width, rows=rows)


@dataclass(frozen=True)
class ModelShape:
    name: str
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    ffn: int

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim


SHAPES = {
    # the paper's efficiency experiments use LLaMA-2-7B-shaped models
    "llama2-7b": ModelShape("llama2-7b", 32, 32, 32, 128, 4096, 11008),
    "gpt2": ModelShape("gpt2", 12, 12, 12, 64, 768, 3072),
    "smollm2-135m": ModelShape("smollm2-135m", 30, 9, 3, 64, 576, 1536),
}


@dataclass(frozen=True)
class MPCacheSetting:
    static_keep: float = 0.5  # share of the prompt left by the static eviction
    budget: float = 0.1  # share of the prompt each decode step attends to
    level1_cluster: int = 32
    level1_keep: float = 0.5
    block: int = 16
    dense_layers: int = 2
    share_pairs: bool = True
    gather_kv: bool = False  # gather key/value rows (the reference) instead of scores


@dataclass
class StepCost:
    """One decode step's cost, split by part, summed over layers."""

    parts: dict[str, Cost] = field(default_factory=dict)

    def add(self, part: str, cost: Cost) -> None:
        self.parts[part] = self.parts.get(part, Cost()) + cost

    @property
    def total(self) -> Cost:
        total = Cost()
        for cost in self.parts.values():
            total = total + cost
        return total

    def attention(self) -> Cost:
        total = Cost()
        for part, cost in self.parts.items():
            if part not in ("linear", "ffn activation", "norm"):
                total = total + cost
        return total


def _dense_attention(p: Protocol, shape: ModelShape, tokens: int) -> dict[str, Cost]:
    """Attention of one new query per head over `tokens` cached keys and values."""
    d, h = shape.head_dim, shape.heads
    return {"qk": p.matmul(1, d, tokens, rows=h, rhs_fresh=d),
            "softmax": p.softmax(h, tokens),
            "pv": p.matmul(1, tokens, d, rows=h, rhs_fresh=d)}


def _rest_of_layer(p: Protocol, shape: ModelShape) -> dict[str, Cost]:
    """Everything in a layer except attention: projections, FFN, norms, for one token."""
    hid, ffn = shape.hidden, shape.ffn
    # weights keep their masks across steps (2PC opens only the activations)
    qkv = p.matmul(1, hid, shape.q_width + 2 * shape.kv_width, rhs_fresh=0)
    out = p.matmul(1, shape.q_width, hid, rhs_fresh=0)
    gate_up = p.matmul(1, hid, 2 * ffn, rhs_fresh=0)
    down = p.matmul(1, ffn, hid, rhs_fresh=0)
    norm = (p.mul(hid) + p.rsqrt(1) + p.mul(hid)).times(2)  # two RMSNorms: squares, rsqrt, scale
    return {"linear": qkv + out + gate_up + down,
            "ffn activation": p.silu(ffn) + p.mul(ffn),
            "norm": norm}


def full_step(p: Protocol, shape: ModelShape, context: int) -> StepCost:
    step = StepCost()
    for _ in range(shape.layers):
        for part, cost in {**_rest_of_layer(p, shape), **_dense_attention(p, shape, context)}.items():
            step.add(part, cost)
    return step


def mpcache_step(p: Protocol, shape: ModelShape, context: int, s: MPCacheSetting) -> StepCost:
    """A decode step after MPCache's static eviction, with its dynamic selection.

    Per scoring layer: the newest key enters its block's and cluster's bounds; every cluster and
    block gets its bound score (products, cheap); a bitonic sort keeps `level1_keep` of the
    clusters; the kept clusters' block scores are gathered by one-hot and sorted again to the
    budget. Attention then runs over the picked blocks. With ``gather_kv`` the picked blocks'
    keys and values are gathered by a one-hot product, as the reference's SPU code does; without
    it the one-hot gathers the query's scores (q . K over the cache is a product, cheap) and
    scatters the probabilities back, so only the softmax shrinks to the selection and no key or
    value row is moved. A layer that shares its pair's selection reuses its one-hot."""
    d, h = shape.head_dim, shape.heads
    cached = max(1, round(context * s.static_keep))
    blocks = math.ceil(cached / s.block)
    per_cluster = s.level1_cluster // s.block
    clusters = math.ceil(cached / s.level1_cluster)
    kept_clusters = max(1, math.ceil(clusters * s.level1_keep))
    candidate_blocks = min(blocks, kept_clusters * per_cluster)
    selected = min(blocks, max(2, math.ceil(context * s.budget / s.block)))  # sink + recent at least
    attended = selected * s.block
    step = StepCost()
    for layer in range(shape.layers):
        for part, cost in _rest_of_layer(p, shape).items():
            step.add(part, cost)
        if layer < s.dense_layers or selected >= blocks:
            for part, cost in _dense_attention(p, shape, cached).items():
                step.add(part, cost)
            continue
        scores_here = not s.share_pairs or (layer - s.dense_layers) % 2 == 0
        if scores_here:
            step.add("selection: bounds", (p.cmp(h * d * 2) + p.mux(h * d * 2)).times(2))
            step.add("selection: scores", p.matmul(1, d, clusters + blocks, rows=h, rhs_fresh=2 * d))
            step.add("selection: top-k", p.sort_topk(h, clusters))
            step.add("selection: gather", p.gather(h, kept_clusters, clusters, per_cluster))
            step.add("selection: top-k", p.sort_topk(h, candidate_blocks))
            step.add("selection: one-hot", p.onehot(h, selected, blocks))
        if s.gather_kv:
            step.add("gather kv", p.matmul(selected, blocks, s.block * d * 2, rows=h))
            step.add("qk", p.matmul(1, d, attended, rows=h))
            step.add("softmax", p.softmax(h, attended))
            step.add("pv", p.matmul(1, attended, d, rows=h))
        else:
            step.add("qk", p.matmul(1, d, cached, rows=h, rhs_fresh=d))
            step.add("gather scores", p.matmul(selected, blocks, s.block, rows=h))
            step.add("softmax", p.softmax(h, attended))
            step.add("gather scores", p.matmul(blocks, selected, s.block, rows=h))  # scatter back
            step.add("pv", p.matmul(1, cached, d, rows=h, rhs_fresh=d))
    return step


def compare(protocol: str, shape: ModelShape, contexts: list[int],
            setting: MPCacheSetting) -> list[dict]:
    p = Protocol(protocol, parties=3 if protocol == "aby3" else 2)
    rows = []
    for context in contexts:
        full = full_step(p, shape, context)
        mp = mpcache_step(p, shape, context, setting)
        rows.append({
            "protocol": protocol, "model": shape.name, "context": context,
            "full_gb": full.total.bits / 8e9, "mpcache_gb": mp.total.bits / 8e9,
            "reduction": full.total.bits / mp.total.bits,
            "attention_reduction": full.attention().bits / mp.attention().bits,
            "full_rounds": full.total.rounds, "mpcache_rounds": mp.total.rounds,
            "full_parts_gb": {k: v.bits / 8e9 for k, v in full.parts.items()},
            "mpcache_parts_gb": {k: v.bits / 8e9 for k, v in mp.parts.items()},
        })
    return rows


# The paper's headline (abstract): communication reduction over its sequence lengths.
PAPER_REDUCTION = (3.39, 8.37)


def add_mpc_cost_parser(sub) -> None:
    cmd = sub.add_parser(
        "mpc-cost", help="communication of one private (MPC) decode step: full attention vs MPCache",
        description="Count the bits sent and rounds of one decode step of a transformer run under "
        "secure multi-party computation, operation by operation (products, comparisons, max, "
        "softmax by exp and reciprocal approximations, top-k by bitonic sort, one-hot gathers), "
        "with dense attention and with MPCache's selection. Protocols: aby3 (3-party replicated "
        "sharing, as SecretFlow SPU runs the reference) and 2pc (ABY's protocols with "
        "preprocessed Beaver triples). Assumptions: " + ASSUMPTIONS + ".")
    cmd.add_argument("--model", choices=sorted(SHAPES), default="llama2-7b",
                     help="model shape (default: %(default)s)")
    cmd.add_argument("--protocol", choices=("aby3", "2pc", "both"), default="both",
                     help="protocol (default: %(default)s)")
    cmd.add_argument("--contexts", default="512,1024,2048,4096,8192,16384",
                     help="cached tokens before the step, comma separated (default: %(default)s)")
    cmd.add_argument("--static-keep", type=float, default=MPCacheSetting.static_keep,
                     help="share of the prompt the static eviction keeps (default: %(default)s)")
    cmd.add_argument("--budget", type=float, default=MPCacheSetting.budget,
                     help="share of the prompt a step attends to (default: %(default)s)")
    cmd.add_argument("--no-sharing", action="store_true",
                     help="every layer selects its own blocks (no layer-pair index sharing)")
    cmd.add_argument("--gather-kv", action="store_true",
                     help="gather the picked blocks' key and value rows by one-hot products, as "
                     "the reference's SPU code does, instead of gathering scores")
    cmd.add_argument("--json", default=None, help="write every row, with parts, to this file")
    cmd.set_defaults(func=cmd_mpc_cost)


def cmd_mpc_cost(args: argparse.Namespace) -> int:
    contexts = [int(c) for c in args.contexts.split(",")]
    if any(c < 16 for c in contexts):
        raise ValueError("--contexts must be at least 16 tokens")
    if not (0 < args.budget <= args.static_keep <= 1):
        raise ValueError("need 0 < --budget <= --static-keep <= 1")
    setting = MPCacheSetting(static_keep=args.static_keep, budget=args.budget,
                             share_pairs=not args.no_sharing, gather_kv=args.gather_kv)
    protocols = ("aby3", "2pc") if args.protocol == "both" else (args.protocol,)
    rows = [row for proto in protocols
            for row in compare(proto, SHAPES[args.model], contexts, setting)]
    print(f"one decode step of {args.model}; MPCache static keep {setting.static_keep}, "
          f"budget {setting.budget}, pair sharing {'on' if setting.share_pairs else 'off'}, "
          f"gather {'kv rows' if setting.gather_kv else 'scores'}")
    print(f"{'protocol':8s} {'context':>7s} {'full GB':>9s} {'MPCache GB':>10s} {'reduction':>9s} "
          f"{'attention':>9s} {'rounds full/MPCache':>20s}")
    for r in rows:
        print(f"{r['protocol']:8s} {r['context']:7d} {r['full_gb']:9.3f} {r['mpcache_gb']:10.3f} "
              f"{r['reduction']:8.2f}x {r['attention_reduction']:8.2f}x "
              f"{r['full_rounds']:>10d}/{r['mpcache_rounds']:<9d}")
    print(f"paper (3PC, SecretFlow SPU): {PAPER_REDUCTION[0]}-{PAPER_REDUCTION[1]}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"setting": asdict(setting), "assumptions": ASSUMPTIONS,
                       "paper_reduction": PAPER_REDUCTION, "rows": rows}, f, indent=2)
    return 0
