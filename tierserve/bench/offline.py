"""`tierserve bench offline`: tierserve against HF transformers and llama.cpp on the same model,
the same prompt token ids and the same output token counts, each contender in its own process.

Scenarios:
    throughput     the seeded workload through each contender's batched path (tierserve: all
                   prompts at once; hf: static batches at its best probed batch size; llama.cpp:
                   one prompt after another, or with --llama-cpp-batch-sizes B sequences per
                   llama_decode at its best probed B); output and total tokens/s
    prefill        each prompt (--prompt-len, default 512 tokens) alone, one output token;
                   prompt tokens/s
    single-decode  one request at a time (--prompt-len, default 64; --output-len, default 128);
                   decode tokens/s from the output token timestamps, the first token excluded
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import pickle
import shlex
import signal
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tierserve.bench.contenders import WorkerJob
from tierserve.bench.workloads import BenchRequest, WorkloadSpec, describe, make_workload
from tierserve.config import EngineConfig

SCENARIOS = ("throughput", "prefill", "single-decode")
BASELINES = ("hf", "llama.cpp")
# The number each scenario is about: the bar chart and the ratios use it.
SCENARIO_METRIC = {"throughput": "output_tokens_per_s", "prefill": "prefill_tokens_per_s",
                   "single-decode": "decode_tokens_per_s"}
SCENARIO_COLUMNS = {
    "throughput": ("output_tokens_per_s", "total_tokens_per_s", "wall_s", "load_s",
                   "peak_rss_mb", "output_tokens", "batch_size"),
    "prefill": ("prefill_tokens_per_s", "first_token_s", "wall_s", "load_s", "peak_rss_mb",
                "prompt_tokens"),
    "single-decode": ("decode_tokens_per_s", "first_token_s", "wall_s", "load_s", "peak_rss_mb",
                      "output_tokens"),
}
DEFAULT_NUM_PROMPTS = {"throughput": 64, "prefill": 8, "single-decode": 1}
DEFAULT_PROMPT_LEN = {"prefill": 512, "single-decode": 64}
LLAMA_CPP_MISSING = ("llama.cpp baseline skipped: llama-cpp-python is not installed; install it "
                     "with `pip install -e '.[bench]'` (compiles llama.cpp, ~15 min)")


@dataclass(slots=True)
class OfflineSpec:
    """What to compare. ``workload`` gives the throughput prompts, the seed, the number of
    prompts and (single-decode) the output length."""

    workload: WorkloadSpec = field(default_factory=WorkloadSpec)
    scenario: str = "throughput"
    baselines: tuple[str, ...] = BASELINES
    dtypes: tuple[str, ...] = ("float32",)
    hf_batch_sizes: tuple[int, ...] = (16, 32, 64)
    prompt_len: int | None = None  # prefill, single-decode (None: the scenario's default)
    threads: int = 1
    llama_cpp_n_batch: int = 512
    llama_cpp_batch_sizes: tuple[int, ...] = (1,)  # 1: sequential; B: B sequences per decode
    # A baseline still running after this many seconds is stopped and marked "did not finish"
    # (tierserve itself runs without a limit: it is what the run is for).
    baseline_timeout_s: float | None = 1800.0

    def __post_init__(self) -> None:
        if self.scenario not in SCENARIOS:
            raise ValueError(f"--scenario {self.scenario!r}: choose one of {', '.join(SCENARIOS)}")
        unknown = set(self.baselines) - set(BASELINES)
        if unknown:
            raise ValueError(f"--baselines: unknown {', '.join(sorted(unknown))}; choose from "
                             f"{','.join(BASELINES)} (or none: --baselines '')")
        bad_dtypes = set(self.dtypes) - {"float32", "bfloat16", "float16"}
        if not self.dtypes or bad_dtypes:
            raise ValueError(f"--dtypes takes float32,bfloat16,float16; got {self.dtypes}")
        if not self.hf_batch_sizes or min(self.hf_batch_sizes) < 1:
            raise ValueError(f"--hf-batch-sizes must be positive, got {self.hf_batch_sizes}")
        if not self.llama_cpp_batch_sizes or min(self.llama_cpp_batch_sizes) < 1:
            raise ValueError("--llama-cpp-batch-sizes must be positive (1: sequential), got "
                             f"{self.llama_cpp_batch_sizes}")
        if self.threads < 1:
            raise ValueError(f"--threads must be positive, got {self.threads}")
        if self.baseline_timeout_s is not None and self.baseline_timeout_s <= 0:
            raise ValueError("--baseline-timeout must be positive seconds (0 on the command "
                             f"line: no limit), got {self.baseline_timeout_s}")
        if self.prompt_len is None:
            self.prompt_len = DEFAULT_PROMPT_LEN.get(self.scenario)


@dataclass(slots=True)
class OfflineResult:
    """The JSON document's config, results and ratios."""

    config: dict
    results: dict[str, dict]
    ratios: dict[str, float]
    equal_output_tokens: bool


