"""Benchmark a grid of (algo, env, seed) through the RL Zoo with one evaluation protocol.

    python -m sb3_dreamer.zoo benchmark --algos dreamer ppo --envs CartPole-v1 --seeds 0 1 2 \\
        --n-timesteps 30000 --eval-freq 1000 --eval-episodes 10 --jobs 2

Every run is ``python -m sb3_dreamer.zoo train`` with the algorithm's own zoo hyperparameters
(ours for Dreamer) and the same budget (``-n``), evaluation frequency and episodes
(deterministic, one eval env), so the curves are comparable. Runs log to the zoo's
``<log-folder>/<algo>/<Env>_<N>/``, so ``rl_zoo3.plots.all_plots`` works on them too. A finished
run leaves ``<out>/runs/<algo>_<env>_seed<S>.json`` with its protocol; a rerun skips it, and
refuses it if recorded under another protocol (budget, evaluation frequency or episodes, Dreamer's
``--params``), so one table never mixes two. A run takes a checkpoint
after every evaluation (``--checkpoint-every``), and a rerun continues a stopped run from its latest
checkpoint in its own folder (:mod:`sb3_dreamer.zoo_resume`), its wall-clock summed over attempts;
a stopped run begun with other evaluation settings or ``--params`` is refused before any run starts.
While runs train, a line per running run gives its latest evaluation every ``--status-every`` seconds.
The outputs include runs not finished (still training, or stopped), read at their latest evaluation
and marked; ``--report-only`` writes them from the runs so far without starting any. Pairs the zoo
cannot run (no hyperparameters for the env in the algorithm's YAML, or an action space the
algorithm does not support: DQN on Pendulum, SAC on CartPole) are skipped with a note, so one
command covers a grid of mixed action spaces.

Every output reads a run's evaluations up to its budget only (the zoo's PPO trains whole rollouts
and so evaluates past ``-n``). Writes to ``<out>``:

- ``evaluations.csv``: every evaluation point (algo, env, seed, timesteps, mean and std return,
  whether the run has finished);
- ``results.md``: per (algo, env), env steps to the solved threshold per seed and median ("-" for an
  env without a threshold in :data:`THRESHOLDS`), final
  return per seed, interquartile mean (IQM) of the final return with a 95% stratified bootstrap
  confidence interval (rliable), and wall-clock per run; then the IQM over envs of the
  random-to-threshold normalised final return, per algo;
- ``curves.png``: mean evaluation return against env steps, one axis per env, with a 95%
  bootstrap band over seeds.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
import zipfile
from pathlib import Path

import numpy as np

from sb3_dreamer import benchmark, zoo_resume
from sb3_dreamer.launcher import Job, run_jobs

# Solved thresholds (mean evaluation return) and the return of a uniformly random policy, which
# together normalise scores to [random = 0, solved = 1] for the aggregate over envs.
THRESHOLDS = {
    **benchmark.THRESHOLDS,  # CartPole-v1, Pendulum-v1
    "CartPoleNoVel-v1": 475.0,
    "PendulumNoVel-v1": -200.0,
    "LunarLander-v3": 200.0,
    "LunarLanderContinuous-v3": 200.0,
}
RANDOM_RETURNS = {
    "CartPole-v1": 22.0,
    "CartPoleNoVel-v1": 22.0,
    "Pendulum-v1": -1230.0,
    "PendulumNoVel-v1": -1230.0,
    "LunarLander-v3": -180.0,
    "LunarLanderContinuous-v3": -180.0,
}


def run_name(algo: str, env_id: str, seed: int) -> str:
    return f"{algo}_{env_id}_seed{seed}"


def hyperparams_file(algo: str) -> Path:
    """The YAML the zoo reads for ``algo``: ours for Dreamer, the zoo's own for the others."""
    if algo == "dreamer":
        from sb3_dreamer.zoo import default_config_path

        return default_config_path()
    import rl_zoo3

    return Path(rl_zoo3.__file__).parent / "hyperparams" / f"{algo}.yml"


