"""The RL Zoo entry point: registration, our YAML, train/enjoy/optimize through the zoo, the grid benchmark."""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from sb3_dreamer import Dreamer
from sb3_dreamer.zoo import convert_dreamer_params, default_config_path, register, sample_dreamer_params, with_default_config

TINY = "policy_kwargs:dict(deter=32,hidden=16,units=16,stoch=4,classes=4,blocks=2)"
ZOO_KEYS = {"n_timesteps", "policy", "normalize", "n_envs", "env_wrapper", "frame_stack", "callback"}


def zoo(*args: str, cwd: Path, timeout: int = 300) -> str:
    """Run ``python -m sb3_dreamer.zoo ARGS`` in a fresh process (the zoo parses sys.argv and keeps globals)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "sb3_dreamer.zoo", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_register_keeps_the_zoos_own_algorithms():
    from rl_zoo3 import hyperparams_opt, utils

    before = dict(utils.ALGOS), dict(hyperparams_opt.HYPERPARAMS_SAMPLER)
    register()
    register()  # idempotent
    assert utils.ALGOS["dreamer"] is Dreamer
    assert {k: v for k, v in utils.ALGOS.items() if k != "dreamer"} == {k: v for k, v in before[0].items() if k != "dreamer"}
    assert hyperparams_opt.HYPERPARAMS_SAMPLER["ppo"] is before[1]["ppo"]
    assert hyperparams_opt.HYPERPARAMS_SAMPLER["dreamer"] is sample_dreamer_params


def test_default_config_is_added_only_for_dreamer():
    assert with_default_config(["--algo", "dreamer", "--env", "CartPole-v1"])[-2:] == ["--conf-file", str(default_config_path())]
    assert with_default_config(["--algo", "ppo", "--env", "CartPole-v1"]) == ["--algo", "ppo", "--env", "CartPole-v1"]
    for given in (["--conf-file", "mine.yml"], ["-conf", "mine.yml"], ["-conf=mine.yml"], ["--conf", "mine.yml"],
                  ["--conf-file=mine.yml"], ["--conf=mine.yml"]):  # fmt: skip
        mine = ["--algo", "dreamer", *given]
        assert with_default_config(mine) == mine, given


def test_repository_yaml_is_the_packaged_one():
    repo_yaml = Path(__file__).parent.parent / "hyperparams" / "dreamer.yml"
    assert repo_yaml.read_text() == default_config_path().read_text()


@pytest.mark.parametrize("env_id", [k for k in yaml.safe_load(default_config_path().read_text()) if k not in ("default", "atari")])
def test_every_yaml_entry_builds_a_model(env_id):
    import rl_zoo3.import_envs  # noqa: F401  (registers the NoVel envs)

    hyperparams = yaml.safe_load(default_config_path().read_text())[env_id]
    assert "n_timesteps" in hyperparams
    kwargs = {k: v for k, v in hyperparams.items() if k not in ZOO_KEYS}
    model = Dreamer(hyperparams["policy"], env_id, **kwargs)
    assert type(model.policy).__name__ == hyperparams["policy"]


def test_atari_entry_trains_and_enjoys_through_the_zoo(tmp_path):
    # The zoo reads the "atari" entry for every Atari game (KeyError 'atari' without one): Dreamer's wrapping,
    # unclipped rewards and no frame stack, one 64 x 64 grayscale frame per observation.
    pytest.importorskip("ale_py", reason='Atari needs pip install "sb3-dreamer[atari]"')
    pytest.importorskip("cv2", reason='Atari needs pip install "sb3-dreamer[atari]"')
    tiny_cnn = TINY.replace(")", ",depth=4)")
    common = ["--env", "PongNoFrameskip-v4", "-f", "logs", "--device", "cpu"]
    out = zoo("train", "--algo", "dreamer", *common, "-n", "100", "--eval-freq", "1000", "--seed", "0",
              "-params", "learning_starts:64", "train_ratio:16", tiny_cnn, cwd=tmp_path)  # fmt: skip
    assert "Stacking" not in out
    config = (tmp_path / "logs" / "dreamer" / "PongNoFrameskip-v4_1" / "PongNoFrameskip-v4" / "config.yml").read_text()
    assert "clip_reward: false" in config and "CnnLatentPolicy" in config
    model = Dreamer.load(tmp_path / "logs" / "dreamer" / "PongNoFrameskip-v4_1" / "PongNoFrameskip-v4.zip", device="cpu")
    assert model.observation_space.shape == (1, 64, 64) and model.num_timesteps == 100
    zoo("enjoy", "--algo", "dreamer", *common, "-n", "30", "--no-render", cwd=tmp_path)  # the run's wrapping, reloaded


def test_optuna_sampler_gives_valid_dreamer_kwargs():
    import optuna

    trial = optuna.trial.FixedTrial(
        dict(size="size400k", learning_rate=1e-4, train_ratio=128, batch_size=8, sequence_length=16, imagination_horizon=8,
             imagination_starts=64, entropy_coef=1e-3, return_lambda=0.95)
    )  # fmt: skip
    kwargs = sample_dreamer_params(trial, n_actions=1, n_envs=1, additional_args={})
    assert kwargs["policy_kwargs"] == {"size": "size400k"} and "size" not in kwargs
    assert {k: v for k, v in kwargs.items() if k != "policy_kwargs"} == {k: v for k, v in trial.params.items() if k != "size"}
    Dreamer("MlpLatentPolicy", "Pendulum-v1", **kwargs)
    assert convert_dreamer_params({"size": "size1m", "train_ratio": 64}) == {"train_ratio": 64, "policy_kwargs": {"size": "size1m"}}


def test_train_and_enjoy_through_the_zoo(tmp_path):
    common = ["--env", "CartPole-v1", "-n", "300", "--eval-freq", "150", "--eval-episodes", "2", "--n-eval-envs", "1",
              "--seed", "0", "--device", "cpu", "-f", "logs"]  # fmt: skip
    zoo("train", "--algo", "dreamer", *common, "-params", "learning_starts:100", "train_ratio:16", TINY, cwd=tmp_path)
    zoo("train", "--algo", "ppo", *common, cwd=tmp_path)
    data = np.load(tmp_path / "logs" / "dreamer" / "CartPole-v1_1" / "evaluations.npz")
    assert list(data["timesteps"]) == [150, 300] and data["results"].shape == (2, 2)
    data = np.load(tmp_path / "logs" / "ppo" / "CartPole-v1_1" / "evaluations.npz")  # 8 envs: every 18 x 8 steps
    assert len(data["timesteps"]) >= 2 and data["results"].shape[1] == 2
    out = zoo("enjoy", "--algo", "dreamer", "--env", "CartPole-v1", "-f", "logs", "-n", "60", "--no-render", "--device", "cpu", cwd=tmp_path)
    assert "Episode Reward" in out


def test_record_training_records_every_checkpoint_of_a_dreamer_run(tmp_path):
    # The zoo's record_training runs its record_video in new processes ("python -m rl_zoo3.record_video"),
    # which would not know dreamer; ours runs them through sb3_dreamer.zoo, and finds an ffmpeg.
    zoo("train", "--algo", "dreamer", "--env", "CartPole-v1", "-n", "200", "--eval-freq", "100", "--eval-episodes", "1",
        "--n-eval-envs", "1", "--save-freq", "200", "--seed", "0", "--device", "cpu", "-f", "logs",
        "-params", "learning_starts:100", "train_ratio:16", TINY, cwd=tmp_path)  # fmt: skip
    zoo("record_training", "--algo", "dreamer", "--env", "CartPole-v1", "-f", "logs", "-n", "10", "--deterministic", cwd=tmp_path)
    videos = tmp_path / "logs" / "dreamer" / "CartPole-v1_1" / "videos"
    names = {p.name for p in videos.iterdir()}
    for model in ("checkpoint-200", "final-model", "best-model"):
        assert f"{model}-dreamer-CartPole-v1-step-0-to-step-10.mp4" in names, names
    assert (videos / "training.mp4").stat().st_size > 0  # the joined video (ffmpeg)


def test_load_from_hub_knows_dreamer(tmp_path):
    # Offline here, so only its arguments: the zoo's own script refuses --algo dreamer (not in its choices).
    out = zoo("load_from_hub", "--help", cwd=tmp_path)
    algo_help = out[out.index("--algo") :]
    assert "dreamer" in algo_help[: algo_help.index("}")] and "ppo" in algo_help[: algo_help.index("}")]


def test_optimize_with_sqlite_storage(tmp_path):
    # The sampled parameters replace the tiny ones; the zoo seeds its sampler with --seed, and seed 7's
    # first trial is small and quick (size1m, train_ratio 64, B32 x T16, 64 starts, horizon 8), where an
    # unseeded one may draw size12m at train_ratio 1024 and take many minutes on a CPU.
    zoo("train", "--algo", "dreamer", "--env", "CartPole-v1", "-optimize", "--n-trials", "1", "--n-jobs", "1",
        "-n", "120", "--n-evaluations", "1", "--eval-episodes", "1", "--device", "cpu", "--storage", "sqlite:///study.db",
        "--study-name", "tiny", "--seed", "7", "-params", "learning_starts:60", TINY, cwd=tmp_path)  # fmt: skip
    import optuna

    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'study.db'}")
    assert len(study.trials) == 1 and "train_ratio" in study.trials[0].params


def test_grid_benchmark_writes_csv_table_and_png(tmp_path):
    from sb3_dreamer.zoo_benchmark import checkpointed_seconds

    out = zoo("benchmark", "--algos", "dreamer", "ppo", "sac", "--envs", "CartPole-v1", "--seeds", "0", "--n-timesteps", "200",
              "--eval-freq", "100", "--eval-episodes", "2", "--device", "cpu", "--out", "bench",
              "--params", "learning_starts:80", "train_ratio:16", TINY, cwd=tmp_path)  # fmt: skip
    bench = tmp_path / "bench"
    csv_lines = (bench / "evaluations.csv").read_text().splitlines()
    assert csv_lines[0] == "algo,env,seed,timesteps,mean_return,std_return,finished" and len(csv_lines) == 1 + 2 * 2
    table = (bench / "results.md").read_text()
    assert "| dreamer | CartPole-v1 (475) |" in table and "| ppo | CartPole-v1 (475) |" in table and "IQM" in table
    assert (bench / "curves.png").stat().st_size > 10_000
    assert "skipped sac on CartPole-v1: The algorithm only supports" in out and "| sac |" not in table  # SAC has no Discrete entry
    again = zoo("benchmark", "--algos", "dreamer", "ppo", "--envs", "CartPole-v1", "--seeds", "0", "--n-timesteps", "200",
                "--eval-freq", "100", "--eval-episodes", "2", "--out", "bench",
                "--params", "learning_starts:80", "train_ratio:16", TINY, cwd=tmp_path)  # fmt: skip
    assert "0 run(s) to do, 2 already done" in again and "started" not in again and "started" in out
    # Finished runs of another protocol are not skipped into this one's table: refused, with the fix.
    other = subprocess.run(
        [sys.executable, "-m", "sb3_dreamer.zoo", "benchmark", "--algos", "dreamer", "ppo", "--envs", "CartPole-v1",
         "--seeds", "0", "--n-timesteps", "300", "--eval-freq", "100", "--eval-episodes", "2", "--out", "bench"],
        cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert other.returncode != 0 and "recorded with another protocol" in other.stderr
    assert "dreamer_CartPole-v1_seed0: n_timesteps 200 (here: 300), params" in other.stderr
    assert "ppo_CartPole-v1_seed0: n_timesteps 200 (here: 300)\n" in other.stderr  # the baselines keep the zoo's own
    # A run stopped before its budget (here: its record removed, the budget raised) goes on from its checkpoint.
    record = json.loads((bench / "runs" / "dreamer_CartPole-v1_seed0.json").read_text())
    (bench / "runs" / "dreamer_CartPole-v1_seed0.json").unlink()
    trained_before = checkpointed_seconds(str(tmp_path / record["log_path"]))  # the first attempt's, at its checkpoint
    resumed = zoo("benchmark", "--algos", "dreamer", "--envs", "CartPole-v1", "--seeds", "0", "--n-timesteps", "300",
                  "--eval-freq", "100", "--eval-episodes", "2", "--device", "cpu", "--out", "bench",
                  "--params", "learning_starts:80", "train_ratio:16", TINY, cwd=tmp_path)  # fmt: skip
    assert f"dreamer_CartPole-v1_seed0: resuming {record['log_path']} from its latest checkpoint" in resumed
    again = json.loads((bench / "runs" / "dreamer_CartPole-v1_seed0.json").read_text())
    # Its wall-clock counts both attempts: the first one's up to its checkpoint (the first record's figure was that
    # whole process's, startup included, so it is no lower bound) and the resumed one's.
    assert again["log_path"] == record["log_path"] and again["wall_clock_s"] > trained_before > 0
    assert list(np.load(tmp_path / record["log_path"] / "evaluations.npz")["timesteps"]) == [100, 200, 300]


def test_claim_run_folder_takes_the_next_free_number(tmp_path, monkeypatch):
    from sb3_dreamer.zoo import claim_run_folder

    log_path = str(tmp_path / "ppo")
    assert claim_run_folder(log_path, "CartPole-v1") == os.path.join(log_path, "CartPole-v1_1")
    (tmp_path / "ppo" / "CartPole-v1_5").mkdir()
    assert claim_run_folder(log_path, "CartPole-v1") == os.path.join(log_path, "CartPole-v1_6")
    # A run that listed the folders before another created its own (the zoo's race) takes the next N.
    monkeypatch.setattr("rl_zoo3.utils.get_latest_run_id", lambda path, env_name: 0)
    assert claim_run_folder(log_path, "CartPole-v1") == os.path.join(log_path, "CartPole-v1_2")
    assert claim_run_folder(log_path, "CartPole-v1") == os.path.join(log_path, "CartPole-v1_3")


def test_grid_runs_started_at_once_log_to_distinct_folders(tmp_path):
    """Two seeds of one (algo, env) started together (--jobs 2) used to be given one zoo folder."""
    zoo("benchmark", "--algos", "ppo", "--envs", "CartPole-v1", "--seeds", "0", "1", "--n-timesteps", "200",
        "--eval-freq", "100", "--eval-episodes", "1", "--device", "cpu", "--jobs", "2", "--out", "bench", cwd=tmp_path)  # fmt: skip
    folders = sorted(p.name for p in (tmp_path / "logs" / "ppo").iterdir())
    assert folders == ["CartPole-v1_1", "CartPole-v1_2"]
    paths = {json.loads(p.read_text())["log_path"] for p in (tmp_path / "bench" / "runs").glob("*.json")}
    assert len(paths) == 2


def test_benchmark_refuses_unknown_algos_envs_and_params_before_any_run(tmp_path, capsys):
    from sb3_dreamer.zoo_benchmark import main

    bench = ["--seeds", "0", "--n-timesteps", "100", "--out", str(tmp_path)]
    with pytest.raises(SystemExit):
        main(["--algos", "dreamer", "foo", "--envs", "CartPole-v1", "NoSuchEnv-v0", "--params", "train_ratio:8", "foo", *bench])
    err = capsys.readouterr().err
    assert "unknown algo 'foo'; the zoo's algorithms: a2c" in err and "dreamer" in err and "unknown env 'NoSuchEnv-v0'" in err
    assert "--params takes key:value items (the zoo's -params), got 'foo'" in err and "train_ratio" not in err
    assert "--eval-freq 1000 evaluates no run within --n-timesteps 100" in err
    assert not (tmp_path / "runs").exists()  # nothing started
    with pytest.raises(SystemExit):  # --jobs 0 hung (no run ever started), a negative seed failed in every run
        main(["--algos", "ppo", "--envs", "CartPole-v1", "--seeds", "-1", "--n-timesteps", "100", "--eval-freq", "50",
              "--jobs", "0", "--eval-episodes", "0", "--out", str(tmp_path)])  # fmt: skip
    err = capsys.readouterr().err
    assert "--jobs must be at least 1, got 0" in err and "--eval-episodes must be at least 1, got 0" in err
    assert "seeds must be in 0..4294967295 (numpy's range), got [-1]" in err and not (tmp_path / "runs").exists()


def test_benchmark_exits_with_an_error_naming_failed_runs_and_runs_each_once(tmp_path, capsys, monkeypatch):
    import sb3_dreamer.zoo_benchmark as zoo_benchmark

    def fail_every_run(jobs, parallel, **kwargs):
        return {job.name: (1, 1.0) for job in jobs}

    monkeypatch.setattr(zoo_benchmark, "run_jobs", fail_every_run)
    with pytest.raises(SystemExit, match="No evaluations yet"):  # nothing to report: an error as before
        zoo_benchmark.main(["--algos", "ppo", "ppo", "--envs", "CartPole-v1", "--seeds", "0", "0", "--n-timesteps", "100",
                            "--eval-freq", "50", "--out", str(tmp_path)])  # fmt: skip
    assert "1 run(s) to do" in capsys.readouterr().out
    monkeypatch.setattr(zoo_benchmark, "load_runs", lambda *args: [dict(algo="ppo", env="CartPole-v1", seed=0)])
    for name in ("check_distinct_log_paths", "write_csv", "plot_curves"):
        monkeypatch.setattr(zoo_benchmark, name, lambda *args: None)
    monkeypatch.setattr(zoo_benchmark, "results_table", lambda runs: "| table |")
    with pytest.raises(SystemExit, match=r"1 run\(s\) failed, not finished in the report: ppo_CartPole-v1_seed0 \(see "):
        zoo_benchmark.main(["--algos", "ppo", "--envs", "CartPole-v1", "--seeds", "0", "--n-timesteps", "100",
                            "--eval-freq", "50", "--out", str(tmp_path)])  # fmt: skip
    assert (tmp_path / "results.md").read_text() == "| table |\n"  # the report of the runs there is, still written


def test_benchmark_refuses_runs_that_share_a_log_folder():
    from sb3_dreamer.zoo_benchmark import check_distinct_log_paths

    runs = [dict(algo="ppo", env="CartPole-v1", seed=s, log_path="logs/ppo/CartPole-v1_1") for s in (0, 1)]
    with pytest.raises(ValueError, match="share a zoo log folder"):
        check_distinct_log_paths(runs)
    check_distinct_log_paths([dict(runs[0]), dict(runs[1], log_path="logs/ppo/CartPole-v1_2")])


def test_a_run_resumes_from_its_checkpoint_in_its_own_folder(tmp_path):
    from stable_baselines3.common.monitor import load_results

    from sb3_dreamer.zoo_benchmark import train_args
    from sb3_dreamer.zoo_resume import RESUMED_ARGS, read_progress, read_run_args, resume_mismatches

    common = ["--algo", "dreamer", "--env", "CartPole-v1", "--eval-freq", "100", "--eval-episodes", "2", "--n-eval-envs", "1",
              "--seed", "0", "--device", "cpu", "-f", "logs", "--checkpoint-every", "1"]  # fmt: skip
    params = ["-params", "learning_starts:80", "train_ratio:16", TINY]
    zoo("train", *common, "-n", "300", *params, cwd=tmp_path)
    run = tmp_path / "logs" / "dreamer" / "CartPole-v1_1"
    assert sorted(p.name for p in run.glob("checkpoint_*")) == ["checkpoint_300"]  # older ones deleted
    assert {p.name for p in (run / "checkpoint_300").iterdir()} == {"model.zip", "replay_buffer.pkl", "evaluations.npz", "best_model.zip", "progress.json"}
    for key in ("timesteps", "results", "ep_lengths"):  # its copy of the evaluations so far
        np.testing.assert_array_equal(np.load(run / "checkpoint_300" / "evaluations.npz")[key], np.load(run / "evaluations.npz")[key])
    assert (run / "checkpoint_300" / "best_model.zip").read_bytes() == (run / "best_model.zip").read_bytes()
    assert read_progress(run / "checkpoint_300")["num_timesteps"] == 300
    assert sorted(p.name for p in run.glob("rl_model_*")) == ["rl_model_300_steps.zip"]  # the zoo's name for it
    assert os.path.samefile(run / "rl_model_300_steps.zip", run / "checkpoint_300" / "model.zip")
    out = zoo("enjoy", "--algo", "dreamer", "--env", "CartPole-v1", "-f", "logs", "-n", "20", "--no-render", "--device", "cpu",
              "--load-last-checkpoint", cwd=tmp_path)  # fmt: skip
    assert "rl_model_300_steps.zip" in out
    first_buffer = Dreamer.load(run / "checkpoint_300" / "model.zip")
    first_buffer.load_replay_buffer(run / "checkpoint_300" / "replay_buffer.pkl", truncate_last_traj=False)
    first = first_buffer.replay_buffer
    episodes = len(load_results(str(run)))

    # A resumed attempt keeps the run's evaluations, seed and -params (the budget may grow): refused otherwise.
    started = read_run_args(run, "CartPole-v1")
    assert started is not None and started["eval_freq"] == 100 and started["hyperparams"]["train_ratio"] == 16
    assert resume_mismatches(started, dict(started, n_timesteps=500)) == []
    assert resume_mismatches(started, dict(started, eval_freq=50)) == ["eval_freq 100 (this command: 50)"]
    # The benchmark predicts the arguments its train command gives a run as the zoo records them.
    protocol = argparse.Namespace(n_timesteps=300, eval_freq=100, eval_episodes=2, params=params[1:], log_folder=Path("logs"),
                                  device="cpu", checkpoint_every=1)  # fmt: skip
    assert train_args("dreamer", "CartPole-v1", 0, protocol) == {name: started[name] for name in RESUMED_ARGS}
    other = [*common[: common.index("--eval-freq")], "--eval-freq", "50", *common[common.index("--eval-freq") + 2 :]]
    refused = subprocess.run(
        [sys.executable, "-m", "sb3_dreamer.zoo", "train", *other, "-n", "500", "--resume", str(run), *params],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"),
    )  # fmt: skip
    assert refused.returncode != 0 and "the run began with other arguments than this command's: eval_freq 100" in refused.stderr
    # Another hyperparameter file (or Optuna trial) would change the loaded model's settings: refused too.
    (tmp_path / "other.yml").write_text("CartPole-v1:\n  n_timesteps: 10000\n  policy: MlpLatentPolicy\n  normalize: false\n  gamma: 0.99\n")
    refused = subprocess.run(
        [sys.executable, "-m", "sb3_dreamer.zoo", "train", *common, "-n", "500", "--resume", str(run), "-conf", "other.yml", *params],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"),
    )  # fmt: skip
    assert refused.returncode != 0 and "other hyperparameters than this command reads" in refused.stderr
    assert "gamma None (this command: 0.99)" in refused.stderr
    assert "gamma" not in (run / "CartPole-v1" / "config.yml").read_text()  # the run's record of its settings kept
    # A run still training (a process holding its run.lock) is not resumed beside it.
    import fcntl

    with open(run / "run.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        refused = subprocess.run(
            [sys.executable, "-m", "sb3_dreamer.zoo", "train", *common, "-n", "500", "--resume", str(run), *params],
            cwd=tmp_path, capture_output=True, text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"),
        )  # fmt: skip
    assert refused.returncode != 0 and "is being trained by another process" in refused.stderr
    assert (run / "0.monitor.csv").is_file() and not list(run.glob("0.before_*"))  # nothing moved
    assert sorted(p.name for p in run.glob("checkpoint_*")) == ["checkpoint_300"]  # untouched

    out = zoo("train", *common, "-n", "500", "--resume", str(run), *params, cwd=tmp_path)
    assert f"Resuming {run} from checkpoint_300 to 500 env steps, seeded with 0 + 300" in out
    assert sorted(p.name for p in (tmp_path / "logs" / "dreamer").iterdir()) == ["CartPole-v1_1"]  # no new folder
    assert list(np.load(run / "evaluations.npz")["timesteps"]) == [100, 200, 300, 400, 500]
    assert Dreamer.load(run / "CartPole-v1.zip").num_timesteps == 500
    assert sorted(p.name for p in run.glob("checkpoint_*")) == ["checkpoint_500"]
    assert sorted(p.name for p in run.glob("rl_model_*")) == ["rl_model_500_steps.zip"]  # the old link went with its checkpoint
    model = Dreamer.load(run / "checkpoint_500" / "model.zip")
    model.load_replay_buffer(run / "checkpoint_500" / "replay_buffer.pkl", truncate_last_traj=False)
    resumed = model.replay_buffer
    rows = int(first.count[0])
    assert resumed.count[0] >= rows + 200  # the first attempt's rows are kept, then the new ones
    np.testing.assert_array_equal(resumed.actions[:rows], first.actions[:rows])
    assert len(load_results(str(run))) > episodes  # both attempts' training episodes
    # Without -n, a resume keeps the run's budget (the -n it was last given, recorded in its args.yml), not the YAML's 1e4;
    # without --seed, the run's seed (the zoo would draw a random one, which the resume refuses).
    unseeded = [*common[: common.index("--seed")], *common[common.index("--seed") + 2 :]]
    out = zoo("train", *unseeded, "--resume", str(run), *params, cwd=tmp_path)
    assert "no --seed given, taking the run's seed 0" in out
    assert f"Resuming {run} from checkpoint_500 to 500 env steps" in out
    assert list(np.load(run / "evaluations.npz")["timesteps"]) == [100, 200, 300, 400, 500]
    assert read_run_args(run, "CartPole-v1")["n_timesteps"] == 500


def test_run_budget_reads_args_then_config(tmp_path):
    from sb3_dreamer.zoo_resume import run_budget

    (tmp_path / "CartPole-v1").mkdir()
    assert run_budget(tmp_path, "CartPole-v1", None) is None
    (tmp_path / "CartPole-v1" / "config.yml").write_text("!!python/object/apply:collections.OrderedDict\n- - - n_timesteps\n    - 20000.0\n")
    assert run_budget(tmp_path, "CartPole-v1", {"n_timesteps": -1}) == 20000  # started without -n: its YAML's budget
    assert run_budget(tmp_path, "CartPole-v1", {"n_timesteps": 700}) == 700


def test_a_run_whose_params_dicts_sb3_fills_in_resumes(tmp_path):
    """SB3 adds use_sde to a given policy_kwargs in place: the run's records keep -params as given, so the same
    command resumes it (it was refused, the records differing from the command)."""
    common = ["--algo", "sac", "--env", "Pendulum-v1", "--eval-freq", "100", "--eval-episodes", "1", "--n-eval-envs", "1",
              "--seed", "0", "--device", "cpu", "-f", "logs", "--checkpoint-every", "1",
              "-params", "policy_kwargs:dict(net_arch=[16])", "learning_starts:50"]  # fmt: skip
    zoo("train", *common, "-n", "200", cwd=tmp_path)
    run = tmp_path / "logs" / "sac" / "Pendulum-v1_1"
    assert "use_sde" not in (run / "Pendulum-v1" / "args.yml").read_text()
    zoo("train", *common, "-n", "300", "--resume", str(run), cwd=tmp_path)
    assert list(np.load(run / "evaluations.npz")["timesteps"]) == [100, 200, 300]


def test_checkpoint_every_counts_the_whole_rollouts_an_on_policy_algo_trains(tmp_path):
    """The zoo's PPO on CartPole-v1 trains rollouts of 8 envs x 32 steps: -n 100 trains 256 steps and evaluates at 200."""
    zoo("train", "--algo", "ppo", "--env", "CartPole-v1", "-n", "100", "--eval-freq", "200", "--eval-episodes", "1",
        "--n-eval-envs", "1", "--device", "cpu", "-f", "logs", "--checkpoint-every", "1", cwd=tmp_path)  # fmt: skip
    assert [p.name for p in (tmp_path / "logs" / "ppo" / "CartPole-v1_1").glob("checkpoint_*")] == ["checkpoint_200"]


