"""Learning benchmark: Dreamer on classic-control tasks over several seeds, one fixed evaluation protocol.

Protocol: 10 deterministic evaluation episodes every 1,000 env steps on a separate env; "steps to
solve" is the first evaluation whose mean return reaches the env's threshold.

    python -m sb3_dreamer.benchmark --envs CartPole-v1 Pendulum-v1 --seeds 0 1 2 --jobs 2

Each (env, seed) runs in its own process (with one torch thread, and pinned to a core of its own
where ``taskset`` is installed, when ``--jobs`` > 1) and writes ``<out>/<env>_seed<seed>.json``; finished runs are skipped, so an
interrupted benchmark resumes. Each evaluation is printed as it appears in its run's log
(``<out>/<env>_seed<seed>.log``), and at the end the table (Markdown), also written to ``<out>/results.md``.

The policy follows the observation space (``MlpLatentPolicy``, ``CnnLatentPolicy`` for images,
``MultiInputLatentPolicy`` for Dict). Pixel tasks (:mod:`sb3_dreamer.envs`, for a GPU):

    python -m sb3_dreamer.benchmark --envs CartPolePixels-v1 CartPoleDict-v1 --seeds 0 1 2 --jobs 6 --eval-freq 2500 --out runs/pixels
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
from gymnasium import spaces
from stable_baselines3.common.preprocessing import is_image_space

from sb3_dreamer.launcher import Job, run_jobs

THRESHOLDS = {"CartPole-v1": 475.0, "Pendulum-v1": -200.0, "CartPolePixels-v1": 475.0, "CartPoleDict-v1": 475.0}
BUDGETS = {"CartPole-v1": 10_000, "Pendulum-v1": 6_000, "CartPolePixels-v1": 25_000, "CartPoleDict-v1": 25_000}
EVAL_SEED_OFFSET = 10_000  # the evaluation env of seed s is seeded s + 10,000
MAX_SEED = 2**32 - 1 - EVAL_SEED_OFFSET
# The pixel envs (sb3_dreamer.envs; 64 x 64 rendered frames) are for a GPU: on a CPU core a
# CnnLatentPolicy update is several times slower than an MlpLatentPolicy one.


def run_one(env_id: str, seed: int, steps: int, out: Path, kwargs: dict, eval_freq: int, eval_episodes: int) -> dict:
    """Train one seed with evaluations; returns and writes the result record."""
    start = time.perf_counter()
    import torch as th
    from stable_baselines3.common.callbacks import BaseCallback, EvalCallback
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import VecTransposeImage, is_vecenv_wrapped

    from sb3_dreamer import Dreamer

    env = make_vec_env(env_id, n_envs=1, seed=seed)
    model = Dreamer(policy_for(env.observation_space), env, seed=seed, **kwargs)
    eval_env = make_vec_env(env_id, n_envs=1, seed=seed + EVAL_SEED_OFFSET)
    if is_vecenv_wrapped(model.get_env(), VecTransposeImage):  # as Dreamer wrapped the training env
        eval_env = VecTransposeImage(eval_env)
    evaluations: list[tuple[int, float, float]] = []  # (env steps, mean return, seconds since start)

    class RecordEvaluation(BaseCallback):
        """Called by EvalCallback after each evaluation: records its result and the wall-clock."""

        def _on_step(self) -> bool:
            assert self.parent is not None
            evaluations.append((self.num_timesteps, float(self.parent.last_mean_reward), time.perf_counter() - start))
            return True

    callback = EvalCallback(
        eval_env,
        eval_freq=eval_freq,
        n_eval_episodes=eval_episodes,
        deterministic=True,
        verbose=1,
        callback_after_eval=RecordEvaluation(),
    )
    train_start = time.perf_counter()
    model.learn(steps, callback=callback)
    train_time = time.perf_counter() - train_start
    record = {
        "env": env_id,
        "seed": seed,
        "steps": steps,
        "kwargs": kwargs,
        "eval_freq": eval_freq,
        "eval_episodes": eval_episodes,
        "eval_timesteps": [t for t, _, _ in evaluations],
        "eval_returns": [r for _, r, _ in evaluations],
        "eval_wall_clock_s": [c for _, _, c in evaluations],
        "wall_clock_s": time.perf_counter() - start,
        "n_updates": model._n_updates,
        "updates_per_s": model._n_updates / train_time,
        "torch": th.__version__,
        "threads": th.get_num_threads(),
    }
    (out / f"{env_id}_seed{seed}.json").write_text(json.dumps(record, indent=1))
    return record


def policy_for(observation_space: spaces.Space) -> str:
    """The policy alias for an observation space: Dict -> MultiInputLatentPolicy, image -> CnnLatentPolicy, else Mlp."""
    if isinstance(observation_space, spaces.Dict):
        return "MultiInputLatentPolicy"
    return "CnnLatentPolicy" if is_image_space(observation_space, check_channels=False) else "MlpLatentPolicy"


# SB3's EvalCallback (verbose=1) prints one such line per evaluation.
EVALUATION_LINE = re.compile(r"^Eval num_timesteps=(\d+), episode_reward=(\S+) \+/- (\S+)$", flags=re.MULTILINE)


class EvaluationPrinter:
    """The evaluations of running jobs, each once, from their logs: for ``run_jobs``'s ``status``
    (while a job runs) and ``on_done`` (those it wrote after the last look). A log that already
    holds evaluations (an earlier, stopped attempt's) shows only those written after ``start``."""

    def __init__(self) -> None:
        self.shown: dict[str, int] = {}

    @staticmethod
    def evaluations(job: Job) -> list[tuple[str, str, str]]:
        return EVALUATION_LINE.findall(job.log.read_text()) if job.log.is_file() else []

    def start(self, job: Job) -> None:
        self.shown[job.name] = len(self.evaluations(job))

    def __call__(self, job: Job) -> str | None:
        found = self.evaluations(job)
        new, self.shown[job.name] = found[self.shown.get(job.name, 0) :], len(found)
        return "; ".join(f"{int(t):,} env steps, evaluation {float(m):.1f} +/- {float(sd):.1f}" for t, m, sd in new) or None

    def done(self, job: Job, code: int, seconds: float) -> None:
        line = self(job)
        if line is not None:
            print(f"    {job.name}: {line}", flush=True)


def first_solved(returns: list[float], threshold: float) -> int | None:
    """Index of the first evaluation return at or above the threshold (None if never)."""
    return next((i for i, r in enumerate(returns) if r >= threshold), None)


def table(records: list[dict]) -> str:
    """Markdown table, one row per env; unsolved seeds count as infinitely slow for the medians."""
    lines = [
        "| env (threshold) | env steps to solve, per seed | median | wall-clock to solve, median | "
        "final eval return, per seed | stays solved | wall-clock per run | updates/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for env_id in sorted({r["env"] for r in records}):
        runs = sorted((r for r in records if r["env"] == env_id), key=lambda r: r["seed"])
        finals = ", ".join(f"{r['eval_returns'][-1]:.0f}" if r["eval_returns"] else "no evaluation" for r in runs)
        if env_id in THRESHOLDS:
            thr = THRESHOLDS[env_id]
            first = [first_solved(r["eval_returns"], thr) for r in runs]
            steps = [np.inf if i is None else r["eval_timesteps"][i] for r, i in zip(runs, first)]
            clock = [np.inf if i is None else r["eval_wall_clock_s"][i] for r, i in zip(runs, first)]
            stays = sum(i is not None and min(r["eval_returns"][i:]) >= thr for r, i in zip(runs, first))
            k = lambda s: "unsolved" if np.isinf(s) else f"{s / 1000:g}k"  # noqa: E731
            median_clock = np.median(clock)
            solve = (f"{env_id} ({thr:g}) | {', '.join(k(s) for s in steps)} | {k(np.median(steps))} "
                     f"| {'unsolved' if np.isinf(median_clock) else f'{median_clock:.0f} s'} | {finals} | {stays}/{len(runs)}")  # fmt: skip
        else:  # no threshold: nothing counts as solved
            solve = f"{env_id} (no threshold) | - | - | - | {finals} | -"
        lines.append(
            f"| {solve} "
            f"| {np.median([r['wall_clock_s'] for r in runs]):.0f} s for {runs[0]['steps'] / 1000:g}k steps "
            f"| {np.median([r['updates_per_s'] for r in runs]):.1f} |"
        )
    return "\n".join(lines)


def run_steps(env_id: str, steps: int | None) -> int:
    """Env steps of a run: ``--steps`` when given, else the env's budget (:data:`BUDGETS`, 20,000 for others)."""
    return steps or BUDGETS.get(env_id, 20_000)


def refuse_other_settings(args: argparse.Namespace) -> None:
    """SystemExit naming the finished runs in ``args.out`` that were made with other settings than this
    command's (env steps, ``--kwargs``, evaluation frequency and episodes): skipping them would report them
    as this command's. A record written before a setting was recorded is not compared on it."""
    differing = []
    for env_id in args.envs:
        wanted = dict(steps=run_steps(env_id, args.steps), kwargs=args.kwargs, eval_freq=args.eval_freq,
                      eval_episodes=args.eval_episodes)  # fmt: skip
        for seed in args.seeds:
            path = args.out / f"{env_id}_seed{seed}.json"
            if path.exists():
                record = json.loads(path.read_text())
                diff = [f"{k} {record[k]!r} (here: {v!r})" for k, v in wanted.items() if k in record and record[k] != v]
                if diff:
                    differing.append(f"  {path.name}: {', '.join(diff)}")
    if differing:
        raise SystemExit(
            f"{args.out} holds finished runs made with other settings than this command's:\n" + "\n".join(differing)
            + "\nGive this command its own --out (or the settings those runs were made with)."
        )


def counts_below_one(args: argparse.Namespace, names: tuple[str, ...]) -> list[str]:
    """An error for each of the options ``names`` (attribute names of ``args``) below 1 (both benchmarks)."""
    return [f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}" for name in names if getattr(args, name) < 1]


def argument_errors(args: argparse.Namespace) -> list[str]:
    """What in a benchmark command would make its runs fail, or report nothing, named before any run
    starts: an env gymnasium does not know, ``--kwargs`` that are not Dreamer keyword arguments, counts
    below 1, an evaluation frequency past a run's env steps, seeds outside numpy's range."""
    import gymnasium as gym

    from sb3_dreamer import Dreamer

    errors = []
    for env_id in args.envs:
        try:
            gym.spec(env_id)
        except gym.error.Error as error:
            errors.append(f"unknown env {env_id!r}: {error}")
    if not isinstance(args.kwargs, dict):
        errors.append(f"--kwargs takes a JSON object of Dreamer keyword arguments, got {args.kwargs!r}")
    else:
        accepted = set(inspect.signature(Dreamer.__init__).parameters) - {"self", "policy", "env", "seed"}
        unknown = sorted(set(args.kwargs) - accepted)
        if unknown:
            errors.append(f"--kwargs {', '.join(unknown)} {'is not a' if len(unknown) == 1 else 'are not'} Dreamer "
                          f"keyword argument{'s' * (len(unknown) > 1)}; it takes {', '.join(sorted(accepted))}")  # fmt: skip
    errors += counts_below_one(args, ("jobs", "eval_freq", "eval_episodes"))
    if args.steps is not None and args.steps < 1:
        errors.append(f"--steps must be at least 1 (leave it out for each env's budget), got {args.steps}")
    elif args.eval_freq >= 1:
        short = [f"{e} ({run_steps(e, args.steps)})" for e in args.envs if run_steps(e, args.steps) < args.eval_freq]
        if short:
            errors.append(f"--eval-freq {args.eval_freq} evaluates no run within the env steps of {', '.join(short)}: the "
                          "table reads runs by their evaluations; pass a smaller --eval-freq or more --steps")  # fmt: skip
    bad_seeds = [s for s in args.seeds if not 0 <= s <= MAX_SEED]
    if bad_seeds:
        errors.append(f"seeds must be in 0..{MAX_SEED} (numpy's range, less the evaluation env's offset), got {bad_seeds}")
    return errors


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    envs_help = f"gymnasium env ids; steps to solve are counted for {', '.join(THRESHOLDS)} (the others have no threshold)"
    parser.add_argument("--envs", nargs="+", default=["CartPole-v1", "Pendulum-v1"], help=envs_help)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=None, help="env steps per run (default: per-env budget)")
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel, each pinned to its own core while cores remain")
    parser.add_argument("--out", type=Path, default=Path("benchmark_results"))
    parser.add_argument("--kwargs", type=json.loads, default={}, help='Dreamer keyword overrides as JSON, e.g. \'{"train_ratio": 256}\'')
    parser.add_argument("--eval-freq", type=int, default=1000)
    parser.add_argument("--eval-episodes", type=int, default=10)
    parser.add_argument("--one", nargs=2, metavar=("ENV", "SEED"),
                        help="run one (env, seed) in this process (what --jobs launches per run), its JSON under --out")
    args = parser.parse_args(argv)
    if args.one:
        if not args.one[1].isdigit():
            parser.error(f"--one takes an env id and a seed (a whole number >= 0), got seed {args.one[1]!r}")
        args.envs, args.seeds = [args.one[0]], [int(args.one[1])]
    args.envs, args.seeds = list(dict.fromkeys(args.envs)), list(dict.fromkeys(args.seeds))  # each run once
    if errors := argument_errors(args):
        parser.error("; ".join(errors))
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} is a file; give a folder (made if missing)")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.one:
        env_id, seed = args.envs[0], args.seeds[0]
        run_one(env_id, seed, run_steps(env_id, args.steps), args.out, args.kwargs, args.eval_freq, args.eval_episodes)
        return

    refuse_other_settings(args)
    todo = [(e, s) for e in args.envs for s in args.seeds if not (args.out / f"{e}_seed{s}.json").exists()]
    print(f"{len(todo)} run(s) to do, {len(args.envs) * len(args.seeds) - len(todo)} already done in {args.out}", flush=True)
    jobs, printer = [], EvaluationPrinter()
    for env_id, seed in todo:
        cmd = [sys.executable, "-m", "sb3_dreamer.benchmark", "--one", env_id, str(seed), "--out", str(args.out),
               "--kwargs", json.dumps(args.kwargs), "--eval-freq", str(args.eval_freq), "--eval-episodes", str(args.eval_episodes)]  # fmt: skip
        if args.steps:
            cmd += ["--steps", str(args.steps)]
        jobs.append(Job(f"{env_id} seed {seed}", cmd, args.out / f"{env_id}_seed{seed}.log"))
        printer.start(jobs[-1])
    outcomes = run_jobs(jobs, args.jobs, status=printer, status_every=5.0, on_done=printer.done)
    records = [json.loads(p.read_text()) for e in args.envs for s in args.seeds if (p := args.out / f"{e}_seed{s}.json").exists()]
    result = table(records)
    (args.out / "results.md").write_text(result + "\n")
    print(result)
    if failed := [job for job in jobs if outcomes[job.name][0] != 0]:
        raise SystemExit(f"{len(failed)} run(s) failed, not in the table: "
                         + ", ".join(f"{job.name} (see {job.log})" for job in failed))  # fmt: skip


if __name__ == "__main__":
    main()
