"""Speed benchmark: milliseconds per gradient update, acting steps per second, env steps per second.

    python -m sb3_dreamer.speed                                  # defaults on this machine's CPU
    python -m sb3_dreamer.speed --size size12m --device cuda --sequence-length 64 --imagination-starts 0

Reports, for one preset, device, precision and batch shape:

- ms per update: median (and 10th/90th percentiles) of ``--updates`` timed gradient updates (world
  model + imagination + actor + critic + optimiser step, the replay sample included), after
  ``--warmup`` untimed ones; compilation and CUDA graph capture happen in the warm-up, whose
  seconds are printed apart (capture also on its own);
- acting: ``predict()`` steps per second for one env with the latent carried (what
  ``evaluate_policy`` and ``collect_rollouts`` pay per env step), and its median ms;
- learn: env steps per second of a real ``learn()`` run at the model's ``train_ratio``, after
  ``learning_starts`` (collection, updates and logging included).

Replay is filled with random-action steps first, so the timed updates see real data.

``--compare`` instead times the optimised paths against eager in one process: one model per path
(eager; ``compile_steps``; ``compile_steps`` + ``compile_losses``), their updates interleaved (the
order alternating), so a busy or throttled machine slows all of them alike; it prints each path's
median ms per update, its median ratio to the eager update of the same round, and its warm-up
seconds (compilation included; torch caches compiled code on disk, so a second run is faster).
On a CUDA device every path also replays the CUDA graph (the default there), so "eager" means
"not compiled":

    python -m sb3_dreamer.speed --compare --threads 1

``--profile N`` instead runs ``torch.profiler`` over N updates (after the warm-up) and prints the
operators with the most self time, grouped by input shapes (on CUDA by device time, kernels
included, with the kernels per update, their summed time, the GPU's busy time and the median
kernel and gap first: :func:`kernel_summary`); ``--trace PATH`` also writes a Chrome trace:

    python -m sb3_dreamer.speed --profile 5 --threads 1 --compile-steps on --compile-losses on

``--compare parallel`` times the world model's backward pass on the calling thread against
``parallel_backward`` (on a second thread), with ``--compile-steps`` / ``--compile-losses`` as given:

    python -m sb3_dreamer.speed --compare parallel --threads 1 --compile-steps on --compile-losses on
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from typing import TYPE_CHECKING

import numpy as np
import torch as th

if TYPE_CHECKING:
    from sb3_dreamer import Dreamer


def device_description(device: th.device | str) -> str:
    """The GPU's name for a CUDA device (``"auto"`` resolved as SB3 does), else ``cpu (N threads)``."""
    from stable_baselines3.common.utils import get_device

    dev = get_device(device)
    return th.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({th.get_num_threads()} threads)"


def _sync(device: th.device) -> None:
    if device.type == "cuda":
        th.cuda.synchronize(device)


def _fill_replay(model: Dreamer) -> None:
    """Set ``model`` to learn after a replay of just enough random steps for one batch and collect
    them; its ``learn`` ends with the first update (where any compilation happens)."""
    model.learning_starts = max(model.batch_size * model.sequence_length, 2 * model.sequence_length)
    model.learn(model.learning_starts)


def _warm_up(model: Dreamer, updates: int) -> None:
    """:func:`_fill_replay`, then ``updates`` untimed updates (where compilation and CUDA graph
    capture happen), the device synchronised after them."""
    _fill_replay(model)
    for _ in range(updates):
        model.train(1)
    _sync(model.device)


ACTING_STEPS_DROPPED = 10  # the first predict() calls are not timed (first-call overheads)


def policy_for_env(env_id: str) -> str:
    """The policy alias for ``env_id``'s observation space (as the learning benchmark picks it:
    :func:`sb3_dreamer.benchmark.policy_for`), so image and Dict envs time their own policy."""
    import gymnasium as gym

    from sb3_dreamer.benchmark import policy_for

    env = gym.make(env_id)
    try:
        return policy_for(env.observation_space)
    finally:
        env.close()


def count_problems(updates: int, warmup: int, acting_steps: int, learn_steps: int) -> list[str]:
    """What is wrong with the counts of a speed run (named as the command's options), for
    :func:`measure` and ``main``; empty when they measure something."""
    checks = (
        (f"--updates needs at least 1, got {updates}", updates < 1),
        (f"--warmup needs at least 0, got {warmup}", warmup < 0),
        (f"--acting-steps needs more than {ACTING_STEPS_DROPPED} (the first {ACTING_STEPS_DROPPED} are not timed), "
         f"got {acting_steps}", acting_steps <= ACTING_STEPS_DROPPED),
        (f"--learn-steps needs at least 0 (0: no learn() figure), got {learn_steps}", learn_steps < 0),
    )  # fmt: skip
    return [problem for problem, wrong in checks if wrong]


