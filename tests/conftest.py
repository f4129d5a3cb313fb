"""pytest configuration (plain helpers and the tiny model sizes live in helpers.py)."""

from __future__ import annotations

import os
import zlib

import pytest
import torch as th

# One torch thread per process: the README's command runs one pytest-xdist worker per core, and the
# models here are too small for an intra-op thread pool to pay. Subprocesses (the zoo and benchmark
# commands some tests start) read OMP_NUM_THREADS, so two workers never share a core's threads.
th.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def seeded_global_generators(request: pytest.FixtureRequest) -> None:
    """Seed Python's, numpy's and torch's global generators before each test from its name: a test
    that builds an unseeded model (or samples a buffer) then sees the same random numbers whichever
    tests ran before it in its xdist worker, so its outcome does not depend on the test order."""
    from stable_baselines3.common.utils import set_random_seed

    set_random_seed(zlib.crc32(request.node.nodeid.encode()))


def pytest_configure(config: pytest.Config) -> None:
    # SB3's progress bar uses tqdm.rich, which warns that it is experimental.
    config.addinivalue_line("filterwarnings", "ignore:rich is experimental")
