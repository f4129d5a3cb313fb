"""RL Baselines3 Zoo entry point: Dreamer as ``--algo dreamer`` beside the zoo's own algorithms.

    python -m sb3_dreamer.zoo train --algo dreamer --env CartPole-v1
    python -m sb3_dreamer.zoo train --algo ppo --env CartPole-v1          # the zoo's PPO and YAML
    python -m sb3_dreamer.zoo enjoy --algo dreamer --env CartPole-v1 -f logs/
    python -m sb3_dreamer.zoo all_plots -a ppo dreamer -e CartPole-v1 -f logs/
    python -m sb3_dreamer.zoo train --algo dreamer --env CartPole-v1 --optimize --n-trials 20 \\
        --storage sqlite:///dreamer_optuna.db --study-name dreamer_cartpole
    python -m sb3_dreamer.zoo benchmark --algos dreamer ppo --envs CartPole-v1 --seeds 0 1 2

The zoo has no plugin hook, so :func:`register` adds Dreamer to its algorithm table and its
Optuna sampler table, and ``train`` with ``--algo dreamer`` and no ``--conf-file`` reads this
package's ``hyperparams/dreamer.yml`` (the zoo would look only in its own folder). Every other
argument, and every other algorithm, goes to the zoo unchanged; logs land in the zoo's
``logs/<algo>/<Env>_<N>/`` layout, with one fix: ``train`` claims its ``<Env>_<N>`` folder
atomically (:func:`claim_run_folder`), so runs started at once never share one.
"""

from __future__ import annotations

import os
import sys
from importlib import resources
from pathlib import Path
from typing import Any

COMMANDS = ("train", "enjoy", "record_video", "plot_train", "plot_from_file", "all_plots", "benchmark")


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


def _experiment_manager_claiming_its_folder() -> type:
    """The zoo's ``ExperimentManager`` whose training run claims its log folder with
    :func:`claim_run_folder` (the same ``<Env>_<N>`` layout; ``--uuid`` runs and ``--optimize``
    studies are left as the zoo names them)."""
    from rl_zoo3.exp_manager import ExperimentManager

    class ClaimingExperimentManager(ExperimentManager):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            if not self.optimize_hyperparameters and not getattr(self.args, "uuid", False):
                self.save_path = claim_run_folder(self.log_path, self.env_name)
                self.params_path = f"{self.save_path}/{self.env_name}"

    return ClaimingExperimentManager


def _algo(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg == "--algo" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--algo="):
            return arg.split("=", 1)[1]
    return None


def with_default_config(argv: list[str]) -> list[str]:
    """``train`` arguments, plus ``--conf-file <ours>`` for ``--algo dreamer`` when none is given."""
    if _algo(argv) == "dreamer" and not any(a in ("--conf-file", "-conf") or a.startswith("--conf-file=") for a in argv):
        return [*argv, "--conf-file", str(default_config_path())]
    return list(argv)


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
        args = with_default_config(args)
        import rl_zoo3.train

        rl_zoo3.train.ExperimentManager = _experiment_manager_claiming_its_folder()  # type: ignore[attr-defined]
    sys.argv = [f"sb3_dreamer.zoo {command}", *args]  # the zoo's commands parse sys.argv
    if command == "record_video":  # a script in the zoo, not a function
        import runpy

        runpy.run_module("rl_zoo3.record_video", run_name="__main__", alter_sys=False)
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