def zoo_algos() -> dict:
    """The zoo's algorithm table with Dreamer registered (the zoo's envs, e.g. CartPoleNoVel-v1, registered too)."""
    import rl_zoo3.import_envs  # noqa: F401
    from rl_zoo3.utils import ALGOS

    from sb3_dreamer.zoo import register

    register()
    return ALGOS


def argument_errors(args: argparse.Namespace) -> list[str]:
    """What in a benchmark command would make every run of some (algo, env) fail in the zoo, named
    before any run starts: an algorithm or env the zoo does not know, a ``--params`` item that is
    not ``key:value``, counts below 1, seeds outside numpy's range."""
    import gymnasium as gym

    algos = zoo_algos()
    known = ", ".join(sorted(algos))
    errors = [f"unknown algo {algo!r}; the zoo's algorithms: {known}" for algo in args.algos if algo not in algos]
    for env_id in args.envs:
        try:
            gym.spec(env_id)
        except gym.error.Error as error:
            errors.append(f"unknown env {env_id!r}: {error}")
    malformed = [item for item in args.params or [] if ":" not in item]
    errors += [f"--params takes key:value items (the zoo's -params), got {item!r}" for item in malformed]
    errors += benchmark.counts_below_one(args, ("jobs", "eval_episodes"))
    if bad_seeds := [s for s in args.seeds if not 0 <= s < 2**32]:
        errors.append(f"seeds must be in 0..{2**32 - 1} (numpy's range), got {bad_seeds}")
    if args.eval_freq <= 0 or args.eval_freq > args.n_timesteps:
        errors.append(
            f"--eval-freq {args.eval_freq} evaluates no run within --n-timesteps {args.n_timesteps}: the benchmark reads "
            "runs by their evaluations (and checkpoints follow them); pass 0 < --eval-freq <= --n-timesteps"
        )
    return errors


def skip_reason(algo: str, env_id: str) -> str | None:
    """Why the zoo cannot run ``algo`` on ``env_id``, or None if it can: no hyperparameters for the
    env in the algorithm's YAML (neither its entry nor ``default``, as the zoo looks them up), or an
    action space the algorithm does not support (SB3's own check, e.g. DQN on Pendulum, SAC on
    CartPole). An algorithm the zoo does not know is not skipped (the benchmark refuses it up front:
    :func:`argument_errors`)."""
    path = hyperparams_file(algo)
    if path.exists():
        import yaml

        entries = yaml.safe_load(path.read_text()) or {}
        if env_id not in entries and "default" not in entries:
            return f"no hyperparameters for it in {path}"
    import gymnasium as gym

    algos = zoo_algos()
    if algo not in algos:
        return None
    algo_class = algos[algo]
    env = gym.make(env_id)
    try:  # SB3 checks the action space before building anything (_init_setup_model=False)
        algo_class(next(iter(algo_class.policy_aliases)), env, device="cpu", _init_setup_model=False)
    except AssertionError as error:
        return str(error)
    finally:
        env.close()
    return None


def train_command(algo: str, env_id: str, seed: int, args: argparse.Namespace, resume: str | None = None) -> list[str]:
    """The zoo command of one run (Dreamer registered by our entry point; others are the zoo's own),
    continuing the run folder ``resume`` from its latest checkpoint when given."""
    return [
        sys.executable, "-m", "sb3_dreamer.zoo", "train", "--algo", algo, "--env", env_id, "--seed", str(seed),
        "-n", str(args.n_timesteps), "--eval-freq", str(args.eval_freq), "--eval-episodes", str(args.eval_episodes),
        "--n-eval-envs", "1", "-f", str(args.log_folder.resolve()), "--device", args.device, "--log-interval", "-2",
        *(["--checkpoint-every", str(args.checkpoint_every)] if args.checkpoint_every > 0 else []),
        *(["--resume", resume] if resume is not None else []),
        *(["-params", *args.params] if args.params and algo == "dreamer" else []),
    ]  # fmt: skip