def measure(
    env_id: str = "CartPole-v1",
    size: str = "size400k",
    device: str = "cpu",
    batch_size: int = 16,
    sequence_length: int = 32,
    imagination_starts: int | None = 256,
    precision: str = "auto",
    cuda_graph: bool | None = None,
    compile_steps: bool | None = None,
    compile_losses: bool = False,
    parallel_backward: bool | None = None,
    retain_cpu_memory: bool | None = None,
    updates: int = 30,
    warmup: int = 5,
    acting_steps: int = 500,
    learn_steps: int = 1000,
    seed: int = 0,
) -> dict:
    """Run the three measurements; returns a record of the figures and the settings (``learn_steps=0``:
    no ``learn()`` figure, None)."""
    from sb3_dreamer import Dreamer

    problems = count_problems(updates, warmup, acting_steps, learn_steps)
    if problems:
        raise ValueError("; ".join(problems))

    kwargs = dict(
        batch_size=batch_size, sequence_length=sequence_length, imagination_starts=imagination_starts,
        precision=precision, cuda_graph=cuda_graph, compile_steps=compile_steps, compile_losses=compile_losses,
        parallel_backward=parallel_backward, retain_cpu_memory=retain_cpu_memory, policy_kwargs=dict(size=size),
        device=device, seed=seed,
    )  # fmt: skip
    model = Dreamer(policy_for_env(env_id), env_id, **kwargs)
    dev = model.device
    warm_start = time.perf_counter()
    _fill_replay(model)

    times = []
    for i in range(warmup + updates):
        _sync(dev)
        start = time.perf_counter()
        model.train(1)
        _sync(dev)
        times.append(time.perf_counter() - start)
    timed = np.array(times[warmup:]) * 1000
    warmup_seconds = time.perf_counter() - warm_start - sum(times[warmup:])
    capture = model._captured_update.capture_seconds if model._captured_update is not None else 0.0

    env = model.get_env()
    assert env is not None
    obs, state, starts = env.reset(), None, np.ones(env.num_envs, dtype=bool)
    act_times = []
    for _ in range(acting_steps):
        start = time.perf_counter()
        action, state = model.predict(obs, state=state, episode_start=starts, deterministic=False)
        act_times.append(time.perf_counter() - start)
        obs, _, starts, _ = env.step(action)
    act_ms = np.array(act_times[ACTING_STEPS_DROPPED:]) * 1000

    learn_env_steps_per_s = None
    if learn_steps:
        learner = Dreamer(policy_for_env(env_id), env_id, **kwargs)
        _fill_replay(learner)  # a replay that holds a batch, whatever the sequence length
        # Its first update untimed: there the learner compiles (its own functions) and captures its CUDA graph
        # (the fill's learn() ends with no update where an update falls less than once per env step).
        learner.train(1)
        _sync(dev)
        start = time.perf_counter()
        learner.learn(learn_steps, reset_num_timesteps=False)
        _sync(dev)
        learn_env_steps_per_s = learn_steps / (time.perf_counter() - start)

    return {
        "env": env_id,
        "size": size,
        "params": sum(p.numel() for p in model.policy.parameters() if p.requires_grad),
        "device": device_description(dev),
        "torch": th.__version__,
        "precision": str(model.autocast_dtype or th.float32).replace("torch.", ""),
        "cuda_graph": model.uses_cuda_graph,
        "compile_steps": bool(model.compile_steps or (model.compile_steps is None and model.uses_cuda_graph)),
        "compile_losses": model.compile_losses,
        "parallel_backward": model.uses_parallel_backward,
        "retain_cpu_memory": model.uses_retained_cpu_memory,
        "warmup_s": warmup_seconds,
        "batch": f"B{batch_size} x T{sequence_length}, H{model.imagination_horizon}, "
        f"{min(imagination_starts or batch_size * sequence_length, batch_size * sequence_length)} imagination starts",
        "ms_per_update_median": float(np.median(timed)),
        "ms_per_update_p10": float(np.percentile(timed, 10)),
        "ms_per_update_p90": float(np.percentile(timed, 90)),
        "updates_per_s": float(1000 / np.median(timed)),
        "capture_s": capture,
        "acting_steps_per_s": float(1000 / np.mean(act_ms)),
        "acting_ms_median": float(np.median(act_ms)),
        "learn_env_steps_per_s": learn_env_steps_per_s,
        "train_ratio": model.train_ratio,
    }


