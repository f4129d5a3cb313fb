"""RL Baselines3 Zoo entry point: Dreamer as ``--algo dreamer`` beside the zoo's own algorithms.

    python -m sb3_dreamer.zoo train --algo dreamer --env CartPole-v1
    python -m sb3_dreamer.zoo train --algo ppo --env CartPole-v1          # the zoo's PPO and YAML
    python -m sb3_dreamer.zoo enjoy --algo dreamer --env CartPole-v1 -f logs/
    python -m sb3_dreamer.zoo record_training --algo dreamer --env CartPole-v1 -f logs/ -n 500   # needs train --save-freq
    python -m sb3_dreamer.zoo load_from_hub --algo dreamer --env CartPole-v1 -orga <user> -f logs/
    python -m sb3_dreamer.zoo all_plots -a ppo dreamer -e CartPole-v1 -f logs/
    python -m sb3_dreamer.zoo train --algo dreamer --env CartPole-v1 --optimize --n-trials 20 \\
        --storage sqlite:///dreamer_optuna.db --study-name dreamer_cartpole
    python -m sb3_dreamer.zoo train --algo dreamer --env LunarLander-v3 --checkpoint-every 1   # resumable
    python -m sb3_dreamer.zoo train --algo dreamer --env LunarLander-v3 --checkpoint-every 1 \\
        --resume logs/dreamer/LunarLander-v3_1                               # continue a stopped run
    python -m sb3_dreamer.zoo benchmark --algos dreamer ppo --envs CartPole-v1 --seeds 0 1 2 \\
        --n-timesteps 30000 --eval-freq 1000 --eval-episodes 10

The zoo has no plugin hook, so :func:`register` adds Dreamer to its algorithm table and its
Optuna sampler table, and ``train`` with ``--algo dreamer`` and no ``--conf-file`` reads this
package's ``hyperparams/dreamer.yml`` (the zoo would look only in its own folder). Every other
argument, and every other algorithm, goes to the zoo unchanged; logs land in the zoo's
``logs/<algo>/<Env>_<N>/`` layout, with one fix: ``train`` claims its ``<Env>_<N>`` folder
atomically (:func:`claim_run_folder`), so runs started at once never share one. ``train`` has two
options of ours (:mod:`sb3_dreamer.zoo_resume`): ``--checkpoint-every K`` saves a resumable
checkpoint (model, replay buffer, progress) after every K-th evaluation, and ``--resume <run folder>``
continues a stopped run in its folder from its latest checkpoint to the same budget.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import inspect
import os
import sys
from importlib import resources
from pathlib import Path
from typing import Any, Iterator

COMMANDS = (
    "train", "enjoy", "record_video", "record_training", "load_from_hub",
    "plot_train", "plot_from_file", "all_plots", "benchmark",
)  # fmt: skip
SCRIPTS = ("record_video", "record_training", "load_from_hub")  # run as the zoo's __main__ modules


def default_config_path() -> Path:
    """The ``dreamer.yml`` shipped inside the package."""
    return Path(str(resources.files("sb3_dreamer") / "hyperparams" / "dreamer.yml"))


def sample_dreamer_params(trial: Any, n_actions: int, n_envs: int, additional_args: dict) -> dict[str, Any]:
    """Optuna search space for Dreamer (the zoo's ``HYPERPARAMS_SAMPLER`` signature).

    The settings DreamerV3 reports as sensitive: replay ratio, learning rate, model size, entropy
    scale, imagination horizon and the replayed batch shape.
    """
    size = trial.suggest_categorical("size", ["size400k", "size1m", "size12m"])
    params = {
        "learning_rate": trial.suggest_float("learning_rate", 3e-5, 1e-3, log=True),
        "train_ratio": trial.suggest_categorical("train_ratio", [64, 128, 256, 512, 1024]),
        "batch_size": trial.suggest_categorical("batch_size", [8, 16, 32]),
        "sequence_length": trial.suggest_categorical("sequence_length", [16, 32, 64]),
        "imagination_horizon": trial.suggest_categorical("imagination_horizon", [8, 15, 24]),
        "imagination_starts": trial.suggest_categorical("imagination_starts", [64, 256, 1024]),
        "entropy_coef": trial.suggest_float("entropy_coef", 1e-4, 1e-2, log=True),
        "return_lambda": trial.suggest_categorical("return_lambda", [0.9, 0.95, 0.98]),
    }
    return convert_dreamer_params({**params, "size": size})


def convert_dreamer_params(params: dict[str, Any]) -> dict[str, Any]:
    """A trial's flat parameters -> Dreamer keyword arguments (``size`` goes into ``policy_kwargs``)."""
    params = dict(params)
    size = params.pop("size", None)
    if size is not None:
        params["policy_kwargs"] = {**params.get("policy_kwargs", {}), "size": size}
    return params


def register() -> None:
    """Make ``dreamer`` an algorithm of the zoo (training, enjoy, Optuna). Idempotent."""
    from rl_zoo3 import hyperparams_opt, utils

    from sb3_dreamer import Dreamer

    utils.ALGOS["dreamer"] = Dreamer
    hyperparams_opt.HYPERPARAMS_SAMPLER["dreamer"] = sample_dreamer_params
    hyperparams_opt.HYPERPARAMS_CONVERTER["dreamer"] = convert_dreamer_params


def claim_run_folder(log_path: str, env_name: str) -> str:
    """Create and return ``<log_path>/<env_name>_<N>`` for the first free N above the latest run.

    The zoo picks N by listing the folders and creates the folder later, so two runs of one (algo,
    env) started at once (``benchmark --jobs``) got the same N and wrote into one folder, each
    overwriting the other's ``evaluations.npz``. ``os.mkdir`` is atomic: a run that loses the race
    takes the next N."""
    from rl_zoo3.utils import get_latest_run_id

    os.makedirs(log_path, exist_ok=True)
    run_id = get_latest_run_id(log_path, env_name) + 1
    while True:
        path = os.path.join(log_path, f"{env_name}_{run_id}")
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            run_id += 1


def _experiment_manager(checkpoint_every: int | None = None, resume: str | None = None) -> type:
    """The zoo's ``ExperimentManager`` whose training run claims its log folder with
    :func:`claim_run_folder` (the same ``<Env>_<N>`` layout; ``--uuid`` runs and ``--optimize``
    studies are left as the zoo names them), and which takes and resumes checkpoints
    (:mod:`sb3_dreamer.zoo_resume`).

    :param checkpoint_every: save a resumable checkpoint after every this many evaluations (None: never)
    :param resume: a run folder to continue, from its latest checkpoint, to the run's budget (``-n``)
    """
    from rl_zoo3.exp_manager import ExperimentManager
    from rl_zoo3.utils import ALGOS
    from stable_baselines3.common.callbacks import CallbackList, EvalCallback

    from sb3_dreamer import zoo_resume

    class ZooExperimentManager(ExperimentManager):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.resumed_from: dict[str, Any] | None = None
            self.resumed_checkpoint: Path | None = None
            if self.optimize_hyperparameters:
                if checkpoint_every is not None or resume is not None:
                    raise ValueError("--checkpoint-every and --resume are for training runs, not for --optimize studies")
                return
            if resume is not None:
                if not os.path.isdir(os.path.join(resume, self.env_name)):
                    raise ValueError(f"--resume {resume}: not a zoo run folder of {self.env_name} (no {self.env_name}/ config in it)")
                if Path(resume).resolve().parent.name != self.algo:
                    raise ValueError(f"--resume {resume}: a run folder of {Path(resume).resolve().parent.name}, not of --algo {self.algo}")
                started = zoo_resume.read_run_args(resume, self.env_name)
                if self.n_timesteps <= 0:  # no -n: the run's own budget (the YAML's n_timesteps may have changed since)
                    budget = zoo_resume.run_budget(resume, self.env_name, started)
                    if budget is not None:
                        self.n_timesteps = self.args.n_timesteps = budget  # args.yml keeps it for the next resume
                mismatches = zoo_resume.resume_mismatches(started or {}, vars(self.args))
                if mismatches:
                    raise ValueError(
                        f"--resume {resume}: the run began with other arguments than this command's: {'; '.join(mismatches)}. "
                        f"Resume it with the arguments it began with (its {self.env_name}/args.yml), or start a new run"
                    )
                zoo_resume.hold_run_lock(resume)  # before anything in the folder changes
                checkpoint = zoo_resume.latest_checkpoint(resume)
                if checkpoint is None:
                    raise ValueError(
                        f"--resume {resume}: no complete checkpoint_<steps>/ in it; a run saves them with --checkpoint-every"
                    )
                self.resumed_from = zoo_resume.read_progress(checkpoint)
                self.resumed_checkpoint = checkpoint
                self.save_path = str(resume)
                self.trained_agent = str(checkpoint / "model.zip")  # the zoo's continue-training path
                self.continue_training = True
                # Seeded anew, so the random streams (env resets, exploration, replay) do not replay the run's start.
                steps = int(self.resumed_from["num_timesteps"])
                seed = zoo_resume.resumed_seed(self.seed, steps)
                budget_note = f" to {self.n_timesteps} env steps" if self.n_timesteps > 0 else ""
                print(f"Resuming {resume} from {checkpoint.name}{budget_note}, seeded with {self.seed} + {steps}")
                self.seed = seed
                self.params_path = f"{self.save_path}/{self.env_name}"

        def read_hyperparameters(self) -> tuple[dict[str, Any], dict[str, Any]]:
            """The zoo's, refused on a resume where they differ from those the run began with (which the
            zoo would otherwise apply to the loaded model, and write over the run's config.yml)."""
            hyperparams, saved = super().read_hyperparameters()
            # A copy for the model: SB3 adds use_sde to a given policy_kwargs and the zoo gamma to a normalize
            # dict in place, and those dicts are also -params' (args.yml) and config.yml's, which a resume compares.
            hyperparams = copy.deepcopy(hyperparams)
            self._n_steps = hyperparams.get("n_steps")  # an on-policy algorithm's rollout length, if the YAML sets it
            if self.resumed_from is not None:
                started = zoo_resume.read_run_config(self.save_path, self.env_name)
                mismatches = zoo_resume.config_mismatches(started, dict(saved)) if started is not None else []
                if mismatches:
                    raise ValueError(
                        f"--resume {self.save_path}: the run began with other hyperparameters than this command reads "
                        f"(from {self.config}): {'; '.join(mismatches)}. Resume it with the -conf, --trial-id and -params it "
                        f"began with (its {self.env_name}/config.yml and args.yml), or start a new run"
                    )
            return hyperparams, saved

        def create_log_folder(self) -> None:
            # Claimed here, once the hyperparameters are read (as the zoo creates its folder), so a run
            # that fails before (no entry for the env, a wrong -conf path) leaves no empty folder behind.
            if (checkpoint_every is not None or self.resumed_from is not None) and self.eval_freq <= 0:
                raise ValueError("--checkpoint-every and --resume need evaluations (--eval-freq > 0): checkpoints follow them")
            if checkpoint_every is not None and 0 < self.eval_freq and self.steps_trained() < self.eval_freq:
                raise ValueError(
                    f"--checkpoint-every: checkpoints follow evaluations, and --eval-freq {self.eval_freq} (the zoo's "
                    f"default unless given) is past the {self.steps_trained()} env steps this run trains (budget "
                    f"{self.n_timesteps}), so none would be taken. Pass an --eval-freq within the budget (e.g. --eval-freq 5000)."
                )
            if self.resumed_from is not None:  # the checks passed (arguments, hyperparameters): the folder changes from here
                zoo_resume.keep_earlier_monitor_logs(self.save_path, self.resumed_from["num_timesteps"])
            if self.resumed_from is None and not self.optimize_hyperparameters and not getattr(self.args, "uuid", False):
                self.save_path = claim_run_folder(self.log_path, self.env_name)
                self.params_path = f"{self.save_path}/{self.env_name}"
                if checkpoint_every is not None:  # a resumable run: no second process may resume it while it trains
                    zoo_resume.hold_run_lock(self.save_path)
            super().create_log_folder()

        def steps_trained(self) -> int:
            """Env steps ``learn`` runs for the budget: an on-policy algorithm (the zoo's PPO, A2C, RecurrentPPO)
            collects whole rollouts of ``n_steps`` x ``n_envs``, so it trains past a budget that is not a multiple."""
            from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm

            algo_class = ALGOS[self.algo]
            if not issubclass(algo_class, OnPolicyAlgorithm):
                return self.n_timesteps
            n_steps = getattr(self, "_n_steps", None)
            if n_steps is None:  # the algorithm's own default
                n_steps = inspect.signature(algo_class.__init__).parameters["n_steps"].default
            rollout = int(n_steps) * self.n_envs  # the zoo's n_envs, read with the hyperparameters
            return -(-self.n_timesteps // rollout) * rollout

        def create_callbacks(self) -> None:
            super().create_callbacks()
            if self.optimize_hyperparameters or (checkpoint_every is None and self.resumed_from is None):
                return
            # Never None: create_log_folder refused --checkpoint-every and --resume without evaluations.
            evaluation = next(c for c in self.callbacks if isinstance(c, EvalCallback))
            if self.resumed_from is not None:
                steps = self.resumed_from["num_timesteps"]
                zoo_resume.restore_evaluations(
                    evaluation, os.path.join(self.save_path, zoo_resume.EVALUATIONS), up_to=steps, checkpoint=self.resumed_checkpoint
                )
                zoo_resume.restore_best_model(evaluation, self.resumed_checkpoint)
            if checkpoint_every is not None:
                offset = 0.0 if self.resumed_from is None else self.resumed_from["wall_clock_s"]
                saver = zoo_resume.CheckpointAfterEvaluation(self.save_path, self.env_name, checkpoint_every, offset)
                evaluation.callback = saver if evaluation.callback is None else CallbackList([evaluation.callback, saver])
                evaluation.callback.parent = saver.parent = evaluation  # the saver reads the evaluations (also inside a list)

        def learn(self, model: Any) -> None:
            if self.resumed_from is None:
                super().learn(model)
                return
            # The rest of the budget, counted on from the checkpoint's num_timesteps.
            self.n_timesteps = max(self.n_timesteps - model.num_timesteps, 0)
            super().learn(_ContinuingCount(model))

    return ZooExperimentManager


class _ContinuingCount:
    """``model`` whose ``learn`` continues ``num_timesteps`` (``reset_num_timesteps=False``) for the
    zoo's ``ExperimentManager.learn``. A proxy: an attribute set on the model itself would be
    pickled by every ``model.save``."""

    def __init__(self, model: Any) -> None:
        self._model = model

    def learn(self, *args: Any, **kwargs: Any) -> Any:
        return self._model.learn(*args, reset_num_timesteps=False, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


def split_resume_args(argv: list[str]) -> tuple[int | None, str | None, list[str]]:
    """``train`` arguments -> (``--checkpoint-every``, ``--resume``, the zoo's own arguments)."""
    import argparse

    parser = argparse.ArgumentParser(prog="sb3_dreamer.zoo train", allow_abbrev=False, add_help=False,
                                     description="Options of sb3_dreamer (the zoo's own follow):")  # fmt: skip
    parser.add_argument("--checkpoint-every", type=int, default=None, metavar="K",
                        help="save a resumable checkpoint (model, replay buffer, progress) after every K-th evaluation")  # fmt: skip
    parser.add_argument("--resume", default=None, metavar="RUN_FOLDER",
                        help="continue a stopped run in its folder, from its latest checkpoint, to its budget (the -n it "
                             "began with, or the n_timesteps of its config.yml; a -n given here replaces it)")  # fmt: skip
    ours, rest = parser.parse_known_args(argv)
    if "-h" in rest or "--help" in rest:
        print(parser.format_help())
    if ours.checkpoint_every is not None and ours.checkpoint_every < 1:
        raise SystemExit(f"--checkpoint-every {ours.checkpoint_every}: give a positive number of evaluations")
    return ours.checkpoint_every, ours.resume, rest


def _algo(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg == "--algo" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--algo="):
            return arg.split("=", 1)[1]
    return None


def with_default_config(argv: list[str]) -> list[str]:
    """``train`` arguments, plus ``--conf-file <ours>`` for ``--algo dreamer`` when none is given
    (in any spelling the zoo's parser takes: ``-conf F``, ``-conf=F``, ``--conf F``, ``--conf-file=F``, ...)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("-conf", "--conf-file", default=None)  # as in rl_zoo3.train, abbreviations included
    if _algo(argv) == "dreamer" and parser.parse_known_args(argv)[0].conf_file is None:
        return [*argv, "--conf-file", str(default_config_path())]
    return list(argv)


@contextlib.contextmanager
def record_video_through_this_entry_point() -> Iterator[None]:
    """While it lasts, ``subprocess.call(["python", "-m", "rl_zoo3.record_video", ...])`` (how the
    zoo's ``record_training`` records each model) runs ``python -m sb3_dreamer.zoo record_video ...``
    with this interpreter instead: a process of the zoo's own would not know ``--algo dreamer``, and
    ``python`` on the PATH may not be this environment's. Other calls are unchanged."""
    import subprocess

    call = subprocess.call

    def redirected(args: Any, *rest: Any, **kwargs: Any) -> int:
        if isinstance(args, list) and args[:3] == ["python", "-m", "rl_zoo3.record_video"]:
            args = [sys.executable, "-m", "sb3_dreamer.zoo", "record_video", *args[3:]]
        return call(args, *rest, **kwargs)

    subprocess.call = redirected  # type: ignore[assignment]
    try:
        yield
    finally:
        subprocess.call = call  # type: ignore[assignment]


@contextlib.contextmanager
def ffmpeg_on_path() -> Iterator[None]:
    """While it lasts, an ``ffmpeg`` command on the PATH: the zoo's ``record_training`` runs
    ``ffmpeg`` by name to caption and join its videos, and fails without it. When the system has
    none, the binary of ``imageio-ffmpeg`` (which moviepy, the zoo's video writer, installs) is linked
    as ``ffmpeg`` in a temporary folder put first on the PATH."""
    import shutil
    import tempfile

    if shutil.which("ffmpeg") is not None:
        yield
        return
    try:
        import imageio_ffmpeg
    except ImportError as error:
        raise SystemExit(
            "record_training needs ffmpeg: install it (apt install ffmpeg) or `pip install imageio-ffmpeg`"
        ) from error
    path = os.environ.get("PATH", "")
    with tempfile.TemporaryDirectory(prefix="sb3_dreamer_ffmpeg_") as folder:
        os.symlink(imageio_ffmpeg.get_ffmpeg_exe(), os.path.join(folder, "ffmpeg"))
        os.environ["PATH"] = folder + os.pathsep + path
        try:
            yield
        finally:
            os.environ["PATH"] = path


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        raise SystemExit(f"usage: python -m sb3_dreamer.zoo {{{','.join(COMMANDS)}}} [arguments of that zoo command]")
    command, args = argv[0], argv[1:]
    if command == "benchmark":
        from sb3_dreamer import zoo_benchmark

        zoo_benchmark.main(args)
        return
    register()
    if command == "train":
        checkpoint_every, resume, args = split_resume_args(args)
        if resume is not None and not any(a == "--seed" or a.startswith("--seed=") for a in args):
            from sb3_dreamer.zoo_resume import run_seed

            seed = run_seed(resume)  # else the zoo draws a random seed, which the resume would refuse
            if seed is not None:
                print(f"--resume {resume}: no --seed given, taking the run's seed {seed}")
                args = [*args, "--seed", str(seed)]
        args = with_default_config(args)
        import rl_zoo3.train

        rl_zoo3.train.ExperimentManager = _experiment_manager(checkpoint_every, resume)  # type: ignore[attr-defined]
    sys.argv = [f"sb3_dreamer.zoo {command}", *args]  # the zoo's commands parse sys.argv
    if command in SCRIPTS:  # scripts in the zoo, not functions
        import runpy

        with contextlib.ExitStack() as stack:
            if command == "record_training":  # it runs record_video processes and ffmpeg
                stack.enter_context(record_video_through_this_entry_point())
                stack.enter_context(ffmpeg_on_path())
            runpy.run_module(f"rl_zoo3.{command}", run_name="__main__", alter_sys=False)
        return
    import importlib

    module, function = {
        "train": ("rl_zoo3.train", "train"),
        "enjoy": ("rl_zoo3.enjoy", "enjoy"),
        "plot_train": ("rl_zoo3.plots", "plot_train"),
        "plot_from_file": ("rl_zoo3.plots", "plot_from_file"),
        "all_plots": ("rl_zoo3.plots", "all_plots"),
    }[command]
    getattr(importlib.import_module(module), function)()

if __name__ == "__main__":
    main()