def build_prompts(spec: OfflineSpec, model_path: Path, context: int) -> list[BenchRequest]:
    """The seeded prompts every contender gets, fitted to ``context`` tokens."""
    from tierserve.bench.harness import fit_to_context, local_prompt_space

    tokenizer, space = local_prompt_space(model_path)
    workload = copy.copy(spec.workload)
    if spec.scenario != "throughput":
        output_len = 1 if spec.scenario == "prefill" else workload.output_len
        workload = WorkloadSpec(name="random", num_requests=workload.num_requests,
                                seed=workload.seed, input_len=spec.prompt_len,
                                output_len=output_len)
    requests = make_workload(workload, space, encode=tokenizer.encode)
    return fit_to_context(requests, context)[0]


def plan_contenders(spec: OfflineSpec) -> dict[str, tuple[str, str]]:
    """Result name -> (contender, dtype): tierserve and hf once per dtype (names suffixed with
    the dtype when there are several), llama.cpp once."""
    suffix = len(spec.dtypes) > 1
    plan: dict[str, tuple[str, str]] = {}
    for dtype in spec.dtypes:
        for contender in ("tierserve", *(b for b in spec.baselines if b == "hf")):
            plan[f"{contender}-{dtype}" if suffix else contender] = (contender, dtype)
    if "llama.cpp" in spec.baselines:
        plan["llama.cpp"] = ("llama.cpp", "gguf")
    return plan