def test_train_fails_early_without_leaving_a_run_folder(tmp_path):
    """--checkpoint-every without evaluations, or with them past the budget, would take no checkpoint: refused. A run that
    fails before its hyperparameters are read (no entry for the env) claims no folder, as the zoo."""
    def train(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "sb3_dreamer.zoo", "train", "--env", "CartPole-v1", "--device", "cpu", "-f", "logs", *args],
            cwd=tmp_path, capture_output=True, text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"),
        )  # fmt: skip

    proc = train("--algo", "dreamer", "-n", "300", "--checkpoint-every", "1")  # the zoo's --eval-freq: 25000
    assert proc.returncode != 0 and "--eval-freq 25000" in proc.stderr and "past the 300 env steps this run trains" in proc.stderr
    proc = train("--algo", "dreamer", "-n", "300", "--checkpoint-every", "1", "--eval-freq", "0")
    assert proc.returncode != 0 and "need evaluations (--eval-freq > 0)" in proc.stderr
    (tmp_path / "pendulum_only.yml").write_text("Pendulum-v1:\n  n_timesteps: 100\n  policy: MlpPolicy\n")
    proc = train("--algo", "ppo", "-conf", "pendulum_only.yml")
    assert proc.returncode != 0 and "Hyperparameters not found" in proc.stderr
    assert not list((tmp_path / "logs").glob("*/CartPole-v1_*"))


