"""Fault-injection benchmark (``tierserve bench faults``): the engine's isolation, measured.

One seeded workload runs twice on one engine: clean, then with faults of every kind the engine
isolates injected at seeded points. Request faults (fraction ``--fault-rate`` of the requests,
each at a random output token): a logits processor that raises, a logits row of NaN before
the sampler, a detokenizer that raises. Step faults: a forward that raises (each step with
chance ``--step-failure-rate``), a swap-out copy that fails (chance ``--copy-failure-rate`` each).

Counted: requests failed by their own fault, failed with a step or copy that failed under them,
failed for no injected reason (must be 0), and finished with tokens different from the clean run
(must be 0); KV blocks still held afterwards in any tier (must be 0); and whether the engine then
serves a request. Greedy decoding in float32, so "the tokens they would have had" is exact.
"""

from __future__ import annotations

import random
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

from tierserve.bench.workloads import WorkloadSpec, describe, make_workload
from tierserve.config import EngineConfig

REQUEST_FAULTS = ("logits_processor", "nan_logits", "detokenizer")
# What the client of a request hit by each fault is told (the engine's words, not ours).
FAULT_MESSAGES = {"logits_processor": "logits processor raised",
                  "nan_logits": "non-finite logits", "detokenizer": "processing its output"}
FAULTS_COLUMNS = ("requests", "faults_injected", "failed_own_fault", "failed_with_step",
                  "failed_unexplained", "finished_identical", "finished_different",
                  "blocks_leaked", "serves_after")


class InjectedFault(RuntimeError):
    """Raised by an injector (so no real bug is mistaken for one)."""


