"""``tierserve bench roofline``: this machine's limits, and where one decode step's time goes.

It measures memory bandwidth (copy and read of a tensor far larger than the caches) and matmul
FLOP/s in float32 and bfloat16, derives the two roofline bounds for decode (batch 1: every
weight byte is read once per token, so tokens/s <= bandwidth / weight bytes; large batch:
tokens/s <= FLOP/s / FLOPs per token), then times decode steps of the real engine at each batch
size with every stage timed (linear layers, attention with its KV write, logits, sampling,
input preparation, the rest) and states tierserve's fraction of the bound.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable

import torch

from tierserve.request import SamplingParams
from tierserve.sched.plan import ScheduledChunk, StepPlan

STAGES = ("linear", "attention", "logits", "sample", "prepare", "other")


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return sorted(samples)[len(samples) // 2]


def measure_machine(megabytes: int = 512, matmul_size: int = 2048, repeats: int = 5) -> dict:
    """Memory bandwidth (GB/s) and matmul GFLOP/s as torch reaches them on this machine."""
    numel = megabytes * 2**20 // 4
    source = torch.rand(numel)  # touched: untouched pages would all read the zero page
    target = torch.empty_like(source).fill_(0.0)
    copy_s = _median_seconds(lambda: target.copy_(source), repeats)
    read_s = _median_seconds(lambda: source.sum(), repeats)
    result = {
        "copy_gb_per_s": 2 * numel * 4 / copy_s / 1e9,  # read + write
        "read_gb_per_s": numel * 4 / read_s / 1e9,
    }
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(matmul_size, matmul_size).to(dtype)
        b = torch.randn(matmul_size, matmul_size).to(dtype)
        seconds = _median_seconds(lambda a=a, b=b: torch.mm(a, b), repeats)
        result[f"matmul_gflop_per_s_{str(dtype).split('.')[-1]}"] = (
            2 * matmul_size**3 / seconds / 1e9)
    return result


def model_costs(model, context: int) -> dict:
    """Bytes of weights a decode step reads, and FLOPs per token at this context length."""
    arch = model.arch
    elem = torch.empty((), dtype=model.dtype).element_size()
    weights = [linear.weight for linear in model.linears()]
    params = sum(weight.numel() for weight in weights)
    # Resident bytes: packed weights (--quantization) count their packed blocks.
    weight_bytes = sum(weight.nbytes for weight in weights)
    # Per layer, per token: q.k and p.v over the context, for every query head.
    attention_flops = arch.num_layers * 4 * context * arch.num_heads * arch.head_dim
    kv_bytes = arch.num_layers * 2 * context * arch.num_kv_heads * arch.head_dim * elem
    return {
        "weight_bytes": weight_bytes,
        "kv_bytes_per_token": kv_bytes,
        "flops_per_token": 2 * params + attention_flops,
    }


class StageTimer:
    """Wraps the runner's stages with wall-clock timers (a microsecond or two a call). Times are
    exclusive: the lm_head's GEMM, called inside compute_logits, counts as ``linear``, and
    ``logits`` keeps only the rest of it (the cast to float32)."""

    def __init__(self, runner) -> None:
        from tierserve.model import llama

        self.totals: dict[str, float] = defaultdict(float)
        self._stack: list[list[float]] = []  # [start, time spent in nested stages]
        self._undo: list[Callable[[], None]] = []
        model = runner.model
        self._wrap(llama.Linear, "__call__", "linear", on_class=True)
        self._wrap(model.attention, "forward", "attention")
        self._wrap(model, "compute_logits", "logits")
        self._wrap(runner.sampler, "sample", "sample")
        self._wrap(runner, "_prepare", "prepare")

    def _wrap(self, owner, name: str, stage: str, on_class: bool = False) -> None:
        original = getattr(owner, name)
        stack, totals = self._stack, self.totals

        def timed(*args, **kwargs):
            stack.append([time.perf_counter(), 0.0])
            try:
                return original(*args, **kwargs)
            finally:
                started, nested = stack.pop()
                elapsed = time.perf_counter() - started
                totals[stage] += elapsed - nested
                if stack:
                    stack[-1][1] += elapsed

        setattr(owner, name, timed)
        self._undo.append((lambda: setattr(owner, name, original)) if on_class
                          else (lambda: delattr(owner, name)))

    def close(self) -> None:
        for undo in reversed(self._undo):
            undo()

    def breakdown(self, total: float, steps: int) -> dict[str, float]:
        """Seconds per step by stage; ``other`` is what no stage covers (norms, rotary, MLP
        activation, residual adds, embedding, Python glue)."""
        stages = {name: self.totals.get(name, 0.0) for name in STAGES[:-1]}
        stages["other"] = max(0.0, total - sum(stages.values()))
        return {name: seconds / steps for name, seconds in stages.items()}


def time_decode(llm, batch: int, context: int, steps: int) -> dict:
    """Seconds per decode step of ``batch`` sequences at ``context`` tokens, by stage."""
    runner, pool = llm.engine.runner, llm.core.kv.pool
    blocks = -(-(context + 1) // runner.block_size)
    tables = [pool.allocate(blocks) for _ in range(batch)]
    params = SamplingParams(temperature=0.0)
    try:
        rows = [ScheduledChunk(f"d{i}", [5], context, tables[i], True, params, [5] * context, [])
                for i in range(batch)]
        plan = StepPlan(chunks=rows)
        for _ in range(2):
            runner.execute(plan)
        timer = StageTimer(runner)
        try:
            started = time.perf_counter()
            for _ in range(steps):
                runner.execute(plan)
            total = time.perf_counter() - started
        finally:
            timer.close()
        stages = timer.breakdown(total, steps)
        return {"step_s": total / steps, "tokens_per_s": batch * steps / total,
                **{f"{name}_s": seconds for name, seconds in stages.items()}}
    finally:
        for table in tables:
            pool.release(table)


def roofline(machine: dict, costs: dict, dtype: str) -> dict:
    """Decode bounds: batch 1 by bandwidth (weights + this token's KV read once), large batch by
    compute (the dtype's measured matmul rate)."""
    bandwidth = machine["read_gb_per_s"] * 1e9
    flops = machine[f"matmul_gflop_per_s_{dtype}"] * 1e9
    return {
        "batch1_tokens_per_s": bandwidth / (costs["weight_bytes"] + costs["kv_bytes_per_token"]),
        "compute_tokens_per_s": flops / costs["flops_per_token"],
    }


def run_roofline(args) -> tuple[dict, dict, dict]:
    """Machine limits, model costs and per-batch-size decode breakdowns for ``args``."""
    from tierserve.bench.cli import _engine_config
    from tierserve.bench.harness import close_engine, open_engine

    machine = measure_machine(args.probe_megabytes, args.probe_matmul_size)
    config = _engine_config(args)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    blocks_needed = max(batches) * (-(-(args.context + 1) // config.cache.block_size))
    if config.cache.num_blocks is None:
        config.cache.num_blocks = blocks_needed + 8
    llm = open_engine(config, warmup=False)
    try:
        model = llm.engine.runner.model
        dtype = str(model.dtype).split(".")[-1]
        costs = model_costs(model, args.context)
        bounds = roofline(machine, costs, dtype if dtype in ("float32", "bfloat16") else "float32")
        results = {}
        for batch in batches:
            row = time_decode(llm, batch, args.context, args.steps)
            bound = bounds["batch1_tokens_per_s"] if batch == 1 else bounds["compute_tokens_per_s"]
            row["bound_tokens_per_s"] = bound
            row["fraction_of_bound"] = row["tokens_per_s"] / bound
            results[f"batch {batch}"] = row
        return machine, {"dtype": dtype, "context": args.context, **costs, **bounds}, results
    finally:
        close_engine(llm)


def plot_breakdown(results: dict[str, dict], path) -> None:
    """Stacked bars: milliseconds per decode step by stage, one bar per batch size."""
    from tierserve.bench.report import _pyplot, _save

    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(max(4.0, 1.6 * len(results) + 2.5), 4.0))
    names = list(results)
    bottom = [0.0] * len(names)
    for index, stage in enumerate(STAGES):
        values = [results[name][f"{stage}_s"] * 1e3 for name in names]
        axis.bar(names, values, bottom=bottom, label=stage, color=f"C{index}")
        bottom = [b + v for b, v in zip(bottom, values)]
    axis.set_ylabel("ms per decode step")
    axis.legend(fontsize="small")
    axis.set_title("Where a decode step's time goes")
    _save(figure, path)
    plt.close(figure)


def add_roofline_subcommand(sub, add_common) -> None:
    parser = sub.add_parser(
        "roofline", help="machine bandwidth and FLOP/s, decode roofline, per-stage breakdown",
        description=__doc__.split("\n\n")[1].replace("\n", " "))
    add_common(parser, plot_help="stacked ms per decode step by stage, per batch size")
    parser.add_argument("--batch-sizes", default="1,64",
                        help="decode batch sizes to time (default: %(default)s)")
    parser.add_argument("--context", type=int, default=256,
                        help="tokens of context of every sequence (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=10,
                        help="decode steps timed per batch size (default: %(default)s)")
    parser.add_argument("--probe-megabytes", type=int, default=512,
                        help="size of the buffer the bandwidth probe reads (default: "
                        "%(default)s)")
    parser.add_argument("--probe-matmul-size", type=int, default=2048,
                        help="N of the N x N matmuls the FLOP/s probe times (default: "
                        "%(default)s)")
    parser.set_defaults(func=cmd_roofline)


def cmd_roofline(args) -> int:
    from tierserve.bench.cli import _finish

    machine, model, results = run_roofline(args)
    print(f"memory: copy {machine['copy_gb_per_s']:.1f} GB/s, read "
          f"{machine['read_gb_per_s']:.1f} GB/s; matmul float32 "
          f"{machine['matmul_gflop_per_s_float32']:.0f} GFLOP/s, bfloat16 "
          f"{machine['matmul_gflop_per_s_bfloat16']:.0f} GFLOP/s")
    print(f"model ({model['dtype']}): {model['weight_bytes'] / 1e6:.0f} MB of weights a step, "
          f"{model['flops_per_token'] / 1e6:.0f} MFLOP a token at {model['context']} context; "
          f"bounds: batch 1 {model['batch1_tokens_per_s']:.0f} tokens/s (bandwidth), large "
          f"batch {model['compute_tokens_per_s']:.0f} tokens/s (compute)")
    columns = ["tokens_per_s", "bound_tokens_per_s", "fraction_of_bound", "step_s",
               *[f"{stage}_s" for stage in STAGES]]
    _finish(args, {"batch_sizes": args.batch_sizes, "context": args.context,
                   "steps": args.steps}, results, columns,
            extra={"machine_limits": machine, "model": model}, dtype=model["dtype"])
    if args.plot:
        plot_breakdown(results, args.plot)
        print(f"wrote {args.plot}")
    return 0
