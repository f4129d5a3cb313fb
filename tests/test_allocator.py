"""``retain_cpu_memory``: glibc's malloc keeps what an update frees, so the next one does not
page-fault it in again (sb3_dreamer.allocator)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sb3_dreamer import allocator
from sb3_dreamer import dreamer as dreamer_module

from .helpers import make_model

glibc_only = pytest.mark.skipif(not allocator.glibc_available(), reason="glibc's malloc (Linux) only")

# Page faults per update of the default CPU model (its imagined two-hot targets are megabytes).
FAULTS_PER_UPDATE = """
import json, resource, sys
from sb3_dreamer import Dreamer
model = Dreamer("MlpLatentPolicy", "CartPole-v1", learning_starts=512, seed=0, device="cpu",
                retain_cpu_memory=sys.argv[1] == "on", parallel_backward=False)
model.learn(512)  # random steps, then one update
for _ in range(4):  # the heap grows to its size over the first updates
    model.train(1)
faults = []
for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    model.train(1)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps(sorted(faults)[2]))  # the median update: one update's growth (a new block size) is not the rule
"""


@glibc_only
def test_retained_memory_avoids_page_faults_of_each_update():
    """The default CPU model (the median of 5 updates after 5): with ``retain_cpu_memory`` an update
    reuses the memory the previous one freed (almost no page faults); without it glibc returns that
    memory to the OS and faults it in again (~5,000-10,000 faults per update measured on this
    project's machine)."""
    faults = {}
    for option in ("on", "off"):
        run = subprocess.run(
            [sys.executable, "-c", FAULTS_PER_UPDATE, option], capture_output=True, text=True, check=True, timeout=300
        )
        faults[option] = json.loads(run.stdout.strip().splitlines()[-1])
    assert faults["on"] < 0.1 * faults["off"], faults


@glibc_only
def test_retain_cpu_memory_default_respects_the_users_malloc_settings(monkeypatch):
    for name in (*allocator.MALLOC_ENV_VARIABLES, "GLIBC_TUNABLES", "LD_PRELOAD"):
        monkeypatch.delenv(name, raising=False)
    assert make_model(device="cpu").uses_retained_cpu_memory
    assert not make_model(device="cpu", retain_cpu_memory=False).uses_retained_cpu_memory
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
    assert allocator.user_tuned_malloc()
    assert not make_model(device="cpu").uses_retained_cpu_memory
    assert make_model(device="cpu", retain_cpu_memory=True).uses_retained_cpu_memory
    monkeypatch.delenv("LD_PRELOAD")
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "100000")
    assert not make_model(device="cpu").uses_retained_cpu_memory


def test_retain_cpu_memory_without_glibc_is_refused(monkeypatch):
    monkeypatch.setattr(dreamer_module, "glibc_available", lambda: False)
    with pytest.raises(ValueError, match="retain_cpu_memory=True sets glibc's malloc"):
        make_model(retain_cpu_memory=True)
    assert not make_model().uses_retained_cpu_memory  # the default: simply off


def test_model_saved_with_retain_cpu_memory_loads_without_glibc(tmp_path, monkeypatch):
    """As a model saved with ``cuda_graph=True`` loads on a CPU: where there is no glibc it loads,
    predicts and learns, and leaves malloc alone."""
    path = tmp_path / "dreamer.zip"
    model = make_model(retain_cpu_memory=allocator.glibc_available())
    model.save(path)
    monkeypatch.setattr(dreamer_module, "glibc_available", lambda: False)
    monkeypatch.setattr(dreamer_module, "retain_freed_memory", lambda *args: pytest.fail("malloc set without glibc"))
    loaded = type(model).load(path, env=model.get_env())
    assert loaded.retain_cpu_memory is allocator.glibc_available() and not loaded.uses_retained_cpu_memory
    loaded.predict(model.get_env().reset(), deterministic=True)
    loaded.learn(60)
