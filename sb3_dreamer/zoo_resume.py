"""Resumable zoo runs: a checkpoint after evaluations, and a stopped run continued in its own folder.

    python -m sb3_dreamer.zoo train --algo dreamer --env LunarLander-v3 --eval-freq 5000 --checkpoint-every 1
    python -m sb3_dreamer.zoo train --algo dreamer --env LunarLander-v3 --eval-freq 5000 --checkpoint-every 1 \\
        --resume logs/dreamer/LunarLander-v3_1          # the same budget (-n); continues where it stopped

A checkpoint is taken right after an evaluation, so a resumed run evaluates at the same env steps
as an uninterrupted one. It is a folder ``<run>/checkpoint_<steps>/`` holding ``model.zip`` (also
linked as ``<run>/rl_model_<steps>_steps.zip``, where the zoo's ``enjoy --load-last-checkpoint`` looks),
``replay_buffer.pkl`` (off-policy algorithms and Dreamer), ``<Env>/vecnormalize.pkl`` (when the
env is normalised), ``evaluations.npz`` (the evaluations so far: the run's own file is rewritten in
place at every evaluation, so a stop can cut it), ``best_model.zip`` (a copy of the best model so far,
given back on a resume: :func:`restore_best_model`) and, written last, ``progress.json``: a folder without it is incomplete and
ignored. Older checkpoints are deleted once a newer one is complete, so a stop at any moment leaves
one complete checkpoint. Resuming keeps ``evaluations.npz`` up to the checkpoint's step, keeps the
earlier training-episode log beside the new one (``*.monitor.csv``, as SB3's ``load_results``
reads them), and continues ``num_timesteps`` to the run's budget. It is not bit-identical to an
uninterrupted run: the env is reset, and the random generators are seeded with the run's seed plus
the checkpoint's env steps (so they do not replay the streams of the run's start), which keeps a
resumed run reproducible. A resumable run holds ``<run>/run.lock`` while it trains, so a second
process cannot resume it meanwhile (:func:`hold_run_lock`).
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import time
import warnings
import zipfile
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from stable_baselines3.common.callbacks import BaseCallback, EvalCallback

PROGRESS = "progress.json"
EVALUATIONS = "evaluations.npz"  # the name of SB3's EvalCallback file, in the run folder and in a checkpoint
BEST_MODEL = "best_model.zip"  # EvalCallback's best model, in its best_model_save_path and in a checkpoint

# The zoo arguments a resumed attempt must share with the run's first: its evaluations (and so its
# curve and checkpoints), its seed, the hyperparameter overrides (``-params``), which the zoo
# would otherwise apply to the loaded model, and the env's arguments (``--env-kwargs``,
# ``--eval-env-kwargs``). The budget (-n) may be raised.
RESUMED_ARGS = ("seed", "eval_freq", "eval_episodes", "n_eval_envs", "hyperparams", "env_kwargs", "eval_env_kwargs")


LOCK = "run.lock"
_held_locks: list[Any] = []  # the open lock files of this process (see hold_run_lock)


def hold_run_lock(run_folder: str | Path) -> None:
    """Hold an exclusive lock on ``<run_folder>/run.lock`` for the rest of this process, so that a
    second process cannot resume a run that is still training (it would move the monitor file the
    first writes to, and each would delete the other's checkpoints). The OS releases the lock when
    the process ends, however it ends, so a stopped run's folder is never left locked. Where there
    is no ``fcntl`` (Windows) nothing is locked.

    :raises RuntimeError: another process holds the lock
    """
    try:
        import fcntl
    except ImportError:
        return
    path = Path(run_folder) / LOCK
    lock_file = open(path, "a")
    try:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock_file.close()
        raise RuntimeError(
            f"{run_folder} is being trained by another process (it holds {path}): let that process finish or stop it "
            "before resuming this run"
        ) from None
    _held_locks.append(lock_file)


def latest_checkpoint(run_folder: str | Path) -> Path | None:
    """The complete ``checkpoint_<steps>`` folder of ``run_folder`` with the most env steps (None if none)."""
    complete = [p for p in Path(run_folder).glob("checkpoint_*") if (p / PROGRESS).is_file()]
    return max(complete, key=lambda p: read_progress(p)["num_timesteps"], default=None)


def read_run_args(run_folder: str | Path, env_name: str) -> dict[str, Any] | None:
    """The zoo arguments a run was started with (its ``<Env>/args.yml``, which the zoo writes as a
    Python OrderedDict, as its own ``enjoy`` reads it); None if the file is missing."""
    path = Path(run_folder) / env_name / "args.yml"
    if not path.is_file():
        return None
    import yaml

    with open(path) as f:
        return dict(yaml.load(f, Loader=yaml.UnsafeLoader))


def run_seed(run_folder: str | Path) -> int | None:
    """The seed a run began with (its ``<Env>/args.yml``), for a ``--resume`` that gives none; None if not recorded."""
    for path in sorted(Path(run_folder).glob("*/args.yml")):
        seed = (read_run_args(run_folder, path.parent.name) or {}).get("seed")
        if seed is not None:
            return int(seed)
    return None


def run_budget(run_folder: str | Path, env_name: str, started_args: dict[str, Any] | None) -> int | None:
    """The budget a run began with: the ``-n`` of its ``started_args`` (its args.yml) when given, else
    the ``n_timesteps`` of its hyperparameters (its config.yml); None when neither is recorded."""
    n_timesteps = (started_args or {}).get("n_timesteps")
    if n_timesteps is not None and int(n_timesteps) > 0:
        return int(n_timesteps)
    config = read_run_config(run_folder, env_name) or {}
    return int(float(config["n_timesteps"])) if config.get("n_timesteps") is not None else None


def differences(recorded: dict[str, Any], wanted: dict[str, Any], label: str, keys: Iterable[str] | None = None) -> list[str]:
    """``"<key> <recorded> (<label>: <wanted>)"`` for each of ``keys`` (default: those of ``wanted``)
    whose recorded value differs from the wanted one; a key missing from ``recorded`` (written before
    it was recorded) is not compared."""
    return [
        f"{key} {recorded[key]!r} ({label}: {wanted.get(key)!r})"
        for key in (wanted if keys is None else keys)
        if key in recorded and recorded[key] != wanted.get(key)
    ]


def read_run_config(run_folder: str | Path, env_name: str) -> dict[str, Any] | None:
    """The hyperparameters a run was started with (its ``<Env>/config.yml``: the zoo's YAML entry with
    an Optuna trial's values and ``-params`` applied); None if the file is missing."""
    path = Path(run_folder) / env_name / "config.yml"
    if not path.is_file():
        return None
    import yaml

    with open(path) as f:
        return dict(yaml.load(f, Loader=yaml.UnsafeLoader))


def config_mismatches(started: dict[str, Any], resumed: dict[str, Any]) -> list[str]:
    """The hyperparameters that differ between those a run ``started`` with and those the attempt
    that would resume it reads (``-conf`` file, Optuna trial, ``-params``), as ``"<key> <started>
    (this command: <resumed>)"``; ``n_timesteps`` is left out (the budget, given by ``-n``, may grow)."""
    keys = sorted((started.keys() | resumed.keys()) - {"n_timesteps"})
    return [
        f"{key} {started.get(key)!r} (this command: {resumed.get(key)!r})" for key in keys if started.get(key) != resumed.get(key)
    ]


def resume_mismatches(started: dict[str, Any], resumed: dict[str, Any]) -> list[str]:
    """Which of :data:`RESUMED_ARGS` differ between the arguments a run ``started`` with and those
    of the attempt that would resume it (``{name: value}``; one missing from ``started`` is not compared)."""
    return differences(started, resumed, "this command", RESUMED_ARGS)


def resumed_seed(seed: int, steps: int) -> int:
    """The seed of a run resumed at env step ``steps``: its own plus the steps, so the random streams
    do not replay the run's start; modulo 2**32, where numpy's seeds end (a run started without
    ``--seed`` gets a random one, which may lie near that end)."""
    return (seed + steps) % 2**32


def read_progress(checkpoint: str | Path) -> dict[str, Any]:
    """``{"num_timesteps": int, "wall_clock_s": float}`` of a checkpoint folder."""
    return json.loads((Path(checkpoint) / PROGRESS).read_text())


class CheckpointAfterEvaluation(BaseCallback):
    """Save a resumable checkpoint after every ``every``-th evaluation (an ``EvalCallback``'s
    ``callback_after_eval``) into ``<run_folder>/checkpoint_<steps>/``.

    :param run_folder: the zoo's run folder (``logs/<algo>/<Env>_<N>``)
    :param env_name: the env's folder name inside the checkpoint, where the zoo looks for
        ``vecnormalize.pkl`` when it loads a trained agent
    :param every: evaluations between checkpoints
    :param wall_clock_offset: seconds the run had trained before this process (a resumed run)
    """

    def __init__(self, run_folder: str | Path, env_name: str, every: int = 1, wall_clock_offset: float = 0.0):
        super().__init__()
        if every < 1:
            raise ValueError(f"checkpoint every {every} evaluations: give a positive number of evaluations")
        self.run_folder = Path(run_folder)
        self.env_name = env_name
        self.every = every
        self.wall_clock_offset = wall_clock_offset
        self.start = time.perf_counter()

    def _on_step(self) -> bool:
        if self.n_calls % self.every == 0:
            self.save()
        return True

    def save(self) -> Path:
        """Write a complete checkpoint of the model now, then delete the older ones."""
        folder = self.run_folder / f"checkpoint_{self.num_timesteps}"
        if folder.exists():
            shutil.rmtree(folder)  # an incomplete one from a stopped attempt
        folder.mkdir(parents=True)
        self.model.save(folder / "model")
        if getattr(self.model, "replay_buffer", None) is not None and hasattr(self.model, "save_replay_buffer"):
            self.model.save_replay_buffer(folder / "replay_buffer.pkl")
        vec_normalize = self.model.get_vec_normalize_env()
        if vec_normalize is not None:
            (folder / self.env_name).mkdir()
            vec_normalize.save(str(folder / self.env_name / "vecnormalize.pkl"))
        if isinstance(self.parent, EvalCallback):
            save_evaluations(self.parent, folder / EVALUATIONS)
            best = best_model_path(self.parent)
            if best is not None and best.is_file():  # EvalCallback rewrites it in place: a copy, not a link
                shutil.copy2(best, folder / BEST_MODEL)
        progress = {"num_timesteps": self.num_timesteps, "wall_clock_s": self.wall_clock_offset + time.perf_counter() - self.start}
        tmp = folder / (PROGRESS + ".tmp")
        tmp.write_text(json.dumps(progress))
        os.replace(tmp, folder / PROGRESS)  # the checkpoint is complete from here on
        link_as_zoo_checkpoint(folder)
        for old in self.run_folder.glob("checkpoint_*"):
            if old != folder:
                unlink_zoo_checkpoint(old)
                shutil.rmtree(old)
        return folder


def zoo_checkpoint_path(checkpoint: Path) -> Path:
    """Where the zoo looks for a checkpoint's model (``enjoy`` / ``record_video`` ``--load-checkpoint
    <steps>`` or ``--load-last-checkpoint``, ``record_training``): ``<run>/rl_model_<steps>_steps.zip``,
    the name of SB3's ``CheckpointCallback`` (the zoo's ``--save-freq``)."""
    return checkpoint.parent / f"rl_model_{checkpoint.name.removeprefix('checkpoint_')}_steps.zip"


def link_as_zoo_checkpoint(checkpoint: Path) -> None:
    """Make a checkpoint's ``model.zip`` also the zoo's checkpoint of its step (:func:`zoo_checkpoint_path`),
    as a hard link (no second copy on disk); left alone where a file of that name exists (the zoo's
    own ``--save-freq`` checkpoint of that step) or the file system has no hard links."""
    link = zoo_checkpoint_path(checkpoint)
    if not link.exists():
        try:
            os.link(checkpoint / "model.zip", link)
        except OSError as error:  # resuming does not need the link: say so, and go on
            warnings.warn(f"{checkpoint} was not linked as {link.name} ({error}): the zoo's enjoy does not see it",
                          stacklevel=2)  # fmt: skip


def unlink_zoo_checkpoint(checkpoint: Path) -> None:
    """Remove the zoo's name for a checkpoint about to be deleted, only if it is that checkpoint's own
    hard link (never a ``--save-freq`` checkpoint of the same step)."""
    link, model = zoo_checkpoint_path(checkpoint), checkpoint / "model.zip"
    if link.is_file() and model.is_file() and os.path.samefile(link, model):
        link.unlink()


def save_evaluations(eval_callback: EvalCallback, path: Path) -> None:
    """Write ``eval_callback``'s evaluations so far to ``path`` as its own ``evaluations.npz`` (the same arrays)."""
    successes = {"successes": eval_callback.evaluations_successes} if eval_callback.evaluations_successes else {}
    with open(path, "wb") as f:  # an open file: np.savez would append ".npz" to a name without it
        np.savez(f, timesteps=eval_callback.evaluations_timesteps, results=eval_callback.evaluations_results,
                 ep_lengths=eval_callback.evaluations_length, **successes)  # fmt: skip


def read_evaluations(path: str | Path, retries: int = 0, wait_s: float = 0.2) -> dict[str, np.ndarray] | None:
    """The arrays of an ``evaluations.npz``, read at once; None where the file cannot be read (the
    run rewriting it in place, or a stop that cut it), after ``retries`` more tries ``wait_s`` apart."""
    for attempt in range(retries + 1):
        try:
            with np.load(path) as data:
                return {key: data[key] for key in data.files}
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile):
            if attempt < retries:
                time.sleep(wait_s)
    return None


def restore_evaluations(eval_callback: EvalCallback, npz_path: str | Path, up_to: int, checkpoint: Path | None = None) -> None:
    """Give ``eval_callback`` the evaluations at or before env step ``up_to``, so it appends to them
    instead of overwriting the file with the resumed run's alone: from the ``checkpoint``'s own copy
    where it has one, else from the run's ``npz_path`` (ValueError if that is unreadable)."""
    if checkpoint is not None and (checkpoint / EVALUATIONS).is_file():
        npz_path = checkpoint / EVALUATIONS
    if not Path(npz_path).is_file():
        return
    data = read_evaluations(npz_path, retries=2)
    if data is None:
        raise ValueError(
            f"{npz_path} cannot be read (cut by the stop while the run rewrote it?) and {checkpoint} has no copy of "
            f"the evaluations: move the file aside to resume without the evaluations up to step {up_to}"
        )
    keep = data["timesteps"] <= up_to
    eval_callback.evaluations_timesteps = data["timesteps"][keep].tolist()
    eval_callback.evaluations_results = data["results"][keep].tolist()
    eval_callback.evaluations_length = data["ep_lengths"][keep].tolist()
    if "successes" in data:
        eval_callback.evaluations_successes = data["successes"][keep].tolist()
    if keep.any():
        eval_callback.best_mean_reward = float(np.max(np.mean(data["results"][keep], axis=1)))


def best_model_path(eval_callback: EvalCallback) -> Path | None:
    """Where ``eval_callback`` saves its best model, or None where it saves none."""
    folder = eval_callback.best_model_save_path
    return None if folder is None else Path(folder) / BEST_MODEL


def restore_best_model(eval_callback: EvalCallback, checkpoint: Path) -> None:
    """Give a resumed run the best model of the evaluations it keeps (those up to ``checkpoint``): a
    ``best_model.zip`` the stopped attempt saved after the checkpoint came from an evaluation the
    resumed run discards, so it moves to ``best_model.after_<steps>.discarded[.<n>].zip`` and the
    checkpoint's copy comes back. A checkpoint written before checkpoints kept a copy has none to give
    back: then ``best_model.zip`` returns at the next evaluation that beats the kept ones (a warning
    says so)."""
    best = best_model_path(eval_callback)
    if best is None:
        return
    copy = checkpoint / BEST_MODEL
    progress = checkpoint / PROGRESS
    saved_after = best.is_file() and best.stat().st_mtime > progress.stat().st_mtime
    if saved_after or (best.is_file() and copy.is_file() and best.read_bytes() != copy.read_bytes()):
        steps = checkpoint.name.removeprefix("checkpoint_")
        aside, n = best.with_name(f"best_model.after_{steps}.discarded.zip"), 2
        while aside.exists():  # resumed from this checkpoint before: keep that attempt's too
            aside, n = best.with_name(f"best_model.after_{steps}.discarded.{n}.zip"), n + 1
        os.replace(best, aside)
        if not copy.is_file():
            warnings.warn(
                f"{best} was saved after {checkpoint.name} by the stopped attempt, from an evaluation this resume "
                f"discards: moved to {aside.name}. The checkpoint holds no copy of the best model before it, so "
                f"{best.name} comes back at the next evaluation above {eval_callback.best_mean_reward:g}",
                stacklevel=2,
            )
    if copy.is_file() and not best.is_file():
        shutil.copy2(copy, best)


def keep_earlier_monitor_logs(run_folder: str | Path, resumed_at: int) -> None:
    """Keep the training episodes of the attempts before a resume at ``resumed_at`` env steps apart
    from the resumed run's, as SB3's ``load_results`` reads them (every ``*monitor.csv``):
    ``<i>.monitor.csv`` becomes ``<i>.before_<steps>.monitor.csv`` with the episodes that ended by the
    checkpoint, and the episodes the stopped attempt ran after it (trained again by the resumed run)
    go to ``<i>.after_<steps>.discarded.csv``, which ``load_results`` does not read, so a training
    curve counts no env step twice. The env steps per env are ``resumed_at / n_envs`` (one monitor
    file per env, stepped together). Resumed twice from one checkpoint, the files are appended to."""
    current = [p for p in Path(run_folder).glob("*.monitor.csv") if "." not in p.name[: -len(".monitor.csv")]]
    n_envs = max(len(current), 1)
    steps_per_env = resumed_at // n_envs
    for path in current:
        stem = path.name[: -len(".monitor.csv")]
        lines = path.read_text().splitlines(keepends=True)
        header, rows = lines[:2], lines[2:]  # the JSON comment line and the CSV header (r,l,t,...)
        length = next(csv.reader(header[1:])).index("l") if len(header) == 2 else 1
        # This file's episodes began at the previous resume's step (its own before_<steps> file), if any.
        earlier = [int(m.group(1)) for f in Path(run_folder).glob(f"{stem}.before_*.monitor.csv")
                   if (m := re.fullmatch(rf"{re.escape(stem)}\.before_(\d+)\.monitor\.csv", f.name))]  # fmt: skip
        kept, steps = 0, max(earlier, default=0) // n_envs
        for row in rows:
            fields = next(csv.reader([row]), [])
            if len(fields) <= length or not fields[length].isdigit():
                break  # a line cut mid-write by the stop: not an episode that ended by the checkpoint
            steps += int(fields[length])
            if steps > steps_per_env:
                break
            kept += 1
        add_rows(path.with_name(f"{stem}.before_{resumed_at}.monitor.csv"), header, rows[:kept])
        if rows[kept:]:
            add_rows(path.with_name(f"{stem}.after_{resumed_at}.discarded.csv"), header, rows[kept:])
        path.unlink()


def add_rows(path: Path, header: list[str], rows: list[str]) -> None:
    """Write a monitor file of ``header`` and ``rows``, or append the rows to one already there (a run
    resumed twice from one checkpoint: the first resume's file is kept)."""
    if path.exists():
        ends_line = path.read_text().endswith("\n")
        with open(path, "a") as f:
            f.write("".join(rows) if ends_line else "\n" + "".join(rows))  # after a line cut mid-write
    else:
        path.write_text("".join(header + rows))