# The paths ``--compare`` times: name -> Dreamer keyword arguments.
COMPARED_PATHS: dict[str, dict[str, bool]] = {
    "eager": dict(compile_steps=False, compile_losses=False),
    "compile_steps": dict(compile_steps=True, compile_losses=False),
    "compile_steps + compile_losses": dict(compile_steps=True, compile_losses=True),
}

# ``--compare parallel``: the world model's backward pass on one thread, then on a second one.
PARALLEL_PATHS: dict[str, dict[str, bool]] = {
    "one backward thread": dict(parallel_backward=False),
    "parallel_backward": dict(parallel_backward=True),
}


def compare(
    env_id: str = "CartPole-v1",
    device: str = "cpu",
    updates: int = 30,
    warmup: int = 3,
    seed: int = 0,
    paths: dict[str, dict[str, bool]] | None = None,
    **kwargs,
) -> dict[str, dict[str, float]]:
    """Interleaved timing of ``paths`` (default :data:`COMPARED_PATHS`, on CUDA without those that
    set ``compile_losses``, which is refused there), the first being the reference: per path, the
    median ms per update, the median over rounds of its time divided by the reference's in the same
    round, and its warm-up seconds. ``kwargs`` go to every ``Dreamer``."""
    from stable_baselines3.common.utils import get_device

    from sb3_dreamer import Dreamer

    if paths is None:
        paths = COMPARED_PATHS
        if get_device(device).type == "cuda":  # compile_losses is refused there (see Dreamer's compile_losses)
            paths = {name: options for name, options in paths.items() if not options.get("compile_losses")}
    models, warm = {}, {}
    for name, options in paths.items():
        model = Dreamer(policy_for_env(env_id), env_id, device=device, seed=seed, **options, **kwargs)
        start = time.perf_counter()
        _warm_up(model, warmup)
        warm[name], models[name] = time.perf_counter() - start, model
    names = list(paths)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(updates):
        for name in names if i % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            models[name].train(1)
            _sync(models[name].device)
            times[name].append(time.perf_counter() - start)
    reference = np.array(times[names[0]])
    return {
        name: {
            "ms_per_update_median": float(np.median(times[name]) * 1000),
            "ratio_to_reference": float(np.median(np.array(times[name]) / reference)),
            "warmup_s": warm[name],
        }
        for name in names
    }


def kernel_summary(kernels: list[tuple[float, float]], updates: int) -> dict[str, float]:
    """What a GPU spends per update, from the (start, duration) in microseconds of every kernel of
    ``updates`` profiled updates: kernels per update, their summed duration, the time the GPU ran at
    least one (the union of their intervals; below the sum where kernels overlap), the span from the
    first start to the last end (all in ms per update), and the median kernel duration and median
    gap between consecutive kernels (us). An update bound by many tiny kernels shows a busy time close
    to its span with a median kernel of a few microseconds."""
    if not kernels:
        raise ValueError("no kernels to summarise (profile a CUDA device)")
    ordered = sorted(kernels)
    busy, run_start, run_end, gaps = 0.0, ordered[0][0], ordered[0][0] + ordered[0][1], []
    for start, duration in ordered[1:]:
        end = start + duration
        gaps.append(max(start - run_end, 0.0))
        if start > run_end:
            busy += run_end - run_start
            run_start, run_end = start, end
        else:
            run_end = max(run_end, end)
    busy += run_end - run_start
    span = run_end - ordered[0][0]  # a run begins after every earlier kernel ended: the last run ends last
    to_ms_per_update = 1000.0 * updates  # us over all updates -> ms per update
    return {
        "kernels_per_update": len(ordered) / updates,
        "kernel_ms_per_update": sum(duration for _, duration in ordered) / to_ms_per_update,
        "busy_ms_per_update": busy / to_ms_per_update,
        "span_ms_per_update": span / to_ms_per_update,
        "median_kernel_us": float(np.median([duration for _, duration in ordered])),
        "median_gap_us": float(np.median(gaps)) if gaps else 0.0,
    }


def _trace_kernels(trace_path: str) -> list[tuple[float, float]]:
    """(start, duration) in us of the GPU kernels in a Chrome trace written by ``torch.profiler``."""
    with open(trace_path) as f:
        events = json.load(f)["traceEvents"]
    return [(float(e["ts"]), float(e["dur"])) for e in events if e.get("cat") == "kernel"]