def protocol(algo: str, args: argparse.Namespace) -> dict:
    """What a run's record must share with a rerun that skips or continues it: budget, evaluation
    frequency and episodes, and (Dreamer only; the baselines keep the zoo's own) ``--params``."""
    params = sorted(args.params) if algo == "dreamer" and args.params else None
    return dict(n_timesteps=args.n_timesteps, eval_freq=args.eval_freq, eval_episodes=args.eval_episodes, params=params)


def mixed_protocols(runs: list[dict]) -> str | None:
    """Where the finished runs of one report were recorded under different budgets or evaluation
    protocols, or (among the runs of one algo) different ``--params`` (a run command refuses that,
    ``--report-only`` reads whatever is there): a line per protocol naming its runs; None when they agree."""
    keys = ("n_timesteps", "eval_freq", "eval_episodes")
    finished = [run for run in runs if run["finished"]]
    groups: dict[tuple, list[str]] = {}
    for run in finished:
        if all(run.get(key) is not None for key in keys):
            groups.setdefault(tuple(run[key] for key in keys), []).append(run_name(run["algo"], run["env"], run["seed"]))
    lines = []
    if len(groups) > 1:
        lines += [f"  n_timesteps {n}, eval_freq {f}, eval_episodes {e}: {', '.join(names)}" for (n, f, e), names in groups.items()]
    by_params: dict[str, dict[tuple, list[str]]] = {}  # algo -> its runs by --params (the baselines have none)
    for run in finished:
        params = tuple(run.get("params") or ())
        by_params.setdefault(run["algo"], {}).setdefault(params, []).append(run_name(run["algo"], run["env"], run["seed"]))
    for algo, algo_groups in by_params.items():
        if len(algo_groups) > 1:
            lines += [f"  {algo} --params {' '.join(p) or '(none)'}: {', '.join(names)}" for p, names in algo_groups.items()]
    return "\n".join(lines) or None


def protocol_mismatches(record: dict, args: argparse.Namespace) -> list[str]:
    """How a finished run's record differs from this invocation's :func:`protocol` (a record
    written before a field was recorded is not compared on it)."""
    return zoo_resume.differences(record, protocol(record["algo"], args), "here")


def train_args(algo: str, env_id: str, seed: int, args: argparse.Namespace) -> dict:
    """The zoo arguments of :data:`zoo_resume.RESUMED_ARGS` in :func:`train_command`, parsed as the
    zoo's ``train`` parses them (these options' definitions in ``rl_zoo3.train``: ``-params`` and the
    env kwargs evaluated by its ``StoreDict``), so they compare with a run's ``<Env>/args.yml``."""
    from rl_zoo3.utils import StoreDict

    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)  # --env is not --env-kwargs here
    parser.add_argument("--seed", type=int, default=-1)
    parser.add_argument("--eval-freq", type=int, default=25000)
    parser.add_argument("--eval-episodes", type=int, default=5)
    parser.add_argument("--n-eval-envs", type=int, default=1)
    for option in ("-params", "--env-kwargs", "--eval-env-kwargs"):
        parser.add_argument(option, *(["--hyperparams"] if option == "-params" else []), type=str, nargs="+", action=StoreDict)
    command = train_command(algo, env_id, seed, args)
    parsed = vars(parser.parse_known_args(command[command.index("train") + 1 :])[0])
    return {name: parsed[name] for name in zoo_resume.RESUMED_ARGS}


def log_paths(log: Path) -> list[str]:
    """The zoo run folders a run's log names (``Log path: ...``), oldest attempt first."""
    if not log.is_file():
        return []
    return [m.strip() for m in re.findall(r"^Log path: (.+)$", log.read_text(), flags=re.MULTILINE)]


def progress_line(job: Job) -> str | None:
    """The latest evaluation of a running job (from its zoo folder's ``evaluations.npz``)."""
    folders = log_paths(job.log)
    path = Path(folders[-1]) / "evaluations.npz" if folders else None
    if path is None or not path.is_file():
        return None
    data = zoo_resume.read_evaluations(path)
    if data is None:  # caught mid-write by the run: read it next time
        return None
    timesteps, returns = data["timesteps"], data["results"]
    if len(timesteps) == 0:
        return None
    return f"{int(timesteps[-1])} env steps, last evaluation {returns[-1].mean():.1f}, best {returns.mean(1).max():.1f}"


