"""pytest configuration (plain helpers and the tiny model sizes live in helpers.py)."""

from __future__ import annotations

import os

import pytest
import torch as th

# One torch thread per process: the README's command runs one pytest-xdist worker per core, and the
# models here are too small for an intra-op thread pool to pay. Subprocesses (the zoo and benchmark
# commands some tests start) read OMP_NUM_THREADS, so two workers never share a core's threads.
th.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_configure(config: pytest.Config) -> None:
    # SB3's progress bar uses tqdm.rich, which warns that it is experimental.
    config.addinivalue_line("filterwarnings", "ignore:rich is experimental")