def run_offline(config: EngineConfig, spec: OfflineSpec, progress: bool = True,
                on_result=None) -> OfflineResult:
    """Run every planned contender in its own process on the same prompts. ``on_result``, when
    given, is called with the ``OfflineResult`` so far after each contender, so a run cut short
    keeps what it measured."""
    from tqdm.auto import tqdm

    from tierserve.model.hub import resolve_model
    from tierserve.model.loader import load_arch_config

    model_path = resolve_model(config.model.model)
    context = config.model.max_model_len or load_arch_config(model_path).max_position_embeddings
    requests = build_prompts(spec, model_path, context)
    results: dict[str, dict] = {}
    plan = plan_contenders(spec)
    document_config = {
        "scenario": spec.scenario, "model": str(model_path), "threads": spec.threads,
        "dtypes": list(spec.dtypes), "baselines": list(spec.baselines),
        "hf_batch_sizes": list(spec.hf_batch_sizes),
        "llama_cpp_batch_sizes": list(spec.llama_cpp_batch_sizes), "prompt_len": spec.prompt_len,
        "baseline_timeout_s": spec.baseline_timeout_s,
        "ratio_metric": SCENARIO_METRIC[spec.scenario], "workload": asdict(spec.workload),
        "requests": describe(requests), "engine": asdict(config)}

    def outcome() -> OfflineResult:
        measured = [row["output_tokens"] for row in results.values() if "output_tokens" in row]
        return OfflineResult(document_config, dict(results),
                             compute_ratios(results, SCENARIO_METRIC[spec.scenario]),
                             len(set(measured)) <= 1)

    bar = tqdm(plan.items(), desc="offline", unit="contender", disable=not progress)
    for name, (contender, dtype) in bar:
        bar.set_description(name)
        skipped = _skip_reason(contender, model_path)
        if skipped:
            print(skipped, file=sys.stderr)
            results[name] = {"contender": contender, "skipped": skipped}
            continue
        engine = copy.deepcopy(config)
        engine.model.dtype, engine.model.num_threads = dtype, spec.threads
        job = WorkerJob(contender=contender, scenario=spec.scenario, model_path=str(model_path),
                        dtype=dtype, threads=spec.threads,
                        prompts=[r.prompt_token_ids for r in requests],
                        max_tokens=[r.max_tokens for r in requests],
                        engine=engine if contender == "tierserve" else None,
                        hf_batch_sizes=spec.hf_batch_sizes,
                        llama_cpp_n_batch=spec.llama_cpp_n_batch,
                        llama_cpp_batch_sizes=spec.llama_cpp_batch_sizes)
        try:
            job.model_path = str(prepare_model(contender, model_path))
        except Exception as exc:  # noqa: BLE001 - a baseline's preparation fails that row only
            results[name] = {"contender": contender, "dtype": dtype,
                             "error": f"preparing the model failed: {exc}"}
        else:
            results[name] = run_worker(job, None if contender == "tierserve"
                                       else spec.baseline_timeout_s)
        if on_result is not None:
            on_result(outcome())
    return outcome()


def prepare_model(contender: str, model_path: Path) -> Path:
    """The checkpoint ``contender`` loads: HF reads a GGUF as a dense folder written once
    (``hf_dense_folder``; not timed, and outside ``--baseline-timeout``), the rest the path."""
    if contender == "hf" and model_path.suffix == ".gguf":
        from tierserve.bench.baselines import hf_dense_folder

        return hf_dense_folder(model_path)
    return model_path


def _skip_reason(contender: str, model_path: Path) -> str | None:
    if contender != "llama.cpp":
        return None
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return LLAMA_CPP_MISSING
    if model_path.suffix != ".gguf":
        return f"llama.cpp baseline skipped: it reads .gguf files only; {model_path} is a folder"
    return None


def run_worker(job: WorkerJob, timeout_s: float | None = None) -> dict:
    """Run ``job`` in a fresh ``python -m tierserve.bench.contenders`` process; its result row,
    ``{"error": ...}`` when the process failed (its traceback is on stderr), or
    ``{"did_not_finish": ...}`` when it ran past ``timeout_s`` (its process group is killed)."""
    with tempfile.TemporaryDirectory(prefix="tierserve-offline-") as folder:
        job_path, result_path = Path(folder) / "job.pickle", Path(folder) / "result.json"
        job_path.write_bytes(pickle.dumps(job))
        env = {**os.environ, "OMP_NUM_THREADS": str(job.threads)}
        proc = subprocess.Popen([sys.executable, "-m", "tierserve.bench.contenders",
                                 str(job_path), str(result_path)], env=env,
                                start_new_session=True)
        try:
            returncode = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return {"contender": job.contender, "dtype": job.dtype,
                    "did_not_finish": f"stopped after {timeout_s:g} s (--baseline-timeout)"}
        except BaseException:  # Ctrl-C, or SIGTERM (cmd_offline raises SystemExit): its own
            with contextlib.suppress(ProcessLookupError):  # session would outlive the bench
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        if returncode != 0 or not result_path.is_file():
            return {"contender": job.contender, "error": worker_failure(job, returncode)}
        return json.loads(result_path.read_text(encoding="utf-8"))


