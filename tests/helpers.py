"""Shared helpers of the test suite: tiny model sizes, small envs, comparison helpers.

Every test builds its models through :func:`make_model` so that the whole suite runs on one CPU core
in well under a few minutes. Updates per env step are ``train_ratio / (batch_size * sequence_length)``
= 4 / 16 = 0.25 here: a ``learn(100)`` with ``learning_starts=50`` runs about a dozen updates.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch as th
from gymnasium import spaces

from sb3_dreamer import Dreamer
from sb3_dreamer.networks.rssm import RSSM
from sb3_dreamer.networks.world_model import WorldModel

TINY_POLICY_KWARGS: dict[str, Any] = dict(
    deter=16, hidden=8, classes=2, units=8, stoch=4, blocks=2, actor_layers=1, critic_layers=1
)
TINY_KWARGS: dict[str, Any] = dict(
    batch_size=2,
    sequence_length=8,
    imagination_horizon=3,
    learning_starts=50,
    train_ratio=4,
    buffer_size=2_000,
)
# RSSM sizes matching TINY_POLICY_KWARGS, for module-level tests.
TINY_RSSM_KWARGS: dict[str, Any] = dict(deter=16, hidden=8, stoch=4, classes=2, blocks=2)


def make_model(env: Any = "CartPole-v1", policy_kwargs: dict[str, Any] | None = None, **kwargs: Any) -> Dreamer:
    """A tiny Dreamer on ``env``; ``policy_kwargs`` and ``kwargs`` override the tiny defaults."""
    return Dreamer(
        "MlpPolicy",
        env,
        policy_kwargs={**TINY_POLICY_KWARGS, **(policy_kwargs or {})},
        **{**TINY_KWARGS, **kwargs},
    )


def make_rssm(embed_dim: int = 5, action_dim: int = 2, **kwargs: Any) -> RSSM:
    return RSSM(embed_dim, action_dim, **{**TINY_RSSM_KWARGS, **kwargs})


def make_world_model(obs_dim: int = 3, action_dim: int = 2, **kwargs: Any) -> WorldModel:
    """A tiny world model of vector observations [obs_dim]."""
    space = spaces.Box(-np.inf, np.inf, shape=(obs_dim,), dtype=np.float32)
    return WorldModel(space, action_dim, units=8, **{**TINY_RSSM_KWARGS, **kwargs})


class CountingEnv(gym.Env):
    """Deterministic env whose rows are easy to check by hand.

    Observation ``[t, a]``: the step count within the episode and the action that led here (-1 after
    a reset). The reward of the step that leads to observation t is t, so in a correctly aligned replay
    buffer ``reward == obs[0]`` on every row, reset rows included. The episode terminates after
    ``terminate_at`` steps (None: never; wrap it in a TimeLimit to truncate it instead).
    """

    def __init__(self, terminate_at: int | None = None) -> None:
        super().__init__()
        self.observation_space = spaces.Box(-1.0, 1000.0, shape=(2,), dtype=np.float32)
        self.action_space = spaces.Discrete(2)
        self.terminate_at = terminate_at
        self.t = 0

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.t = 0
        return np.array([0.0, -1.0], dtype=np.float32), {}

    def step(self, action):
        self.t += 1
        obs = np.array([self.t, int(action)], dtype=np.float32)
        terminated = self.terminate_at is not None and self.t >= self.terminate_at
        return obs, float(self.t), terminated, False, {}


class SpaceEnv(gym.Env):
    """An env with arbitrary spaces that returns samples: for testing space checks and predict."""

    def __init__(self, observation_space: spaces.Space, action_space: spaces.Space) -> None:
        super().__init__()
        self.observation_space, self.action_space = observation_space, action_space

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        return self.observation_space.sample(), {}

    def step(self, action):
        assert self.action_space.contains(action), f"{action!r} is not in {self.action_space}"
        return self.observation_space.sample(), 0.0, False, False, {}


def fixed_batch(
    obs_dim: int = 3, action_dim: int = 2, steps: int = 8, terminals: tuple[tuple[int, int], ...] = ((0, -1),), seed: int = 0
) -> tuple[th.Tensor, ...]:
    """A world-model batch of 2 sequences of ``steps``: obs [2, T, obs_dim], previous one-hot actions
    [2, T, action_dim], rewards [2, T] (random, from ``seed``), is_first at t = 0, is_terminal at
    each (sequence, step) of ``terminals``."""
    gen = th.Generator().manual_seed(seed)
    obs = th.randn(2, steps, obs_dim, generator=gen)
    prev_action = th.nn.functional.one_hot(th.randint(action_dim, (2, steps), generator=gen), action_dim).float()
    reward = th.randn(2, steps, generator=gen)
    is_first = th.zeros(2, steps)
    is_first[:, 0] = 1.0
    is_terminal = th.zeros(2, steps)
    for b, t in terminals:
        is_terminal[b, t] = 1.0
    return obs, prev_action, reward, is_first, is_terminal


def counting_env(terminate_at: int | None = None, max_episode_steps: int | None = None) -> gym.Env:
    env: gym.Env = CountingEnv(terminate_at)
    if max_episode_steps is not None:
        env = gym.wrappers.TimeLimit(env, max_episode_steps=max_episode_steps)
    return env


def time_limited(env_id: str, max_episode_steps: int = 20):
    """Env factory for make_vec_env: ``env_id`` truncated after ``max_episode_steps``."""
    return lambda: gym.wrappers.TimeLimit(gym.make(env_id), max_episode_steps=max_episode_steps)


def assert_state_dicts_equal(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Recursively compare (optimizer or module) state dicts: same keys, equal tensors and values."""
    assert a.keys() == b.keys()
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, dict):
            assert_state_dicts_equal(x, y)
        elif isinstance(x, th.Tensor):
            assert th.equal(x.cpu(), y.cpu()), f"tensor {key!r} differs"
        elif isinstance(x, (list, tuple)) and x and isinstance(x[0], dict):
            assert len(x) == len(y)
            for u, v in zip(x, y):
                assert_state_dicts_equal(u, v)
        else:
            assert x == y, f"{key!r}: {x} != {y}"


def predict_sequence(
    model: Any, observations: list[np.ndarray] | list[dict[str, np.ndarray]], deterministic: bool = True
) -> tuple[list[np.ndarray], tuple[np.ndarray, ...]]:
    """Predict (with a Dreamer or a DreamerPolicy) along batched observations (arrays, or dicts of
    arrays for Dict spaces), carrying the state: actions, last state."""
    state, actions = None, []
    for i, obs in enumerate(observations):
        n = len(next(iter(obs.values()))) if isinstance(obs, dict) else len(obs)
        episode_start = np.full(n, i == 0)
        action, state = model.predict(obs, state=state, episode_start=episode_start, deterministic=deterministic)
        actions.append(action)
    assert state is not None
    return actions, state
