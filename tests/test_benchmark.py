"""The learning benchmark command, on a tiny budget: it records evaluations and writes its table."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch as th

from sb3_dreamer.benchmark import main

from .helpers import TINY_POLICY_KWARGS


def test_benchmark_writes_records_and_table(tmp_path, capsys):
    kwargs = dict(policy_kwargs=TINY_POLICY_KWARGS, learning_starts=50, batch_size=2, sequence_length=8, train_ratio=4)
    args = ["--envs", "CartPole-v1", "--seeds", "0", "--steps", "200", "--eval-freq", "100", "--eval-episodes", "1"]
    main([*args, "--out", str(tmp_path), "--kwargs", json.dumps(kwargs)])
    printed = capsys.readouterr().out  # each evaluation once, while the run trains or when it ends
    assert printed.count(" 100 env steps, evaluation ") == 1 and printed.count(" 200 env steps, evaluation ") == 1
    record = json.loads((tmp_path / "CartPole-v1_seed0.json").read_text())
    assert record["eval_timesteps"] == [100, 200]
    assert len(record["eval_returns"]) == len(record["eval_wall_clock_s"]) == 2
    assert record["eval_wall_clock_s"][0] < record["eval_wall_clock_s"][1] <= record["wall_clock_s"]
    assert record["n_updates"] > 0
    table = (tmp_path / "results.md").read_text()
    assert "| CartPole-v1 (475) |" in table
    # A rerun with other settings does not take the finished run as its own: refused, naming it.
    with pytest.raises(SystemExit, match=r"CartPole-v1_seed0.json: steps 200 \(here: 300\)"):
        main([*args[:5], "300", *args[6:], "--out", str(tmp_path), "--kwargs", json.dumps(kwargs)])
    with pytest.raises(SystemExit, match=r"eval_freq 100 \(here: 50\)"):
        main([*args[:7], "50", *args[8:], "--out", str(tmp_path), "--kwargs", json.dumps(kwargs)])
    main([*args, "--out", str(tmp_path), "--kwargs", json.dumps(kwargs)])  # the same settings: skipped
    assert "0 run(s) to do, 1 already done" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, problem",
    [(["--envs", "CartPol-v1"], "unknown env 'CartPol-v1'"), (["--kwargs", '{"learning_rat": 1e-4}'], "learning_rat is not a Dreamer"),
     (["--kwargs", "[1]"], "--kwargs takes a JSON object"), (["--jobs", "0"], "--jobs must be at least 1"),
     (["--eval-episodes", "0"], "--eval-episodes must be at least 1"), (["--steps", "0"], "--steps must be at least 1"),
     (["--steps", "300", "--eval-freq", "1000"], "evaluates no run within the env steps of CartPole-v1 (300)"),
     (["--seeds", "-1"], "seeds must be in 0.."), (["--one", "CartPole-v1", "zero"], "a whole number")],
)  # fmt: skip
def test_benchmark_refuses_runs_that_would_fail_or_report_nothing(args, problem, tmp_path, capsys):
    # before any run starts (each failed inside its run, or hung: --jobs 0, or crashed the table: no evaluation)
    with pytest.raises(SystemExit):
        main(["--envs", "CartPole-v1", "--seeds", "0", *args, "--out", str(tmp_path / "out")])
    assert problem in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_benchmark_table_reads_runs_without_evaluations_or_threshold():
    from sb3_dreamer.benchmark import table

    record = dict(steps=100, wall_clock_s=3.0, updates_per_s=2.0, eval_timesteps=[], eval_returns=[], eval_wall_clock_s=[])
    text = table([dict(record, env="CartPole-v1", seed=0), dict(record, env="Acrobot-v1", seed=0, eval_timesteps=[100],
                                                                      eval_returns=[-80.4], eval_wall_clock_s=[2.0])])  # fmt: skip
    assert "| CartPole-v1 (475) | unsolved | unsolved | unsolved | no evaluation | 0/1 |" in text
    assert "| Acrobot-v1 (no threshold) | - | - | - | -80 | - |" in text


def test_benchmark_exits_with_an_error_naming_a_failed_run_and_runs_each_seed_once(tmp_path, capsys, monkeypatch):
    import sb3_dreamer.benchmark as benchmark

    def fake_run_jobs(jobs, parallel, **kwargs):  # the first run fails, the second writes its record
        done = {jobs[1].name: (0, 1.0)}
        record = dict(env="CartPole-v1", seed=1, steps=200, wall_clock_s=1.0, updates_per_s=1.0, eval_timesteps=[100],
                      eval_returns=[20.0], eval_wall_clock_s=[1.0])  # fmt: skip
        (tmp_path / "CartPole-v1_seed1.json").write_text(json.dumps(record))
        return {jobs[0].name: (1, 1.0), **done}

    monkeypatch.setattr(benchmark, "run_jobs", fake_run_jobs)
    with pytest.raises(SystemExit, match=r"1 run\(s\) failed, not in the table: CartPole-v1 seed 0 \(see "):
        main(["--envs", "CartPole-v1", "CartPole-v1", "--seeds", "0", "1", "0", "--steps", "200", "--eval-freq", "100",
              "--out", str(tmp_path)])  # fmt: skip
    assert "2 run(s) to do" in capsys.readouterr().out
    assert "| CartPole-v1 (475) | unsolved | unsolved | unsolved | 20 | 0/1 |" in (tmp_path / "results.md").read_text()


def test_launcher_refuses_to_run_no_job_at_a_time():
    from sb3_dreamer.launcher import Job, run_jobs

    with pytest.raises(ValueError, match="parallel must be at least 1"):
        run_jobs([Job("a", [sys.executable, "-c", "pass"], None)], 0)  # type: ignore[arg-type]


def test_evaluation_printer_shows_each_new_evaluation_once(tmp_path, capsys):
    from sb3_dreamer.benchmark import EvaluationPrinter
    from sb3_dreamer.launcher import Job

    job = Job("CartPole-v1 seed 0", [], tmp_path / "run.log")
    job.log.write_text("Eval num_timesteps=1000, episode_reward=9.00 +/- 0.50\n")  # an earlier, stopped attempt's
    printer = EvaluationPrinter()
    printer.start(job)
    assert printer(job) is None
    with open(job.log, "a") as log:
        log.write("=== a rerun\nEval num_timesteps=1000, episode_reward=20.10 +/- 1.00\nEpisode length: 20.10 +/- 1.00\n")
        log.write("Eval num_timesteps=2000, episode_reward=-150.25 +/- 3.00\n")
    assert printer(job) == "1,000 env steps, evaluation 20.1 +/- 1.0; 2,000 env steps, evaluation -150.2 +/- 3.0"
    assert printer(job) is None
    with open(job.log, "a") as log:
        log.write("Eval num_timesteps=3000, episode_reward=500.00 +/- 0.00\n")
    printer.done(job, 0, 1.0)
    assert capsys.readouterr().out == "    CartPole-v1 seed 0: 3,000 env steps, evaluation 500.0 +/- 0.0\n"


def test_benchmark_evaluates_images_as_the_policy_was_trained(tmp_path):
    """Pixel tasks: the eval env is channel-first like Dreamer's training env (SB3's EvalCallback
    warns "Training and eval env are not of the same type" otherwise). ``--one`` runs in this process."""
    kwargs = dict(policy_kwargs=dict(TINY_POLICY_KWARGS, depth=2), learning_starts=50, batch_size=2, sequence_length=8, train_ratio=4)
    args = ["--one", "CartPolePixels-v1", "0", "--steps", "100", "--eval-freq", "100", "--eval-episodes", "1"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main([*args, "--out", str(tmp_path), "--kwargs", json.dumps(kwargs)])
    assert not [w for w in caught if "not of the same type" in str(w.message)]
    assert json.loads((tmp_path / "CartPolePixels-v1_seed0.json").read_text())["eval_timesteps"] == [100]


def test_speed_measures_updates_acting_and_learn(capsys):
    """``python -m sb3_dreamer.speed`` on a small batch: the three figures and the settings beside them;
    more imagination starts than states are all of them; --learn-steps 0 skips learn()."""
    from sb3_dreamer.speed import main as speed_main

    small = ["--batch-size", "2", "--sequence-length", "8", "--updates", "2", "--warmup", "1", "--acting-steps", "20"]
    speed_main([*small, "--learn-steps", "1"])  # 32 updates (train_ratio 512 over B x T = 16); 256 imagination starts asked
    out = capsys.readouterr().out
    assert "B2 x T8, H15, 16 imagination starts" in out and f"torch {th.__version__}, float32" in out
    assert "update: " in out and "acting: " in out and "env steps/s at train_ratio 512" in out
    speed_main([*small, "--learn-steps", "0", "--json"])
    record = json.loads(capsys.readouterr().out)
    assert record["learn_env_steps_per_s"] is None and record["ms_per_update_median"] > 0 and record["acting_steps_per_s"] > 0


@pytest.mark.parametrize(
    "args, problem",
    [(["--trace", "t.json"], "--trace needs --profile"), (["--profile", "2", "--compare"], "two different runs"),
     (["--profile", "2", "--json"], "not --profile's table"), (["--updates", "0"], "--updates needs at least 1"),
     (["--acting-steps", "10"], "--acting-steps needs more than 10"), (["--learn-steps", "-1"], "--learn-steps needs"),
     (["--threads", "0"], "--threads N needs N >= 1")]
    + ([(["--device", "cuda"], "torch sees no CUDA device")] if not th.cuda.is_available() else []),
)  # fmt: skip
def test_speed_refuses_arguments_that_would_measure_nothing_or_be_ignored(args, problem, capsys):
    from sb3_dreamer.speed import main as speed_main

    with pytest.raises(SystemExit):
        speed_main(args)
    assert problem in capsys.readouterr().err


def test_speed_times_the_policy_of_the_envs_observations():
    from sb3_dreamer.speed import policy_for_env

    assert [policy_for_env(e) for e in ("CartPole-v1", "CartPolePixels-v1", "CartPoleDict-v1")] == [
        "MlpLatentPolicy", "CnnLatentPolicy", "MultiInputLatentPolicy"]  # fmt: skip


def test_speed_compare_times_every_path_against_the_first():
    """``python -m sb3_dreamer.speed --compare`` on a tiny model, eager against itself (no compilation in CI)."""
    from sb3_dreamer.speed import compare

    eager = dict(compile_steps=False, compile_losses=False)
    results = compare(
        updates=2, warmup=1, paths={"eager": eager, "eager again": eager}, policy_kwargs=TINY_POLICY_KWARGS,
        batch_size=2, sequence_length=8, imagination_starts=None,
    )  # fmt: skip
    assert list(results) == ["eager", "eager again"]
    assert results["eager"]["ratio_to_reference"] == 1.0
    for r in results.values():  # the same path twice: a ratio far from 1 is a bug, not noise
        assert r["ms_per_update_median"] > 0 and r["warmup_s"] > 0 and 0.1 < r["ratio_to_reference"] < 10


def test_speed_compare_reports_per_path_medians_and_per_round_ratios(monkeypatch):
    """With updates of known durations (a fake clock): 2 ms and 6 ms per update, ratio 3 to the first path."""
    import sb3_dreamer.speed as speed
    from sb3_dreamer import Dreamer

    clock = [0.0]
    monkeypatch.setattr(speed.time, "perf_counter", lambda: clock[0])

    def train(self, gradient_steps, batch_size=None):
        clock[0] += gradient_steps * (0.006 if self.parallel_backward else 0.002)

    monkeypatch.setattr(Dreamer, "train", train)
    results = speed.compare(
        updates=3, warmup=1, paths={"one thread": dict(parallel_backward=False), "slower": dict(parallel_backward=True)},
        policy_kwargs=TINY_POLICY_KWARGS, batch_size=2, sequence_length=8, imagination_starts=None,
    )  # fmt: skip
    assert results["one thread"]["ms_per_update_median"] == pytest.approx(2.0)
    assert results["slower"]["ms_per_update_median"] == pytest.approx(6.0)
    assert results["one thread"]["ratio_to_reference"] == 1.0
    assert results["slower"]["ratio_to_reference"] == pytest.approx(3.0)


def test_speed_compare_parallel_backward(capsys):
    """``python -m sb3_dreamer.speed --compare parallel``: one backward thread against ``parallel_backward``."""
    from sb3_dreamer.speed import main as speed_main

    speed_main(["--compare", "parallel", "--batch-size", "2", "--sequence-length", "8", "--imagination-starts", "0", "--updates", "2"])
    lines = capsys.readouterr().out.splitlines()
    assert f", cpu ({th.get_num_threads()} threads), 2 interleaved updates per path" in lines[0]
    assert lines[1].startswith("one backward thread: ") and "1.000 x one backward thread" in lines[1]
    assert lines[2].startswith("parallel_backward: ") and "x one backward thread" in lines[2]


def test_speed_describes_the_resolved_device():
    from sb3_dreamer.speed import device_description

    assert device_description("cpu") == f"cpu ({th.get_num_threads()} threads)"
    expected = th.cuda.get_device_name() if th.cuda.is_available() else device_description("cpu")
    assert device_description("auto") == expected  # "auto" resolved as SB3 does, not printed as "auto"


def test_speed_profile_lists_the_operators_and_writes_a_trace(tmp_path, capsys):
    """``python -m sb3_dreamer.speed --profile N``: the operators with the most self time, and a Chrome trace."""
    from sb3_dreamer.speed import main as speed_main

    trace = tmp_path / "trace.json"
    speed_main(["--profile", "2", "--warmup", "1", "--batch-size", "2", "--sequence-length", "8", "--imagination-starts", "0",
                "--trace", str(trace)])  # fmt: skip
    out = capsys.readouterr().out
    assert "2 profiled updates" in out and "Self CPU" in out and "aten::addmm" in out
    assert json.loads(trace.read_text())["traceEvents"]


def test_kernel_summary_of_known_intervals():
    """Two updates of kernels (start, duration) in us: [0, 2], [1, 4] (overlapping), [10, 12], [20, 23]."""
    from sb3_dreamer.speed import kernel_summary

    got = kernel_summary([(10.0, 2.0), (0.0, 2.0), (20.0, 3.0), (1.0, 3.0)], updates=2)
    assert got == {
        "kernels_per_update": 2.0,
        "kernel_ms_per_update": 10.0 / 2000,  # 2 + 3 + 2 + 3 us over two updates
        "busy_ms_per_update": 9.0 / 2000,  # [0, 4], [10, 12], [20, 23]
        "span_ms_per_update": 23.0 / 2000,
        "median_kernel_us": 2.5,
        "median_gap_us": 6.0,  # gaps 0, 6, 8
    }
    with pytest.raises(ValueError, match="no kernels"):
        kernel_summary([], updates=1)



@pytest.mark.skipif(shutil.which("taskset") is None or len(os.sched_getaffinity(0)) < 2, reason="needs taskset and 2 cores")
def test_launcher_pins_jobs_within_its_own_cores_and_gives_each_one_thread(tmp_path):
    """Held to its last core (as a container's cpuset would), the launcher pins a job there, not on a
    core outside its set, and a job beyond the free cores still runs with one torch thread."""
    core = max(os.sched_getaffinity(0))
    child = "import os; print(sorted(os.sched_getaffinity(0)), os.environ.get('OMP_NUM_THREADS'))"
    script = (
        "import sys; from pathlib import Path; from sb3_dreamer.launcher import Job, run_jobs; "
        f"run_jobs([Job(str(i), [sys.executable, '-c', {child!r}], Path({str(tmp_path)!r}) / f'{{i}}.log') for i in range(2)], 2)"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    subprocess.run(["taskset", "-c", str(core), sys.executable, "-c", script], check=True, timeout=120, env=env)
    printed = [(tmp_path / f"{i}.log").read_text().splitlines()[-1] for i in range(2)]
    assert sorted(printed) == sorted([f"[{core}] 1", f"[{core}] 1"]), printed