def worker_failure(job: WorkerJob, returncode: int) -> str:
    """What a failed worker's exit says, and for a crash in llama.cpp's native code the fix."""
    if returncode >= 0:
        return f"worker exited with code {returncode} (traceback above)"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    message = f"worker killed by {name}"
    if job.contender == "llama.cpp" and name == "SIGILL":
        message += (": llama.cpp was compiled for CPU instructions this machine does not run "
                    "(e.g. AMX in a VM that does not enable it); rebuild it without them: "
                    "CMAKE_ARGS='-DGGML_NATIVE=OFF' pip install --force-reinstall --no-deps "
                    "--no-cache-dir llama-cpp-python (add -DGGML_AVX512=ON to CMAKE_ARGS where "
                    "the CPU has AVX-512)")
    return message


def compute_ratios(results: dict[str, dict], metric: str) -> dict[str, float]:
    """tierserve's ``metric`` over each baseline result's: tierserve at the same dtype where it
    ran that dtype, else tierserve's best (llama.cpp runs the GGUF as stored). With several
    dtypes also ``best/<baseline>``: tierserve's best over that baseline's best."""
    measured = {name: row for name, row in results.items() if row.get(metric)}
    ours = {row["dtype"]: row[metric] for row in measured.values()
            if row["contender"] == "tierserve"}
    if not ours:
        return {}
    best_ours = max(ours.values())
    ratios = {name: ours.get(row["dtype"], best_ours) / row[metric]
              for name, row in measured.items() if row["contender"] != "tierserve"}
    if len(ours) > 1:
        for baseline in sorted({row["contender"] for row in measured.values()} - {"tierserve"}):
            best = max(row[metric] for row in measured.values() if row["contender"] == baseline)
            ratios[f"best/{baseline}"] = best_ours / best
    return ratios


# -- command line ------------------------------------------------------------------------------
def add_offline_subcommand(sub, add_common) -> None:
    """``tierserve bench offline``: hooked into the bench CLI's subparsers."""
    offline = sub.add_parser(
        "offline", help="tierserve vs HF transformers vs llama.cpp: throughput, prefill, decode",
        description="The same seeded prompt token ids through tierserve (LLM.generate), HF "
        "transformers (generate, static left-padded batches) and llama.cpp (llama-cpp-python, "
        "sequential, or batched with --llama-cpp-batch-sizes), greedy, every contender forced to exactly each prompt's output length. "
        "Each contender runs in its own process, so peak_rss_mb is its own (tierserve's includes "
        "the touched part of its --kv-cache-memory pool and --swap-space tier); load_s and warmup_s are timed "
        "apart from wall_s. HF batch sizes: each size in --hf-batch-sizes is probed on "
        "min(N, 2 x size) prompts, the best by output tokens/s then runs all N prompts (running "
        "all N at every size would take too long); --llama-cpp-batch-sizes are probed the same "
        "way. Ratios are tierserve over each baseline.")
    add_common(offline, plot_help="bars of the scenario's tokens/s per contender")
    offline.add_argument("--num-prompts", dest="num_requests", type=int, default=None,
                         help="prompts (default: throughput 64, prefill 8, single-decode 1)")
    offline.add_argument("--scenario", default="throughput", choices=SCENARIOS,
                         help="throughput (the workload), prefill (--prompt-len prompts, one "
                         "token, one at a time), single-decode (one request at a time, decode "
                         "tokens/s after the first token) (default: %(default)s)")
    offline.add_argument("--baselines", default=",".join(BASELINES),
                         help="comma-separated subset of hf,llama.cpp (default: %(default)s)")
    offline.add_argument("--dtypes", default=None,
                         help="comma-separated dtypes to run tierserve and hf in, e.g. "
                         "float32,bfloat16; results are then named tierserve-bfloat16 etc. "
                         "(default: --dtype)")
    offline.add_argument("--hf-batch-sizes", default="16,32,64",
                         help="HF static batch sizes to probe (default: %(default)s)")
    offline.add_argument("--prompt-len", type=int, default=None,
                         help="prefill / single-decode prompt tokens (default: 512 / 64)")
    offline.add_argument("--llama-cpp-n-batch", type=int, default=512,
                         help="llama.cpp prompt batch (n_batch) (default: %(default)s)")
    offline.add_argument("--llama-cpp-batch-sizes", default="1",
                         help="llama.cpp sizes to probe in the throughput scenario, e.g. 1,16,64: "
                         "1 is Llama.generate one prompt at a time; B > 1 decodes B sequences "
                         "per llama_decode (low-level API, one KV cache per sequence) "
                         "(default: %(default)s)")
    offline.add_argument("--baseline-timeout", type=float, default=1800.0, metavar="S",
                         help="stop a baseline still running after S seconds and mark it "
                         "'did not finish'; the others' results stand (0: no limit) "
                         "(default: %(default)s)")
    offline.set_defaults(func=cmd_offline)


