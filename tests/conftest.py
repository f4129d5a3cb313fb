"""pytest configuration (plain helpers and the tiny model sizes live in helpers.py)."""

from __future__ import annotations

import pytest
import torch as th

# The suite runs on one core next to benchmarks: no intra-op thread pool.
th.set_num_threads(1)


def pytest_configure(config: pytest.Config) -> None:
    # SB3's progress bar uses tqdm.rich, which warns that it is experimental.
    config.addinivalue_line("filterwarnings", "ignore:rich is experimental")