@dataclass(slots=True)
class FaultSpec:
    """The workload, how often each kind of fault strikes, and the seed that places them."""

    workload: WorkloadSpec = field(default_factory=lambda: WorkloadSpec(
        name="random", num_requests=64, input_len=64, output_len=24))
    fault_rate: float = 0.15
    step_failure_rate: float = 0.02
    copy_failure_rate: float = 0.2
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("fault_rate", "step_failure_rate", "copy_failure_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"--{name.replace('_', '-')} is a probability in [0, 1]")


@dataclass(slots=True)
class FaultResult:
    """What ``run_faults`` found: the run's configuration, one row of counts, sample errors."""

    config: dict
    results: dict[str, dict]
    failures: list[str]  # a sample of the error messages requests got


def run_faults(config: EngineConfig, spec: FaultSpec, progress: bool = True) -> FaultResult:
    """Clean run, faulty run, comparison; see the module docstring."""
    from tierserve.bench.harness import token_space
    from tierserve.engine.llm import LLM
    from tierserve.request import SamplingParams

    llm = LLM(config=config)
    requests = make_workload(spec.workload, token_space(llm), encode=llm.tokenizer.encode)
    prompts = [r.prompt_token_ids for r in requests]

    def params() -> list[SamplingParams]:
        return [SamplingParams(temperature=0.0, max_tokens=r.max_tokens, ignore_eos=True)
                for r in requests]

    clean = llm.generate(prompts, params(), use_tqdm=progress)
    rng = random.Random(spec.seed)
    plan = _plan_request_faults(requests, spec.fault_rate, rng)
    injector = _Injector(llm, plan, prompts, spec)
    faulty_params = params()
    for index, (kind, at) in plan.items():
        if kind == "logits_processor":
            faulty_params[index].logits_processors = [injector.raising_processor(at)]
    with injector.installed():
        faulty = llm.generate(prompts, faulty_params, use_tqdm=progress)
    row = _classify(clean, faulty, plan, injector, len(requests))
    row["blocks_leaked"] = _blocks_held(llm)
    after = llm.generate([prompts[0]], params()[:1], use_tqdm=False)[0]
    row["serves_after"] = (after.error is None
                           and after.outputs[0].token_ids == clean[0].outputs[0].token_ids)
    row["step_failures"] = llm.core.num_step_failures
    row["fatal_error"] = llm.core.fatal_error
    document = {"workload": asdict(spec.workload), "requests": describe(requests),
                "fault_rate": spec.fault_rate, "step_failure_rate": spec.step_failure_rate,
                "copy_failure_rate": spec.copy_failure_rate, "seed": spec.seed,
                "engine": asdict(config)}
    failures = sorted({o.error for o in faulty if o.error})[:8]
    return FaultResult(document, {"faults": row}, failures)


def _plan_request_faults(requests, rate: float, rng: random.Random) -> dict[int, tuple[str, int]]:
    """request index -> (fault kind, output token count at which it strikes). The kinds take
    turns, so every kind is planned once three requests are."""
    plan = {}
    for index, request in enumerate(requests):
        if rng.random() < rate:
            kind = REQUEST_FAULTS[len(plan) % len(REQUEST_FAULTS)]
            plan[index] = (kind, rng.randrange(request.max_tokens))  # 0: before its first
    return plan


class _Injector:
    """Wraps the engine's parts (instance attributes and one method, restored afterwards) to
    inject the planned faults, and records which requests each step or copy fault hit."""

    def __init__(self, llm, plan, prompts, spec: FaultSpec) -> None:
        self.llm, self.spec = llm, spec
        # One stream per thread that draws (engine thread: steps; swap worker: copies), so a
        # seed gives the same faults at the same points. Request faults are keyed by prompt
        # (the random workloads repeat none).
        self.step_rng = random.Random(spec.seed + 1)
        self.copy_rng = random.Random(spec.seed + 2)

        def strikes(kind: str) -> dict[tuple[int, ...], int]:  # prompt -> output token count
            return {tuple(prompts[i]): at for i, (k, at) in plan.items() if k == kind}

        self.nan_at, self.detok_at = strikes("nan_logits"), strikes("detokenizer")
        self.counts: Counter[str] = Counter()  # faults that fired, by kind

    def raising_processor(self, count: int):
        def processor(output_ids, logits):
            if len(output_ids) == count:
                self.counts["logits_processor"] += 1
                raise InjectedFault(f"injected: logits processor raised at token {count}")
            return logits

        return processor

    @contextmanager
    def installed(self):
        from tierserve.engine.output import OutputProcessor

        runner = self.llm.engine.runner
        injector = self
        real_forward, real_sample = runner._forward, runner.sampler.sample
        real_apply = OutputProcessor._apply
        swapper = runner.swapper
        real_copy = swapper._execute if swapper is not None else None

        def forward(step_plan):  # after the plan's copies started, as a real failure would
            if injector.step_rng.random() < injector.spec.step_failure_rate:
                injector.counts["forward"] += 1
                raise InjectedFault("injected: the forward failed")
            return real_forward(step_plan)

        def sample(logits, rows):
            for index, row in enumerate(rows):
                if injector.nan_at.get(tuple(row.prompt_token_ids)) == len(row.output_token_ids):
                    injector.counts["nan_logits"] += 1
                    logits = logits.clone()
                    logits[index] = float("nan")
            return real_sample(logits, rows)

        def apply(processor, parent, completion, update):
            at = injector.detok_at.get(tuple(parent.prompt_token_ids))
            if at is not None and len(completion.token_ids) == at:
                injector.counts["detokenizer"] += 1
                raise InjectedFault(f"injected: detokenizer raised at token {at}")
            return real_apply(processor, parent, completion, update)

        def copy(job):
            if job.key.startswith("out-") and \
                    injector.copy_rng.random() < injector.spec.copy_failure_rate:
                injector.counts["swap_copy"] += 1
                raise InjectedFault("injected: swap-out copy failed")
            return real_copy(job)

        runner._forward = forward
        runner.sampler.sample = sample
        OutputProcessor._apply = apply
        if swapper is not None:
            swapper._execute = copy
        try:
            yield self
        finally:
            del runner._forward
            del runner.sampler.sample
            OutputProcessor._apply = real_apply
            if swapper is not None:
                del swapper._execute


def _classify(clean, faulty, plan, injector: _Injector, count: int) -> dict:
    """Each request by outcome. A failure is explained by the error its client got: a step or
    a copy that failed under it, or the fault planned for it."""
    row = Counter()
    for index, (before, after) in enumerate(zip(clean, faulty)):
        if after.error:
            if "the forward failed" in after.error or "between memory tiers" in after.error:
                row["failed_with_step"] += 1
            elif index in plan and FAULT_MESSAGES[plan[index][0]] in after.error:
                row["failed_own_fault"] += 1
            else:
                row["failed_unexplained"] += 1
        elif after.outputs[0].token_ids == before.outputs[0].token_ids:
            row["finished_identical"] += 1
        else:
            row["finished_different"] += 1
    counts = injector.counts
    kinds = (*REQUEST_FAULTS, "forward", "swap_copy")
    return {"requests": count, "faults_injected": sum(counts[k] for k in kinds),
            **{f"injected_{k}": counts[k] for k in kinds},
            **{k: row[k] for k in ("failed_own_fault", "failed_with_step", "failed_unexplained",
                                   "finished_identical", "finished_different")}}


def _blocks_held(llm) -> int:
    kv = llm.core.kv
    kv.check_invariants()
    held = kv.pool.num_used + sum(store.pool.num_used for store in kv.lower)
    return held + len(kv.owners())


def plot_outcomes(row: dict, path, title: str) -> None:
    """Two panels: the faults that fired, by kind; the requests, by outcome (the last two
    bars, and the blocks left held, must be 0)."""
    from tierserve.bench.report import _pyplot, _save, _suptitle

    plt = _pyplot()
    figure, (faults, outcomes) = plt.subplots(1, 2, figsize=(11, 3.8),
                                              gridspec_kw={"width_ratios": [5, 6]})
    kinds = [*REQUEST_FAULTS, "forward", "swap_copy"]
    bars = faults.bar([k.replace("_", "\n") for k in kinds],
                      [row[f"injected_{k}"] for k in kinds], color="C1")
    faults.bar_label(bars)
    faults.set_title("faults that fired", fontsize="medium")
    names = ["finished_identical", "failed_own_fault", "failed_with_step",
             "failed_unexplained", "finished_different"]
    bars = outcomes.bar([n.replace("_", "\n") for n in names], [row[n] for n in names],
                        color=["C2", "C1", "C3", "k", "k"])
    outcomes.bar_label(bars)
    outcomes.set_title(f"requests by outcome; KV blocks left held: {row['blocks_leaked']}",
                       fontsize="medium")
    for axis in (faults, outcomes):
        axis.tick_params(axis="x", labelsize="small")
    _suptitle(figure, title)
    _save(figure, path)
    plt.close(figure)


def add_faults_subcommand(sub, add_common) -> None:
    """Add ``faults`` to the bench subcommands."""
    faults = sub.add_parser(
        "faults", help="inject every kind of fault; count who failed and what leaked",
        description=__doc__.split("\n\n", 1)[1].replace("``", "'"))
    add_common(faults, plot_help="requests by outcome")
    faults.add_argument("--fault-rate", type=float, default=0.15,
                        help="fraction of requests given a fault of their own (default: "
                        "%(default)s)")
    faults.add_argument("--step-failure-rate", type=float, default=0.02,
                        help="chance that a step's forward raises (default: %(default)s)")
    faults.add_argument("--copy-failure-rate", type=float, default=0.2,
                        help="chance that a swap-out copy fails (default: %(default)s)")
    # A pool too small for the whole batch, swap preemption: copies happen (and can fail).
    faults.set_defaults(func=cmd_faults, workload="random", num_requests=64, input_len=64,
                        output_len=24, dtype="float32", num_blocks=96, preemption_mode="swap")


def cmd_faults(args) -> int:
    """Run the benchmark; exit 1 if a failure is unexplained, tokens changed or blocks leaked."""
    from tierserve.bench.cli import _engine_config, _finish, _workload_spec

    spec = FaultSpec(workload=_workload_spec(args, args.num_requests or 64),
                     fault_rate=args.fault_rate, step_failure_rate=args.step_failure_rate,
                     copy_failure_rate=args.copy_failure_rate, seed=args.seed)
    result = run_faults(_engine_config(args), spec, progress=not args.no_progress)
    _finish(args, result.config, result.results, FAULTS_COLUMNS,
            extra={"sample_errors": result.failures})
    for message in result.failures[:4]:
        print(f"  e.g. {message}")
    if args.plot:
        plot_outcomes(result.results["faults"], args.plot,
                      f"{args.model}: {result.results['faults']['requests']} requests under "
                      "injected faults")
        print(f"wrote {args.plot}")
    row = result.results["faults"]
    healthy = (row["failed_unexplained"] == 0 and row["finished_different"] == 0
               and row["blocks_leaked"] == 0 and row["serves_after"])
    return 0 if healthy else 1