def test_resume_needs_a_complete_checkpoint(tmp_path):
    from sb3_dreamer.zoo_benchmark import resume_point, train_command
    from sb3_dreamer.zoo_resume import latest_checkpoint

    run = tmp_path / "logs" / "ppo" / "CartPole-v1_1"
    (run / "CartPole-v1").mkdir(parents=True)
    (run / "checkpoint_200").mkdir()
    (run / "checkpoint_200" / "progress.json").write_text('{"num_timesteps": 200, "wall_clock_s": 12.5}')
    (run / "checkpoint_300").mkdir()  # stopped while saving: no progress.json
    assert latest_checkpoint(run) == run / "checkpoint_200"
    log = tmp_path / "ppo_CartPole-v1_seed0.log"
    log.write_text(f"Log path: {tmp_path / 'old'}\nLog path: {run}\n")
    assert resume_point(log) == (str(run), 12.5)
    assert resume_point(tmp_path / "missing.log") is None
    args = argparse.Namespace(n_timesteps=500, eval_freq=100, eval_episodes=2, log_folder=Path("logs"), device="cpu",
                              checkpoint_every=1, params=None)  # fmt: skip
    command = train_command("ppo", "CartPole-v1", 0, args, resume=str(run))
    assert command[command.index("--resume") + 1] == str(run) and "--checkpoint-every" in command

    empty = tmp_path / "logs" / "ppo" / "CartPole-v1_2"
    (empty / "CartPole-v1").mkdir(parents=True)
    proc = subprocess.run(
        [sys.executable, "-m", "sb3_dreamer.zoo", "train", "--algo", "ppo", "--env", "CartPole-v1", "-n", "100",
         "--device", "cpu", "--resume", str(empty)],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"),
    )  # fmt: skip
    assert proc.returncode != 0 and "no complete checkpoint_<steps>/ in it" in proc.stderr