def saved_timesteps(model_zip: Path) -> int | None:
    """``num_timesteps`` of a model saved by SB3 (from the zip's ``data`` JSON; None if absent)."""
    if not model_zip.is_file():
        return None
    with zipfile.ZipFile(model_zip) as archive:
        return int(json.loads(archive.read("data"))["num_timesteps"])


def checkpointed_seconds(run_folder: str) -> float | None:
    """Wall-clock seconds a run had trained at its latest complete checkpoint (None: no checkpoint)."""
    checkpoint = zoo_resume.latest_checkpoint(run_folder)
    return None if checkpoint is None else float(zoo_resume.read_progress(checkpoint)["wall_clock_s"])


def resume_point(log: Path) -> tuple[str, float] | None:
    """(run folder, wall-clock seconds trained so far) of an unfinished run whose last attempt left
    a complete checkpoint; None to start it afresh."""
    folders = log_paths(log)
    seconds = checkpointed_seconds(folders[-1]) if folders else None
    return None if seconds is None else (folders[-1], seconds)


def check_distinct_log_paths(runs: list[dict]) -> None:
    """ValueError when two runs recorded one zoo log folder: their evaluations overwrote each other."""
    by_path: dict[str, list[str]] = {}
    for run in runs:
        by_path.setdefault(str(Path(run["log_path"]).resolve()), []).append(run_name(run["algo"], run["env"], run["seed"]))
    shared = {path: names for path, names in by_path.items() if len(names) > 1}
    if shared:
        raise ValueError(
            f"Runs that share a zoo log folder (each overwrote the other's evaluations.npz): {shared}. Delete their "
            "records and logs in <out>/runs/ (<run>.json and <run>.log: a log names the folder a rerun would continue) "
            "and run the benchmark again (sb3_dreamer.zoo train now claims distinct folders)"
        )


def check_protocol(done: list[tuple[str, str, int]], args: argparse.Namespace) -> None:
    """SystemExit when finished runs of the grid were recorded under another protocol (budget,
    evaluation frequency or episodes, Dreamer's ``--params``): skipping them would put runs of two
    protocols in one table. (A stopped run has no record; continue it with the protocol it began with.)"""
    differing = {}
    for key in done:
        name = run_name(*key)
        mismatches = protocol_mismatches(json.loads((args.out / "runs" / f"{name}.json").read_text()), args)
        if mismatches:
            differing[name] = ", ".join(mismatches)
    if differing:
        lines = "\n".join(f"  {name}: {text}" for name, text in differing.items())
        raise SystemExit(
            f"Finished runs in {args.out} were recorded with another protocol than this command's:\n{lines}\n"
            f"Pass the same --n-timesteps, --eval-freq, --eval-episodes and --params, give this protocol its own --out, "
            f"or delete those records and their logs ({args.out / 'runs'}/<run>.json and <run>.log, which names the zoo "
            f"folder a rerun would continue) to run them again in new zoo folders."
        )


def check_resumable(todo: list[tuple[str, str, int]], args: argparse.Namespace) -> None:
    """SystemExit when stopped runs of ``todo`` that this command would continue began with other
    zoo arguments (seed, evaluation frequency or episodes, Dreamer's ``--params``; see
    :func:`zoo_resume.resume_mismatches`), naming each, before any run starts."""
    from rl_zoo3.utils import EnvironmentName

    differing = {}
    for algo, env_id, seed in todo:
        name = run_name(algo, env_id, seed)
        point = resume_point(args.out / "runs" / f"{name}.log")
        if point is None:  # a fresh run: nothing to continue
            continue
        started = zoo_resume.read_run_args(point[0], str(EnvironmentName(env_id)))
        mismatches = zoo_resume.resume_mismatches(started or {}, train_args(algo, env_id, seed, args))
        if mismatches:
            differing[f"{name} ({point[0]})"] = ", ".join(mismatches)
    if differing:
        lines = "\n".join(f"  {name}: {text}" for name, text in differing.items())
        raise SystemExit(
            f"Stopped runs this command would continue began with other arguments than this command's:\n{lines}\n"
            "Pass the --eval-freq, --eval-episodes and --params they began with, or give this protocol its own --out "
            "(its runs start afresh in new zoo folders)."
        )


