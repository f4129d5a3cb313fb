"""Run benchmark jobs as subprocesses, a few at a time, each pinned to its own CPU core.

Torch's default threads thrash when two training processes share two cores (30x slowdowns were
seen), so with more than one job at a time each process gets one core (``taskset``) and one thread.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class Job:
    """One command to run: its name in progress lines, the command and the file its output goes to."""

    name: str
    cmd: list[str]
    log: Path


def run_jobs(
    jobs: list[Job],
    parallel: int = 1,
    status: Callable[[Job], str | None] | None = None,
    status_every: float = 600.0,
    on_done: Callable[[Job, int, float], None] | None = None,
) -> dict[str, tuple[int, float]]:
    """Run ``jobs``, at most ``parallel`` at a time, printing progress.

    If this process is stopped (Ctrl-C, or SIGTERM from ``kill``), the running jobs are terminated
    with it rather than left training unseen, so a rerun never races an orphan for its folder.

    :param status: a line on a running job's progress (None: nothing to say yet), printed for each
        running job every ``status_every`` seconds
    :param on_done: called with (job, exit code, wall-clock seconds) as soon as a job ends, so what
        it produced is recorded even if the jobs after it are stopped
    :return: for each job name, (exit code, wall-clock seconds)
    """
    if parallel < 1:
        raise ValueError(f"parallel must be at least 1 (jobs run at a time), got {parallel}")
    pending, running = list(jobs), []
    results: dict[str, tuple[int, float]] = {}
    last_status = time.perf_counter()
    free_cores = usable_cores()
    pin = parallel > 1 and shutil.which("taskset") is not None
    with _terminated_with_us(running):
        while pending or running:
            while pending and len(running) < parallel:
                job = pending.pop(0)
                env, cmd = dict(os.environ), job.cmd
                core = free_cores.pop(0) if pin and free_cores else None
                if parallel > 1:  # jobs side by side: one torch thread each, pinned or not (threads thrash otherwise)
                    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
                if core is not None:
                    cmd = ["taskset", "-c", str(core), *cmd]
                job.log.parent.mkdir(parents=True, exist_ok=True)
                with open(job.log, "a") as log:  # a rerun's attempt follows the earlier ones
                    log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(cmd)}\n")
                    log.flush()
                    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
                running.append((proc, core, job, time.perf_counter()))
                where = f" on core {core}" if core is not None else ""
                print(f"[{len(results) + len(running)}/{len(jobs)}] started {job.name}{where}", flush=True)
            time.sleep(1)
            if status is not None and time.perf_counter() - last_status >= status_every:
                last_status = time.perf_counter()
                for _, _, job, start in running:
                    line = status(job)
                    if line is not None:
                        print(f"    {job.name} ({time.perf_counter() - start:.0f} s): {line}", flush=True)
            for item in list(running):
                proc, core, job, start = item
                if proc.poll() is None:
                    continue
                running.remove(item)
                if core is not None:
                    free_cores.append(core)
                results[job.name] = (proc.returncode, time.perf_counter() - start)
                outcome = "done" if proc.returncode == 0 else f"FAILED (exit {proc.returncode}, see {job.log})"
                print(f"[{len(results)}/{len(jobs)}] {job.name}: {outcome} in {results[job.name][1]:.0f} s", flush=True)
                if on_done is not None:
                    on_done(job, *results[job.name])
    return results


def usable_cores() -> list[int]:
    """The CPU cores this process may run on (its affinity, e.g. a container's cpuset), in order."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


@contextlib.contextmanager
def _terminated_with_us(running: list) -> Iterator[None]:
    """Terminate the processes of ``running`` [(Popen, ...)] if the block is left by an exception,
    SIGTERM included (turned into SystemExit while the block runs, in the main thread)."""

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    in_main_thread = threading.current_thread() is threading.main_thread()
    if in_main_thread:
        previous = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, stop)
    try:
        yield
    except BaseException:
        for proc, *_ in running:
            proc.terminate()
        for proc, *_ in running:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        raise
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