def profile_updates(
    env_id: str = "CartPole-v1",
    device: str = "cpu",
    updates: int = 5,
    warmup: int = 3,
    row_limit: int = 30,
    trace: str | None = None,
    seed: int = 0,
    **kwargs,
) -> str:
    """``torch.profiler`` over ``updates`` gradient updates, after ``warmup`` untimed ones (where any
    compilation and CUDA graph capture happen): the table of the operators with the most self time
    (device time on CUDA, where it also lists the kernels), grouped by input shapes, and on CUDA a
    line of :func:`kernel_summary` before it. ``trace``: also write a Chrome trace (chrome://tracing,
    Perfetto). ``kwargs`` go to ``Dreamer``."""
    from torch.profiler import ProfilerActivity, profile

    from sb3_dreamer import Dreamer

    model = Dreamer(policy_for_env(env_id), env_id, device=device, seed=seed, **kwargs)
    _warm_up(model, warmup)
    cuda = model.device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])], record_shapes=True) as prof:
        for _ in range(updates):
            model.train(1)
        _sync(model.device)
    summary = ""
    if cuda:  # the kernels' intervals, read from a trace (written to a temporary file unless asked for)
        with tempfile.TemporaryDirectory() as folder:
            path = trace or os.path.join(folder, "trace.json")
            prof.export_chrome_trace(path)
            k = kernel_summary(_trace_kernels(path), updates)
        summary = (
            f"CUDA kernels per update: {k['kernels_per_update']:.0f}, {k['kernel_ms_per_update']:.2f} ms summed, the GPU busy "
            f"{k['busy_ms_per_update']:.2f} ms of a {k['span_ms_per_update']:.2f} ms span (profiled); median kernel "
            f"{k['median_kernel_us']:.1f} us, median gap {k['median_gap_us']:.2f} us\n"
        )
    elif trace is not None:
        prof.export_chrome_trace(trace)
    sort_by = "self_device_time_total" if cuda else "self_cpu_time_total"
    return summary + prof.key_averages(group_by_input_shape=True).table(sort_by=sort_by, row_limit=row_limit)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="CartPole-v1")
    parser.add_argument("--size", default="size400k", help="policy size preset (sb3_dreamer.presets)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--sequence-length", type=int, default=32)
    parser.add_argument("--imagination-starts", type=int, default=256, help="0: every posterior state (DreamerV3)")
    parser.add_argument("--precision", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--cuda-graph", default="auto", choices=["auto", "on", "off"])
    parser.add_argument("--compile-steps", default="auto", choices=["auto", "on", "off"])
    parser.add_argument("--compile-losses", default="off", choices=["on", "off"])
    parser.add_argument("--parallel-backward", default="auto", choices=["auto", "on", "off"])
    parser.add_argument(
        "--retain-cpu-memory", default="auto", choices=["auto", "on", "off"],
        help="glibc's malloc keeps freed memory for the next update (process-wide, so not a --compare path: "
        "time on and off in alternating processes)",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--updates", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--acting-steps", type=int, default=500)
    parser.add_argument("--learn-steps", type=int, default=1000)
    parser.add_argument("--json", action="store_true", help="print the record as JSON")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="instead of timing: torch.profiler over N updates after --warmup ones, the operators "
                        "(and CUDA kernels) with the most self time")  # fmt: skip
    parser.add_argument("--trace", default=None, metavar="PATH", help="with --profile: also write a Chrome trace")
    parser.add_argument(
        "--compare", nargs="?", const="compile", choices=["compile", "parallel"],
        help="time paths interleaved: eager against the compiled ones (compile, the default), or the world "
        "model's backward pass on one thread against parallel_backward (parallel; with --compile-steps and "
        "--compile-losses as given)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    combinations = (
        ("--trace needs --profile (it writes the profiled updates' trace)", args.trace and not args.profile),
        ("--profile and --compare are two different runs: give one", args.profile and args.compare),
        ("--json prints the timing record or --compare's results, not --profile's table", args.json and args.profile),
        (f"--profile N needs N >= 1, got {args.profile}", args.profile < 0),
        (f"--threads N needs N >= 1, got {args.threads}", args.threads is not None and args.threads < 1),
        (f"--device {args.device}: torch sees no CUDA device here (the figures would be the CPU's)",
         args.device.startswith("cuda") and not th.cuda.is_available()),
    )
    problems = [problem for problem, refused in combinations if refused]
    problems += count_problems(args.updates, args.warmup, args.acting_steps, args.learn_steps)
    if problems:
        parser.error("; ".join(problems))
    on_off = {"auto": None, "on": True, "off": False}
    if args.threads is not None:
        th.set_num_threads(args.threads)
    if args.profile:
        table = profile_updates(
            env_id=args.env, device=args.device, updates=args.profile, warmup=args.warmup, trace=args.trace,
            batch_size=args.batch_size, sequence_length=args.sequence_length,
            imagination_starts=args.imagination_starts or None, precision=args.precision,
            cuda_graph=on_off[args.cuda_graph], compile_steps=on_off[args.compile_steps],
            compile_losses=args.compile_losses == "on", parallel_backward=on_off[args.parallel_backward],
            retain_cpu_memory=on_off[args.retain_cpu_memory], policy_kwargs=dict(size=args.size),
        )  # fmt: skip
        print(f"{args.env}, {args.size}, B{args.batch_size} x T{args.sequence_length}, torch {th.__version__}, "
              f"{device_description(args.device)}, {args.profile} profiled updates")  # fmt: skip
        print(table)
        return
    if args.compare:
        shape = dict(batch_size=args.batch_size, sequence_length=args.sequence_length, policy_kwargs=dict(size=args.size))
        if args.compare == "parallel":
            compiled = dict(compile_steps=args.compile_steps == "on", compile_losses=args.compile_losses == "on")
            paths, options = PARALLEL_PATHS, dict(shape, **compiled)
        else:
            paths, options = None, dict(shape, parallel_backward=on_off[args.parallel_backward])  # COMPARED_PATHS
        options["retain_cpu_memory"] = on_off[args.retain_cpu_memory]
        results = compare(
            env_id=args.env, device=args.device, updates=args.updates, warmup=args.warmup,
            imagination_starts=args.imagination_starts or None, precision=args.precision,
            cuda_graph=on_off[args.cuda_graph], paths=paths, **options,
        )  # fmt: skip
        if args.json:
            print(json.dumps(results))
            return
        print(f"{args.env}, {args.size}, B{args.batch_size} x T{args.sequence_length}, torch {th.__version__}, "
              f"{device_description(args.device)}, {args.updates} interleaved updates per path")  # fmt: skip
        reference = next(iter(results))
        for name, r in results.items():
            print(
                f"{name}: {r['ms_per_update_median']:.1f} ms median per update, {r['ratio_to_reference']:.3f} x {reference} "
                f"(median of per-round ratios); warm-up {r['warmup_s']:.1f} s"
            )
        return
    record = measure(
        env_id=args.env,
        size=args.size,
        device=args.device,
        batch_size=args.batch_size,
        sequence_length=args.sequence_length,
        imagination_starts=args.imagination_starts or None,
        precision=args.precision,
        cuda_graph=on_off[args.cuda_graph],
        compile_steps=on_off[args.compile_steps],
        compile_losses=args.compile_losses == "on",
        parallel_backward=on_off[args.parallel_backward],
        retain_cpu_memory=on_off[args.retain_cpu_memory],
        updates=args.updates,
        warmup=args.warmup,
        acting_steps=args.acting_steps,
        learn_steps=args.learn_steps,
    )
    if args.json:
        print(json.dumps(record))
        return
    print(f"{record['size']} ({record['params'] / 1e6:.2f}M params), {record['batch']}")
    print(
        f"device {record['device']}, torch {record['torch']}, {record['precision']}, "
        f"cuda_graph={record['cuda_graph']}, compile_steps={record['compile_steps']}, "
        f"compile_losses={record['compile_losses']}, parallel_backward={record['parallel_backward']}, "
        f"retain_cpu_memory={record['retain_cpu_memory']}"
    )
    print(
        f"update: {record['ms_per_update_median']:.1f} ms median (p10 {record['ms_per_update_p10']:.1f}, "
        f"p90 {record['ms_per_update_p90']:.1f}), {record['updates_per_s']:.1f} updates/s"
        + (f"; capture {record['capture_s']:.1f} s (compilation included)" if record["cuda_graph"] else "")
    )
    print(f"warm-up: {record['warmup_s']:.1f} s (replay filling, the untimed updates and any compilation)")
    print(f"acting: {record['acting_steps_per_s']:.0f} steps/s ({record['acting_ms_median']:.2f} ms median per predict)")
    if record["learn_env_steps_per_s"] is None:
        print("learn(): not measured (--learn-steps 0)")
    else:
        print(f"learn(): {record['learn_env_steps_per_s']:.1f} env steps/s at train_ratio {record['train_ratio']:g}")


if __name__ == "__main__":
    main()
