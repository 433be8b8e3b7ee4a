"""sched/, kv/ and sim/ import without torch (the simulator runs where torch is not installed)."""

import subprocess
import sys


def test_sched_kv_and_sim_import_no_torch():
    modules = ["tierserve.sched.scheduler", "tierserve.sched.policies", "tierserve.kv.manager",
               "tierserve.kv.tiers", "tierserve.engine.core", "tierserve.batch.runner",
               "tierserve.batch.planner"]
    modules += [f"tierserve.sim.{name}" for name in (
        "hardware", "model_shape", "cost", "profiled", "executor", "traces", "driver", "run",
        "capacity", "cli", "profile", "calibrate", "plots", "priorities", "repro_sarathi",
        "repro_fastswitch", "repro_batchllm", "experts", "repro_expertflow", "selection",
        "repro_mpcache")]
    code = ("import sys\n" + "".join(f"import {m}\n" for m in modules)
            + "import tierserve.sim.cli as c, argparse\n"
            "p = argparse.ArgumentParser(); c.add_sim_parser(p.add_subparsers())\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
