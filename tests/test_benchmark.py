"""The learning benchmark command, on a tiny budget: it records evaluations and writes its table."""

from __future__ import annotations

import json

from sb3_dreamer.benchmark import main

from .helpers import TINY_POLICY_KWARGS


def test_benchmark_writes_records_and_table(tmp_path):
    kwargs = dict(policy_kwargs=TINY_POLICY_KWARGS, learning_starts=50, batch_size=2, sequence_length=8, train_ratio=4)
    args = ["--envs", "CartPole-v1", "--seeds", "0", "--steps", "200", "--eval-freq", "100", "--eval-episodes", "1"]
    main([*args, "--out", str(tmp_path), "--kwargs", json.dumps(kwargs)])
    record = json.loads((tmp_path / "CartPole-v1_seed0.json").read_text())
    assert record["eval_timesteps"] == [100, 200]
    assert len(record["eval_returns"]) == len(record["eval_wall_clock_s"]) == 2
    assert record["eval_wall_clock_s"][0] < record["eval_wall_clock_s"][1] <= record["wall_clock_s"]
    assert record["n_updates"] > 0
    table = (tmp_path / "results.md").read_text()
    assert "| CartPole-v1 (475) |" in table