def cmd_offline(args) -> int:
    import torch

    from tierserve.bench import cli
    from tierserve.bench.report import format_table, plot_bars

    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)  # the machine line reports the contenders' thread count
    num_prompts = args.num_requests or DEFAULT_NUM_PROMPTS[args.scenario]
    dtypes = tuple(cli._names(args.dtypes)) if args.dtypes else (args.dtype,)
    spec = OfflineSpec(workload=cli._workload_spec(args, num_prompts), scenario=args.scenario,
                       baselines=cli._names(args.baselines), dtypes=dtypes,
                       hf_batch_sizes=tuple(int(s) for s in cli._names(args.hf_batch_sizes)),
                       prompt_len=args.prompt_len, threads=threads,
                       llama_cpp_n_batch=args.llama_cpp_n_batch,
                       llama_cpp_batch_sizes=tuple(
                           int(s) for s in cli._names(args.llama_cpp_batch_sizes)),
                       baseline_timeout_s=args.baseline_timeout or None)

    def write_partial(partial: OfflineResult) -> None:
        if args.json:  # what is measured so far, replaced by the full document at the end
            from tierserve.bench.report import machine_info, write_json

            write_json(args.json, {"machine": machine_info(",".join(dtypes)),
                                   "config": {"argv": shlex.join(sys.argv), **partial.config},
                                   "results": partial.results, "ratios": partial.ratios,
                                   "complete": False})

    # Workers run in sessions of their own (so a time limit kills a whole group): a SIGTERM to
    # the bench unwinds through run_worker, which kills the worker running.
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        outcome = run_offline(cli._engine_config(args), spec, progress=not args.no_progress,
                              on_result=write_partial)
    finally:
        signal.signal(signal.SIGTERM, previous)
    cli._finish(args, outcome.config, outcome.results, SCENARIO_COLUMNS[spec.scenario],
                extra={"ratios": outcome.ratios,
                       "equal_output_tokens": outcome.equal_output_tokens, "complete": True},
                dtype=",".join(dtypes))
    for name, row in outcome.results.items():
        reason = row.get("skipped") or row.get("error") or row.get("did_not_finish")
        if reason:
            print(f"{name}: {reason}")
    if outcome.ratios:
        metric = SCENARIO_METRIC[spec.scenario]
        print(f"tierserve / baseline, {metric}:")
        print(format_table({k: {"ratio": v} for k, v in outcome.ratios.items()}, ["ratio"]))
    print(f"equal output token counts across contenders: {outcome.equal_output_tokens}")
    if args.plot:
        measured = {name: row for name, row in outcome.results.items()
                    if SCENARIO_METRIC[spec.scenario] in row}
        plot_bars(measured, [(SCENARIO_METRIC[spec.scenario],
                              SCENARIO_METRIC[spec.scenario].replace("_", " ")),
                             ("peak_rss_mb", "peak RSS (MB)")],
                  args.plot, f"offline {spec.scenario}: {Path(outcome.config['model']).name}, "
                  f"{num_prompts} prompts, {threads} threads")
        print(f"wrote {args.plot}")
    failed = any("error" in row for row in outcome.results.values())
    return 1 if failed or not outcome.equal_output_tokens else 0