def test_benchmark_refuses_up_front_to_continue_runs_begun_with_other_arguments(tmp_path):
    from sb3_dreamer.zoo_benchmark import check_resumable

    run = tmp_path / "logs" / "dreamer" / "CartPole-v1_1"
    (run / "CartPole-v1").mkdir(parents=True)
    (run / "checkpoint_200").mkdir()
    (run / "checkpoint_200" / "progress.json").write_text('{"num_timesteps": 200, "wall_clock_s": 12.5}')
    started = dict(seed=0, eval_freq=100, eval_episodes=2, n_eval_envs=1, hyperparams={"train_ratio": 16}, n_timesteps=300)
    (run / "CartPole-v1" / "args.yml").write_text(yaml.dump(started))
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "dreamer_CartPole-v1_seed0.log").write_text(f"Log path: {run}\n")
    todo = [("dreamer", "CartPole-v1", 0), ("dreamer", "CartPole-v1", 1)]  # seed 1 has no run yet: starts afresh
    same = argparse.Namespace(out=tmp_path, n_timesteps=300, eval_freq=100, eval_episodes=2, params=["train_ratio:16"],
                              log_folder=tmp_path / "logs", device="cpu", checkpoint_every=1)  # fmt: skip
    check_resumable(todo, same)
    with pytest.raises(SystemExit, match=r"dreamer_CartPole-v1_seed0 \(.*CartPole-v1_1\): hyperparams \{'train_ratio': 16\} "
                       r"\(this command: \{'train_ratio': 8\}\)"):  # fmt: skip
        check_resumable(todo, argparse.Namespace(**dict(vars(same), params=["train_ratio:8"])))
    with pytest.raises(SystemExit, match="eval_episodes 2 \\(this command: 5\\)"):
        check_resumable(todo, argparse.Namespace(**dict(vars(same), eval_episodes=5)))


