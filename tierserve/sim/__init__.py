"""tierserve sim: the engine's own scheduler, KV manager, policies and batch planner driven by a
cost model instead of a model, on a virtual clock, at GPU scale. Imports no torch.

    hardware.py       accelerator profiles as data (FLOPS, HBM, PCIe, NVLink), each with its source
    model_shape.py    a model's shape from an HF config.json (or a known name)
    cost.py           the CostModel protocol, the roofline model, parallelism and copy costs
    profiled.py       tables of measured step costs (ours, or Vidur's mlp.csv/attention.csv)
    executor.py       SimExecutor: StepPlan -> StepResult with simulated time and swap links
    traces.py         request traces: length statistics, conversations, CSV and JSONL import
    driver.py         one arrival loop for the real engine and the simulated one
    run.py            SimSetup, make_setup, simulate, run_pool
    capacity.py       Sarathi-Serve's capacity search
    profile.py        `sim profile`: this machine's real engine by operator (loads torch when run)
    calibrate.py      `sim calibrate`: simulated vs measured (loads torch when run)
    priorities.py     FastSwitch's Random/Markov priority patterns
    experts.py        offloaded MoE experts: the engine's expert books and policies, loads on a link
    selection.py      KV selection and static eviction priced (the engine's counting rules)
    repro_sarathi.py, repro_fastswitch.py, repro_batchllm.py, repro_expertflow.py,
    repro_mpcache.py  `sim reproduce <paper>`
    plots.py, cli.py  figures and the command line
"""