def run_budget(record: dict) -> int | None:
    """A run's budget (-n): from its record, else from the run's ``<Env>/args.yml`` (None if neither has it)."""
    if record.get("n_timesteps") is not None:
        return int(record["n_timesteps"])
    from rl_zoo3.utils import EnvironmentName

    started = zoo_resume.read_run_args(record["log_path"], str(EnvironmentName(record["env"])))
    return None if not started or started.get("n_timesteps") is None else int(started["n_timesteps"])


def load_runs(out: Path, algos: list[str], envs: list[str], seeds: list[int]) -> list[dict]:
    """Runs of the grid with their evaluations (timesteps [K], mean returns [K], std [K]).

    Finished runs come from their records; a run that is still training, or was stopped, comes from
    the zoo folder its log names, marked ``finished=False`` (its wall-clock is that of its latest
    checkpoint, or None)."""
    runs = []
    for algo in algos:
        for env_id in envs:
            for seed in seeds:
                name = run_name(algo, env_id, seed)
                path = out / "runs" / f"{name}.json"
                if path.exists():
                    record = dict(json.loads(path.read_text()), finished=True)
                else:
                    folders = log_paths(out / "runs" / f"{name}.log")
                    if not folders or not (Path(folders[-1]) / "evaluations.npz").is_file():
                        continue
                    record = dict(algo=algo, env=env_id, seed=seed, log_path=folders[-1],
                                  wall_clock_s=checkpointed_seconds(folders[-1]), finished=False)  # fmt: skip
                evaluations = Path(record["log_path"]) / "evaluations.npz"
                if not evaluations.is_file():
                    raise FileNotFoundError(
                        f"{path} records a finished run in {record['log_path']}, which has no evaluations.npz (moved or "
                        f"deleted?): restore the folder, or delete the record and its log ({path.with_suffix('.log')}) to run it again"
                    )
                data = zoo_resume.read_evaluations(evaluations, retries=0 if record["finished"] else 5)
                if data is None and record["finished"]:
                    raise ValueError(
                        f"{evaluations} of the finished run {name} cannot be read (damaged?): restore it (its last "
                        f"checkpoint_<steps>/ holds a copy up to that step), or delete the record and its log "
                        f"({path.with_suffix('.log')}) to run it again"
                    )
                if data is None:  # still rewritten by the run after five tries: shown at its next evaluation
                    print(f"{name}: {evaluations} is being written; left out of this report", file=sys.stderr)
                    continue
                # Only evaluations within the budget: the zoo's PPO trains whole rollouts (n_envs x n_steps)
                # and so evaluates past -n, which would compare it at more env steps than the others.
                budget = run_budget(record)
                within = data["timesteps"] <= budget if budget is not None else np.ones(len(data["timesteps"]), bool)
                record.update(
                    timesteps=data["timesteps"][within].tolist(),
                    mean=data["results"][within].mean(1).tolist(),
                    std=data["results"][within].std(1).tolist(),
                )
                if record["timesteps"]:
                    runs.append(record)
    return runs


def steps_to_solve(timesteps: list[int], returns: list[float], threshold: float) -> float:
    """Env steps of the first evaluation at or above ``threshold`` (inf if none)."""
    index = benchmark.first_solved(returns, threshold)
    return float("inf") if index is None else float(timesteps[index])