def test_resume_keeps_the_training_episodes_up_to_the_checkpoint(tmp_path):
    """A stopped attempt's episodes after the checkpoint are trained again by the resumed run: they go
    to a file load_results does not read, so no env step is counted twice; nothing is deleted."""
    from stable_baselines3.common.monitor import load_results

    from sb3_dreamer.zoo_resume import keep_earlier_monitor_logs

    head = '#{"t_start": 0.0, "env_id": "CartPole-v1"}\nr,l,t\n'
    (tmp_path / "0.monitor.csv").write_text(head + "3.0,3,0.1\n4.0,4,0.2\n5.0,5,0.3\n6.0,6,0.4\n")
    keep_earlier_monitor_logs(tmp_path, resumed_at=8)  # episodes ending at 3 and 7 came before step 8
    assert load_results(str(tmp_path))["l"].tolist() == [3, 4]
    assert (tmp_path / "0.after_8.discarded.csv").read_text() == head + "5.0,5,0.3\n6.0,6,0.4\n"
    # The resumed attempt's file counts from step 8; resumed again at 20: it keeps 5 and 6 (8 + 11 <= 20), drops 9.
    (tmp_path / "0.monitor.csv").write_text(head + "5.0,5,0.1\n6.0,6,0.2\n9.0,9,0.3\n7.0,")  # the last line cut mid-write
    keep_earlier_monitor_logs(tmp_path, resumed_at=20)
    assert sorted(load_results(str(tmp_path))["l"].tolist()) == [3, 4, 5, 6]
    assert (tmp_path / "0.after_20.discarded.csv").read_text() == head + "9.0,9,0.3\n7.0,"
    # Stopped again before the next checkpoint and resumed from the same one: nothing overwritten.
    (tmp_path / "0.monitor.csv").write_text(head + "2.0,2,0.1\n")
    keep_earlier_monitor_logs(tmp_path, resumed_at=20)
    assert sorted(load_results(str(tmp_path))["l"].tolist()) == [3, 4, 5, 6]
    assert (tmp_path / "0.after_20.discarded.csv").read_text() == head + "9.0,9,0.3\n7.0,\n2.0,2,0.1\n"


