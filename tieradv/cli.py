"""``tieradv``: the exact tabular convergence study and self-play training of the sumo victim."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="tieradv", description=__doc__)
    sub = top.add_subparsers(dest="command", required=True)
    p = sub.add_parser("tabular", help="timescale-separated vs. single-timescale adversarial "
                                       "training on a tabular zero-sum Markov game, exactly")
    p.add_argument("--game", choices=["pennies", "random"], default="pennies")
    p.add_argument("--states", type=int, default=4)
    p.add_argument("--actions", type=int, default=2)
    p.add_argument("--gamma", type=float, default=0.8)
    p.add_argument("--steps", type=int, default=3000, help="victim updates")
    p.add_argument("--attacker-lr", type=float, default=0.5)
    p.add_argument("--victim-ratio", type=float, default=0.2,
                   help="victim learning rate as a fraction of the attacker's (separated run)")
    p.add_argument("--attacker-steps", type=int, default=20,
                   help="attacker updates per victim update (separated run)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="write JSON here and a .png plot beside it")
    p = sub.add_parser("victim", help="train the victim by self-play PPO (resumable: run the same "
                                      "command again after a stop)")
    p.add_argument("--out", type=Path, required=True, help="run directory (checkpoints, JSON)")
    p.add_argument("--steps", type=int, default=100_000, help="environment steps in all")
    p.add_argument("--chunk", type=int, default=8192,
                   help="steps between checkpoints and opponent snapshots")
    p.add_argument("--eval-episodes", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("attack", help="train attackers against a frozen victim over epsilon and "
                                      "stealth weights: win rate, state shift, detector AUC")
    p.add_argument("--victim", type=Path, required=True, help="a victim model.zip (tieradv victim)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--epsilons", default="1.0,0.5", help="control levels (1.0 = Gleave et al.)")
    p.add_argument("--stealth-weights", default="0,1", help="stealth charge weights")
    p.add_argument("--steps", type=int, default=100_000, help="PPO steps per attacker")
    p.add_argument("--episodes", type=int, default=10, help="evaluation episodes per attacker")
    p.add_argument("--seed", type=int, default=0)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return {"tabular": cmd_tabular, "victim": cmd_victim, "attack": cmd_attack}[args.command](args)


def cmd_attack(args) -> int:
    from tieradv.attacks import result_path, train_attacker

    results = []
    for epsilon in (float(e) for e in args.epsilons.split(",")):
        for weight in (float(w) for w in args.stealth_weights.split(",")):
            done = result_path(args.out, epsilon, weight)
            if done.exists():  # a rerun after a stop skips the finished attackers
                results.append(json.loads(done.read_text()))
                continue
            result = train_attacker(args.victim, epsilon, weight, args.steps, args.out, args.seed,
                                    args.episodes)
            results.append(result.__dict__)
            print(json.dumps(result.__dict__), flush=True)
    (args.out / "attacks.json").write_text(json.dumps(results, indent=1))
    return 0


def cmd_victim(args) -> int:
    from tieradv.train import OPPONENTS, SelfPlay, evaluate, ppo_policy

    run = SelfPlay(args.out, args.steps, args.chunk, args.seed,
                   eval_episodes=max(2, args.eval_episodes // 2))
    start = time.perf_counter()
    state = run.run(progress=sys.stderr.isatty())
    final = {name: evaluate(ppo_policy(run.model), make(), args.eval_episodes)
             for name, make in OPPONENTS.items()}
    result = {"config": {k: str(v) for k, v in vars(args).items()}, "steps": state.done_steps,
              "seconds_this_run": round(time.perf_counter() - start, 1), "curve": state.curve,
              "final_win_rates": final}
    (args.out / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({"steps": state.done_steps, "final_win_rates": final}, indent=2))
    return 0


def cmd_tabular(args) -> int:
    from tieradv.tabular import fitted_rate, make_game, run_dynamics, shapley

    game = make_game(args.game, args.states, args.actions, args.gamma, args.seed)
    value, robust, _ = shapley(game)
    every = max(1, args.steps // 300)
    start = time.perf_counter()
    runs = {
        "separated": run_dynamics(game, args.steps, args.attacker_lr * args.victim_ratio,
                                  args.attacker_lr, args.attacker_steps, "separated", args.seed,
                                  every),
        "single": run_dynamics(game, args.steps, args.attacker_lr * args.victim_ratio,
                               args.attacker_lr * args.victim_ratio, 1, "single", args.seed, every),
    }
    result = {"config": vars(args) | {"out": str(args.out) if args.out else None},
              "game_value_at_start": float(game.start @ value), "robust_victim": robust.tolist(),
              "seconds": round(time.perf_counter() - start, 2), "record_every": every, "runs": {}}
    for name, run in runs.items():
        curve = run.exploitability
        result["runs"][name] = {
            "final_exploitability": curve[-1], "max_exploitability_last_half": max(
                curve[len(curve) // 2:]), "fitted_rate": fitted_rate(curve, every),
            "exploitability": curve, "victim": run.victim.tolist()}
    summary = {k: {m: v[m] for m in ("final_exploitability", "max_exploitability_last_half",
                                     "fitted_rate")} for k, v in result["runs"].items()}
    print(json.dumps({"game_value_at_start": result["game_value_at_start"], **summary}, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        plot_tabular(result, args.out.with_suffix(".png"))
    return 0


def plot_tabular(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    every = result["record_every"]
    for name, run in result["runs"].items():
        steps = [every * (i + 1) for i in range(len(run["exploitability"]))]
        label = f"{name} (log-log slope {run['fitted_rate']:.2f})"
        ax.loglog(steps, [max(v, 1e-12) for v in run["exploitability"]], label=label)
    ax.set_xlabel("victim updates")
    ax.set_ylabel("exploitability of the victim (exact)")
    cfg = result["config"]
    ax.set_title(f"{cfg['game']} game, {cfg['states']} states, gamma {cfg['gamma']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