def iqm_interval(scores: np.ndarray, reps: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """IQM of ``scores`` [runs, tasks] and its 95% stratified bootstrap interval (rliable)."""
    from rliable import library as rly
    from rliable import metrics

    rng_state = np.random.get_state()
    np.random.seed(seed)  # rliable draws its bootstrap samples from numpy's global generator
    try:
        point, interval = rly.get_interval_estimates({"x": scores}, lambda x: np.array([metrics.aggregate_iqm(x)]), reps=reps)
    finally:
        np.random.set_state(rng_state)
    return float(point["x"][0]), float(interval["x"][0, 0]), float(interval["x"][1, 0])


def write_csv(runs: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["algo", "env", "seed", "timesteps", "mean_return", "std_return", "finished"])
        for r in runs:
            for t, m, s in zip(r["timesteps"], r["mean"], r["std"]):
                writer.writerow([r["algo"], r["env"], r["seed"], t, f"{m:.3f}", f"{s:.3f}", int(r["finished"])])


def results_table(runs: list[dict]) -> str:
    """Markdown: one row per (algo, env), then the normalised aggregate per algo. A run not finished
    is marked with ``*`` and read at its latest evaluation: not at the threshold yet is ``>Nk``."""

    def k(steps: float, run: dict | None = None) -> str:
        if not np.isinf(steps):
            return f"{steps / 1000:g}k"
        return f">{run['timesteps'][-1] / 1000:g}k*" if run is not None and not run["finished"] else "unsolved"

    lines = [
        "| algo | env (threshold) | env steps to threshold, per seed | median | final return, per seed "
        "| IQM final return [95% CI] | wall-clock per run, median |",
        "|---|---|---|---|---|---|---|",
    ]
    algos = list(dict.fromkeys(r["algo"] for r in runs))
    envs = list(dict.fromkeys(r["env"] for r in runs))
    for env_id in envs:
        threshold = THRESHOLDS.get(env_id)
        for algo in algos:
            group = sorted((r for r in runs if r["algo"] == algo and r["env"] == env_id), key=lambda r: r["seed"])
            if not group:
                continue
            unfinished = not all(r["finished"] for r in group)
            if threshold is None:  # an env this module has no threshold for: no steps to read, rather than "unsolved"
                steps_cells, median_cell = ", ".join("-" for _ in group), "-"
            else:
                steps = [steps_to_solve(r["timesteps"], r["mean"], threshold) for r in group]
                median = float(np.median(steps))  # a run below the threshold counts as never reaching it
                steps_cells = ", ".join(k(s, r) for s, r in zip(steps, group))
                median_cell = ("not yet" if np.isinf(median) else k(median)) + "*" if unfinished else k(median)
            finals = np.array([[r["mean"][-1]] for r in group])
            iqm, low, high = iqm_interval(finals)
            clocks = [r["wall_clock_s"] for r in group if r["finished"]]
            lines.append(
                f"| {algo} | {env_id} ({'no threshold' if threshold is None else f'{threshold:g}'}) | {steps_cells} "
                f"| {median_cell} "
                f"| {', '.join(f'{f:.0f}' + ('' if r['finished'] else '*') for f, r in zip(finals[:, 0], group))} "
                f"| {iqm:.0f} [{low:.0f}, {high:.0f}] | {f'{np.median(clocks):.0f} s' if clocks else '-'} |"
            )
    if not all(r["finished"] for r in runs):
        lines += ["", "\\* not finished (still training, or stopped): read at its latest evaluation, and a median over "
                  "such runs may still fall; a rerun of the benchmark continues them from their checkpoints. Wall-clock "
                  "is over finished runs."]  # fmt: skip
    normalised = [e for e in envs if e in RANDOM_RETURNS and e in THRESHOLDS]
    if normalised:
        lines += ["", f"Normalised final return (random policy 0, threshold 1), IQM over seeds x envs ({', '.join(normalised)}):", ""]
        lines += ["| algo | IQM [95% CI] |", "|---|---|"]
        left_out = []
        for algo in algos:
            seeds = sorted({r["seed"] for r in runs if r["algo"] == algo})
            table = {(r["env"], r["seed"]): r["mean"][-1] for r in runs if r["algo"] == algo}
            missing = {e: [str(s) for s in seeds if (e, s) not in table] for e in normalised}
            if any(missing.values()):  # the stratified bootstrap needs every (seed, env) cell
                cells = [f"{e} seed{'s' * (len(m) > 1)} {', '.join(m)}" for e, m in missing.items() if m]
                left_out.append(f"{algo} (no run of {'; '.join(cells)})")
                continue
            scores = np.array(
                [[(table[e, s] - RANDOM_RETURNS[e]) / (THRESHOLDS[e] - RANDOM_RETURNS[e]) for e in normalised] for s in seeds]
            )
            iqm, low, high = iqm_interval(scores)
            lines.append(f"| {algo} | {iqm:.2f} [{low:.2f}, {high:.2f}] |")
        if left_out:
            lines += ["", f"Left out of the aggregate, which needs a run for every env and seed: {', '.join(left_out)}."]
    return "\n".join(lines)


def plot_curves(runs: list[dict], path: Path) -> None:
    """Mean evaluation return against env steps with a 95% bootstrap band over seeds (up to the
    shortest run's last evaluation), and each seed's whole curve thin, one axis per env."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    envs = list(dict.fromkeys(r["env"] for r in runs))
    fig, axes = plt.subplots(1, len(envs), figsize=(5 * len(envs), 4), squeeze=False)
    rng = np.random.default_rng(0)
    for ax, env_id in zip(axes[0], envs):
        for algo in dict.fromkeys(r["algo"] for r in runs):
            group = [r for r in runs if r["algo"] == algo and r["env"] == env_id]
            if not group:
                continue
            length = min(len(r["mean"]) for r in group)
            steps = np.array(group[0]["timesteps"][:length])
            returns = np.array([r["mean"][:length] for r in group])  # [seeds, K]
            boot = returns[rng.integers(0, len(group), size=(2000, len(group)))].mean(1)  # [2000, K]
            unfinished = sum(not r["finished"] for r in group)
            label = f"{algo} ({len(group)} seeds{f', {unfinished} not finished' if unfinished else ''})"
            (line,) = ax.plot(steps, returns.mean(0), label=label)
            ax.fill_between(steps, np.percentile(boot, 2.5, 0), np.percentile(boot, 97.5, 0), alpha=0.25, color=line.get_color())
            for r in group:  # each seed thin, whole: the mean stops at the shortest run
                ax.plot(r["timesteps"], r["mean"], color=line.get_color(), alpha=0.35, linewidth=0.8)
        if env_id in THRESHOLDS:
            ax.axhline(THRESHOLDS[env_id], color="gray", linestyle="--", linewidth=1)
        ax.set_title(env_id)
        ax.set_xlabel("env steps")
        ax.set_ylabel("mean evaluation return")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_grid(todo: list[tuple[str, str, int]], args: argparse.Namespace) -> list[str]:
    """Run the (algo, env, seed) runs of ``todo``, each resumed from its checkpoint when an earlier
    attempt left one, and write the record of each as soon as it finishes; returns the runs that failed
    (named, with their logs)."""
    from rl_zoo3.utils import EnvironmentName

    keys = {run_name(*key): key for key in todo}
    logs = {name: args.out / "runs" / f"{name}.log" for name in keys}
    resumes = {name: resume_point(log) for name, log in logs.items()}
    jobs = []
    for name, key in keys.items():
        resume = resumes[name][0] if resumes[name] is not None else None
        if resume is not None:
            print(f"{name}: resuming {resume} from its latest checkpoint", flush=True)
        jobs.append(Job(name, train_command(*key, args, resume=resume), logs[name]))

    def record(job: Job, code: int, seconds: float) -> None:
        found = log_paths(job.log)
        if code != 0 or not found:
            return  # not recorded: the next invocation resumes it from its checkpoint, or runs it again
        algo, env_id, seed = keys[job.name]
        trained = saved_timesteps(Path(found[-1]) / f"{EnvironmentName(env_id)}.zip")  # the zoo's name for its final save
        if trained is None or trained < args.n_timesteps:  # the zoo saves and exits 0 when interrupted
            print(f"{job.name}: stopped at {trained} of {args.n_timesteps} env steps, not recorded; a rerun resumes it", flush=True)
            return
        earlier = resumes[job.name][1] if resumes[job.name] is not None else 0.0
        record = dict(algo=algo, env=env_id, seed=seed, log_path=found[-1], wall_clock_s=earlier + seconds,
                      **protocol(algo, args))  # fmt: skip
        (args.out / "runs" / f"{job.name}.json").write_text(json.dumps(record, indent=1))

    outcomes = run_jobs(jobs, args.jobs, status=progress_line, status_every=args.status_every, on_done=record)
    return [f"{job.name} (see {job.log})" for job in jobs if outcomes[job.name][0] != 0]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algos", nargs="+", default=["dreamer", "ppo"], help="zoo algorithm names (dreamer included)")
    parser.add_argument("--envs", nargs="+", default=["CartPole-v1"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--n-timesteps", type=int, help="env steps per run, the same for every algo (required to run)")
    parser.add_argument("--eval-freq", type=int, default=1000, help="env steps between evaluations")
    parser.add_argument("--eval-episodes", type=int, default=10)
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel, each pinned to its own core while cores remain")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--log-folder", type=Path, default=Path("logs"), help="the zoo's -f (made absolute, so a rerun from another directory finds its runs)")
    parser.add_argument("--out", type=Path, default=Path("zoo_benchmark"))
    parser.add_argument("--checkpoint-every", type=int, default=1,
                        help="a resumable checkpoint after every K-th evaluation (0: none); a rerun continues a stopped run from it")  # fmt: skip
    parser.add_argument("--report-only", action="store_true",
                        help="start nothing: write the CSV, table and plot from the runs so far (unfinished ones marked)")  # fmt: skip
    parser.add_argument("--status-every", type=float, default=600.0, help="seconds between progress lines of running runs")
    parser.add_argument("--params", nargs="*", default=None, help="overrides of Dreamer's hyperparameters (zoo -params key:value); the baselines keep the zoo's own")
    args = parser.parse_args(argv)
    args.algos, args.envs, args.seeds = (list(dict.fromkeys(x)) for x in (args.algos, args.envs, args.seeds))  # each once
    failed: list[str] = []
    if args.n_timesteps is None and not args.report_only:
        parser.error("--n-timesteps is required (the budget of every run), unless --report-only")
    if not args.report_only and (errors := argument_errors(args)):
        parser.error("; ".join(errors))
    (args.out / "runs").mkdir(parents=True, exist_ok=True)

    pairs = [(a, e) for a in args.algos for e in args.envs]
    reasons = {pair: skip_reason(*pair) for pair in pairs}
    for (algo, env_id), reason in reasons.items():
        if reason is not None:
            print(f"skipped {algo} on {env_id}: {reason}", flush=True)
    grid = [(a, e, s) for a, e in pairs if reasons[a, e] is None for s in args.seeds]
    todo = [(a, e, s) for a, e, s in grid if not (args.out / "runs" / f"{run_name(a, e, s)}.json").exists()]
    if not args.report_only:
        check_protocol([key for key in grid if key not in todo], args)
        check_resumable(todo, args)
        print(f"{len(todo)} run(s) to do, {len(grid) - len(todo)} already done in {args.out}", flush=True)
        failed = run_grid(todo, args)

    runs = load_runs(args.out, args.algos, args.envs, args.seeds)
    check_distinct_log_paths(runs)
    if args.report_only and (mixed := mixed_protocols(runs)):
        print(f"warning: this report mixes runs of different protocols (compare them with care):\n{mixed}", file=sys.stderr)
    if not runs:
        raise SystemExit(f"No evaluations yet in {args.out}; see the .log files in {args.out / 'runs'}")
    write_csv(runs, args.out / "evaluations.csv")
    table = results_table(runs)
    (args.out / "results.md").write_text(table + "\n")
    plot_curves(runs, args.out / "curves.png")
    print(table)
    print(f"\nwrote {args.out / 'evaluations.csv'}, {args.out / 'results.md'}, {args.out / 'curves.png'}")
    if failed:
        raise SystemExit(f"{len(failed)} run(s) failed, not finished in the report: {', '.join(failed)}")


if __name__ == "__main__":
    main()