def test_restore_evaluations_keeps_those_up_to_the_checkpoint(tmp_path):
    import gymnasium as gym
    from stable_baselines3.common.callbacks import EvalCallback

    from sb3_dreamer.zoo_resume import restore_evaluations

    np.savez(tmp_path / "evaluations.npz", timesteps=np.array([100, 200, 300]), results=np.array([[1.0, 3.0], [5.0, 7.0], [9.0, 9.0]]),
             ep_lengths=np.array([[1, 3], [5, 7], [9, 9]]))  # fmt: skip
    callback = EvalCallback(gym.make("CartPole-v1"))
    restore_evaluations(callback, tmp_path / "evaluations.npz", up_to=200)  # 300 came after the checkpoint
    assert callback.evaluations_timesteps == [100, 200]
    assert callback.evaluations_results == [[1.0, 3.0], [5.0, 7.0]] and callback.evaluations_length == [[1, 3], [5, 7]]
    assert callback.best_mean_reward == 6.0


def test_resume_gives_back_the_best_model_of_the_kept_evaluations(tmp_path):
    """A best_model.zip the stopped attempt saved after the checkpoint came from an evaluation the
    resume discards: moved aside, and the checkpoint's copy comes back (without a copy: a warning)."""
    import gymnasium as gym
    from stable_baselines3.common.callbacks import EvalCallback

    from sb3_dreamer.zoo_resume import restore_best_model

    callback = EvalCallback(gym.make("CartPole-v1"), best_model_save_path=str(tmp_path))
    checkpoint = tmp_path / "checkpoint_200"
    checkpoint.mkdir()
    (checkpoint / "progress.json").write_text('{"num_timesteps": 200, "wall_clock_s": 1.0}')
    os.utime(checkpoint / "progress.json", (1_000, 1_000))
    (tmp_path / "best_model.zip").write_bytes(b"at 100")
    os.utime(tmp_path / "best_model.zip", (900, 900))
    restore_best_model(callback, checkpoint)  # saved before the checkpoint: kept
    assert (tmp_path / "best_model.zip").read_bytes() == b"at 100" and not list(tmp_path.glob("*.discarded.zip"))

    (tmp_path / "best_model.zip").write_bytes(b"at 300")  # saved now, after the checkpoint
    with pytest.warns(UserWarning, match="saved after checkpoint_200 .* no copy of the best model before it"):
        restore_best_model(callback, checkpoint)
    assert not (tmp_path / "best_model.zip").exists()
    assert (tmp_path / "best_model.after_200.discarded.zip").read_bytes() == b"at 300"

    (checkpoint / "best_model.zip").write_bytes(b"at 100")  # a checkpoint with its copy
    (tmp_path / "best_model.zip").write_bytes(b"at 400")
    restore_best_model(callback, checkpoint)
    assert (tmp_path / "best_model.zip").read_bytes() == b"at 100"
    assert (tmp_path / "best_model.after_200.discarded.zip").read_bytes() == b"at 300"  # the first discarded one kept
    assert (tmp_path / "best_model.after_200.discarded.2.zip").read_bytes() == b"at 400"
    restore_best_model(EvalCallback(gym.make("CartPole-v1")), checkpoint)  # no best_model_save_path: nothing to do


def test_resumed_seed_stays_within_numpys_range():
    from sb3_dreamer.zoo_resume import resumed_seed

    assert resumed_seed(0, 300) == 300
    assert resumed_seed(2**32 - 2, 5000) == 4998  # a random seed near the end, as the zoo draws one without --seed
    np.random.seed(resumed_seed(2**32 - 2, 5000))


def test_run_lock_is_held_by_one_process_and_released_when_it_ends(tmp_path):
    from sb3_dreamer.zoo_resume import hold_run_lock

    hold_run_lock(tmp_path)
    with pytest.raises(RuntimeError, match="is being trained by another process"):
        hold_run_lock(tmp_path)  # another open of the lock file: refused, as another process would be
    script = f"from sb3_dreamer.zoo_resume import hold_run_lock; hold_run_lock({str(tmp_path / 'other')!r})"
    (tmp_path / "other").mkdir()
    for _ in range(2):  # a process that ended left the folder free for the next
        subprocess.run([sys.executable, "-c", script], check=True, timeout=60)


def test_restore_evaluations_reads_the_checkpoints_copy_when_the_runs_file_was_cut(tmp_path):
    """EvalCallback rewrites evaluations.npz in place, so a stop can leave it cut: a resume reads the
    checkpoint's copy (checkpoints before it had none: then a clear error, not a bare BadZipFile)."""
    import gymnasium as gym
    from stable_baselines3.common.callbacks import EvalCallback

    from sb3_dreamer.zoo_resume import restore_evaluations

    arrays = dict(timesteps=np.array([100, 200]), results=np.array([[1.0], [5.0]]), ep_lengths=np.array([[1], [5]]))
    np.savez(tmp_path / "full.npz", **arrays)
    (tmp_path / "evaluations.npz").write_bytes((tmp_path / "full.npz").read_bytes()[:150])  # cut mid-write
    checkpoint = tmp_path / "checkpoint_200"
    checkpoint.mkdir()
    callback = EvalCallback(gym.make("CartPole-v1"))
    with pytest.raises(ValueError, match="cannot be read .* move the file aside to resume without the evaluations up to step 200"):
        restore_evaluations(callback, tmp_path / "evaluations.npz", up_to=200, checkpoint=checkpoint)
    np.savez(checkpoint / "evaluations.npz", **arrays)
    restore_evaluations(callback, tmp_path / "evaluations.npz", up_to=200, checkpoint=checkpoint)
    assert callback.evaluations_timesteps == [100, 200] and callback.best_mean_reward == 5.0


def test_report_leaves_out_a_running_jobs_file_caught_mid_write(tmp_path, capsys):
    """--report-only beside a training grid: an evaluations.npz being rewritten is left out of that
    report (a finished run's unreadable file is an error naming the fix)."""
    from sb3_dreamer.zoo_benchmark import load_runs

    bench = tmp_path / "bench"
    (bench / "runs").mkdir(parents=True)
    for seed in (0, 1):
        folder = tmp_path / "logs" / f"CartPole-v1_{seed + 1}"
        folder.mkdir(parents=True)
        np.savez(folder / "evaluations.npz", timesteps=np.array([1000]), results=np.array([[480.0]]), ep_lengths=np.ones((1, 1)))
        (bench / "runs" / f"dreamer_CartPole-v1_seed{seed}.log").write_text(f"Log path: {folder}\n")
    cut = tmp_path / "logs" / "CartPole-v1_2" / "evaluations.npz"
    cut.write_bytes(cut.read_bytes()[:150])
    runs = load_runs(bench, ["dreamer"], ["CartPole-v1"], [0, 1])
    assert [run["seed"] for run in runs] == [0] and "is being written; left out of this report" in capsys.readouterr().err
    record = dict(algo="dreamer", env="CartPole-v1", seed=1, log_path=str(cut.parent), wall_clock_s=60.0)
    (bench / "runs" / "dreamer_CartPole-v1_seed1.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match="cannot be read .*restore it .*or delete the record and its log"):
        load_runs(bench, ["dreamer"], ["CartPole-v1"], [0, 1])


def test_running_jobs_report_their_latest_evaluation(tmp_path, capsys):
    from sb3_dreamer.launcher import Job, run_jobs
    from sb3_dreamer.zoo_benchmark import progress_line

    run = tmp_path / "logs" / "dreamer" / "CartPole-v1_1"
    run.mkdir(parents=True)
    log = tmp_path / "dreamer_CartPole-v1_seed0.log"
    job = Job("dreamer_CartPole-v1_seed0", [sys.executable, "-c", f"print('Log path: {run}', flush=True); import time; time.sleep(3)"], log)
    assert progress_line(job) is None  # nothing logged yet
    np.savez(run / "evaluations.npz", timesteps=np.array([100, 200]), results=np.array([[10.0, 30.0], [5.0, 7.0]]),
             ep_lengths=np.array([[10, 30], [5, 7]]))  # fmt: skip
    done = []
    results = run_jobs([job], parallel=1, status=progress_line, status_every=0.0, on_done=lambda *args: done.append(args))
    assert results[job.name][0] == 0 and done == [(job, 0, results[job.name][1])]
    out = capsys.readouterr().out
    assert "dreamer_CartPole-v1_seed0 (" in out and "200 env steps, last evaluation 6.0, best 20.0" in out
    assert log.read_text().startswith("=== ")  # each attempt's command heads its output


def test_report_reads_evaluations_within_the_budget_only(tmp_path):
    """PPO trains whole rollouts, so its last evaluations can lie past -n: they are left out."""
    from sb3_dreamer.zoo_benchmark import main

    bench, folder = tmp_path / "bench", tmp_path / "logs" / "ppo" / "CartPole-v1_1"
    (bench / "runs").mkdir(parents=True)
    folder.mkdir(parents=True)
    np.savez(folder / "evaluations.npz", timesteps=np.array([992, 1984, 2976]), results=np.array([[100.0], [200.0], [500.0]]),
             ep_lengths=np.ones((3, 1)))  # fmt: skip
    record = dict(algo="ppo", env="CartPole-v1", seed=0, log_path=str(folder), wall_clock_s=5.0, n_timesteps=2000)
    (bench / "runs" / "ppo_CartPole-v1_seed0.json").write_text(json.dumps(record))
    main(["--algos", "ppo", "--envs", "CartPole-v1", "--seeds", "0", "--out", str(bench), "--report-only"])
    assert "| ppo | CartPole-v1 (475) | unsolved | unsolved | 200 |" in (bench / "results.md").read_text()
    assert "2976" not in (bench / "evaluations.csv").read_text()


def test_report_only_warns_when_runs_of_different_protocols_are_mixed(tmp_path, capsys):
    from sb3_dreamer.zoo_benchmark import main

    bench = tmp_path / "bench"
    (bench / "runs").mkdir(parents=True)
    for seed, budget in enumerate([1000, 1000, 2000]):
        folder = tmp_path / "logs" / f"CartPole-v1_{seed + 1}"
        folder.mkdir(parents=True)
        np.savez(folder / "evaluations.npz", timesteps=np.array([1000]), results=np.array([[480.0]]), ep_lengths=np.ones((1, 1)))
        record = dict(algo="dreamer", env="CartPole-v1", seed=seed, log_path=str(folder), wall_clock_s=60.0, n_timesteps=budget,
                      eval_freq=1000, eval_episodes=10)  # fmt: skip
        (bench / "runs" / f"dreamer_CartPole-v1_seed{seed}.json").write_text(json.dumps(record))
    report = ["--algos", "dreamer", "--envs", "CartPole-v1", "--out", str(bench), "--report-only"]
    main([*report, "--seeds", "0", "1"])
    assert "mixes runs of different protocols" not in capsys.readouterr().err
    main([*report, "--seeds", "0", "1", "2"])
    err = capsys.readouterr().err
    assert "this report mixes runs of different protocols" in err
    assert "n_timesteps 1000, eval_freq 1000, eval_episodes 10: dreamer_CartPole-v1_seed0, dreamer_CartPole-v1_seed1" in err
    assert "n_timesteps 2000, eval_freq 1000, eval_episodes 10: dreamer_CartPole-v1_seed2" in err
    # Dreamer's --params are part of its protocol; the baselines run without any.
    for seed, params in enumerate([["train_ratio:512"], ["train_ratio:512"], ["train_ratio:32"]]):
        path = bench / "runs" / f"dreamer_CartPole-v1_seed{seed}.json"
        path.write_text(json.dumps(dict(json.loads(path.read_text()), n_timesteps=1000, params=params)))
    main([*report, "--seeds", "0", "1"])
    assert "mixes runs of different protocols" not in capsys.readouterr().err
    main([*report, "--seeds", "0", "1", "2"])
    err = capsys.readouterr().err
    assert "dreamer --params train_ratio:512: dreamer_CartPole-v1_seed0, dreamer_CartPole-v1_seed1" in err
    assert "dreamer --params train_ratio:32: dreamer_CartPole-v1_seed2" in err and "n_timesteps 2000" not in err


def test_report_marks_runs_not_finished(tmp_path):
    """A stopped run (a log naming its zoo folder, no record) is read at its latest evaluation and marked."""
    from sb3_dreamer.zoo_benchmark import main

    bench = tmp_path / "bench"
    (bench / "runs").mkdir(parents=True)
    for seed, (returns, finished) in enumerate([([100.0, 300.0, 480.0], True), ([50.0, 200.0], False), ([480.0], False)]):
        folder = tmp_path / "logs" / f"CartPole-v1_{seed + 1}"
        folder.mkdir(parents=True)
        np.savez(folder / "evaluations.npz", timesteps=1000 * np.arange(1, len(returns) + 1), results=np.array(returns)[:, None],
                 ep_lengths=np.ones((len(returns), 1)))  # fmt: skip
        (bench / "runs" / f"dreamer_CartPole-v1_seed{seed}.log").write_text(f"Log path: {folder}\n")
        if finished:
            record = dict(algo="dreamer", env="CartPole-v1", seed=seed, log_path=str(folder), wall_clock_s=60.0)
            (bench / "runs" / f"dreamer_CartPole-v1_seed{seed}.json").write_text(json.dumps(record))
    main(["--algos", "dreamer", "--envs", "CartPole-v1", "--seeds", "0", "1", "2", "--out", str(bench), "--report-only"])
    table = (bench / "results.md").read_text()
    assert "| dreamer | CartPole-v1 (475) | 3k, >2k*, 1k | 3k* | 480, 200*, 480* |" in table and "| 60 s |" in table
    assert "not finished" in table
    assert (bench / "evaluations.csv").read_text().splitlines()[-1] == "dreamer,CartPole-v1,2,1000,480.000,0.000,0"
    assert not list((bench / "runs").glob("*seed1.json"))  # a report starts and records nothing


def test_a_run_that_exits_before_its_budget_is_not_recorded(tmp_path, monkeypatch, capsys):
    """The zoo saves the model and exits 0 when training is interrupted: only a full budget counts."""
    from sb3_dreamer import zoo_benchmark

    def fake_train(algo, env_id, seed, args, resume=None):
        folder = tmp_path / "logs" / "ppo" / "CartPole-v1_1"
        script = (f"import json, os, zipfile; os.makedirs({str(folder)!r}, exist_ok=True); print('Log path: {folder}'); "
                  f"zipfile.ZipFile({str(folder / 'CartPole-v1.zip')!r}, 'w').writestr('data', json.dumps({{'num_timesteps': {steps}}}))")  # fmt: skip
        return [sys.executable, "-c", script]

    bench = ["--algos", "ppo", "--envs", "CartPole-v1", "--seeds", "0", "--n-timesteps", "200", "--eval-freq", "100",
             "--out", str(tmp_path / "bench")]  # fmt: skip
    monkeypatch.setattr(zoo_benchmark, "train_command", fake_train)
    steps = 120
    with pytest.raises(SystemExit, match="No evaluations yet"):
        zoo_benchmark.main(bench)
    assert "ppo_CartPole-v1_seed0: stopped at 120 of 200 env steps, not recorded" in capsys.readouterr().out
    assert not (tmp_path / "bench" / "runs" / "ppo_CartPole-v1_seed0.json").exists()
    steps = 200
    with pytest.raises(FileNotFoundError, match="no evaluations.npz"):  # recorded, but this fake run evaluated nothing
        zoo_benchmark.main(bench)
    assert json.loads((tmp_path / "bench" / "runs" / "ppo_CartPole-v1_seed0.json").read_text())["seed"] == 0


def test_stopping_the_launcher_stops_its_jobs(tmp_path):
    """SIGTERM to the benchmark terminates its runs, which would otherwise train on unseen and race a rerun."""
    import signal
    import time

    pid_file = tmp_path / "child.pid"
    child = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
    parent = (f"import sys; from pathlib import Path; from sb3_dreamer.launcher import Job, run_jobs; "
              f"run_jobs([Job('sleeper', [sys.executable, '-c', {child!r}], Path({str(tmp_path / 'sleeper.log')!r}))])")  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-c", parent])
    for _ in range(300):
        if pid_file.exists() and pid_file.read_text():
            break
        time.sleep(0.1)
    child_pid = int(pid_file.read_text())
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    for _ in range(100):
        try:
            os.kill(child_pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(child_pid, signal.SIGKILL)
        pytest.fail("the job outlived the launcher")


def test_results_table_names_the_algos_left_out_of_the_aggregate():
    from sb3_dreamer.zoo_benchmark import results_table

    def run(algo, env_id, seed, final):
        return {"algo": algo, "env": env_id, "seed": seed, "timesteps": [1000, 2000], "mean": [0.0, final],
                "std": [0.0, 0.0], "finished": True, "wall_clock_s": 10.0}  # fmt: skip

    runs = [run("dreamer", e, s, f) for e, f in (("CartPole-v1", 500.0), ("Pendulum-v1", -150.0)) for s in (0, 1)]
    runs += [run("dqn", "CartPole-v1", s, 200.0) for s in (0, 1)] + [run("sac", "Pendulum-v1", 0, -160.0)]
    table = results_table(runs)
    assert "| dreamer | 1." in table and "| dqn | " not in table.split("Normalised")[1]
    assert "no threshold" not in table
    assert (
        "Left out of the aggregate, which needs a run for every env and seed: dqn (no run of Pendulum-v1 seeds 0, 1), "
        "sac (no run of CartPole-v1 seed 0)." in table
    )


def test_results_table_reads_no_steps_for_an_env_without_a_threshold():
    from sb3_dreamer.zoo_benchmark import results_table

    runs = [{"algo": "dreamer", "env": "Acrobot-v1", "seed": s, "timesteps": [1000, 2000], "mean": [-500.0, -80.0],
             "std": [0.0, 0.0], "finished": True, "wall_clock_s": 10.0} for s in (0, 1)]  # fmt: skip
    table = results_table(runs)
    assert "| dreamer | Acrobot-v1 (no threshold) | -, - | - | -80, -80 |" in table and "unsolved" not in table
