"""The pixel benchmark envs (sb3_dreamer.envs) and the benchmark's choice of policy."""

from __future__ import annotations

import json

import gymnasium as gym
import numpy as np
import pytest
from gymnasium import spaces

import sb3_dreamer  # noqa: F401  (registers the envs)
from sb3_dreamer.benchmark import main, policy_for
from sb3_dreamer.envs import PixelObservation, resize_frame

from .helpers import TINY_POLICY_KWARGS

pytest.importorskip("pygame")  # CartPole's rgb_array rendering


def test_cartpole_pixels_gives_64x64_frames_and_cartpole_rewards():
    env = gym.make("CartPolePixels-v1")
    assert env.observation_space == spaces.Box(0, 255, (64, 64, 3), np.uint8)
    obs, _ = env.reset(seed=0)
    assert obs.dtype == np.uint8 and obs.shape == (64, 64, 3) and obs.min() < obs.max()  # a picture, not a blank
    steps, done = 0, False
    while not done:
        obs, reward, terminated, truncated, _ = env.step(0)  # always push left: falls within ~10 steps
        assert reward == 1.0 and env.observation_space.contains(obs)
        steps, done = steps + 1, terminated or truncated
    assert terminated and steps < 50


def test_cartpole_dict_has_the_frame_and_the_positions_only():
    env = gym.make("CartPoleDict-v1")
    obs, _ = env.reset(seed=0)
    assert set(obs) == {"image", "position"} and obs["position"].shape == (2,)
    state = env.unwrapped.state
    np.testing.assert_allclose(obs["position"], [state[0], state[2]], rtol=1e-6)
    assert env.observation_space.contains(obs)


@pytest.mark.parametrize("env_id", ["CartPolePixels-v1", "CartPoleDict-v1"])
def test_pixel_envs_take_the_render_modes_the_zoo_passes(env_id, monkeypatch):
    """The zoo's enjoy makes envs with render_mode="human" and record_video with "rgb_array"."""
    monkeypatch.setenv("SDL_VIDEODRIVER", "dummy")  # a window without a display
    frame_env = gym.make(env_id, render_mode="rgb_array")
    frame_env.reset(seed=0)
    assert frame_env.render().shape == (400, 600, 3)
    human = gym.make(env_id, render_mode="human")
    obs, _ = human.reset(seed=0)
    assert human.render_mode == "human" and human.observation_space.contains(obs)
    human.step(0)
    human.close()
    with pytest.raises(ValueError, match="render_mode None, 'rgb_array' or 'human'"):
        gym.make(env_id, render_mode="ansi")


def test_pixel_observation_needs_rgb_array_rendering():
    with pytest.raises(ValueError, match="render_mode='rgb_array'"):
        PixelObservation(gym.make("CartPole-v1"))


def test_resize_frame_keeps_a_uniform_colour():
    frame = np.full((400, 600, 3), [10, 200, 30], dtype=np.uint8)
    np.testing.assert_array_equal(resize_frame(frame, 16), np.full((16, 16, 3), [10, 200, 30], dtype=np.uint8))


def test_benchmark_picks_the_policy_from_the_observation_space(tmp_path):
    assert policy_for(gym.make("CartPole-v1").observation_space) == "MlpLatentPolicy"
    assert policy_for(gym.make("CartPolePixels-v1").observation_space) == "CnnLatentPolicy"
    assert policy_for(gym.make("CartPoleDict-v1").observation_space) == "MultiInputLatentPolicy"
    policy_kwargs = dict(TINY_POLICY_KWARGS, image_size=16, depth=2)
    kwargs = dict(policy_kwargs=policy_kwargs, learning_starts=50, batch_size=2, sequence_length=8, train_ratio=4)
    args = ["--envs", "CartPoleDict-v1", "--seeds", "0", "--steps", "100", "--eval-freq", "100", "--eval-episodes", "1"]
    main([*args, "--out", str(tmp_path), "--kwargs", json.dumps(kwargs)])
    record = json.loads((tmp_path / "CartPoleDict-v1_seed0.json").read_text())
    assert record["eval_timesteps"] == [100] and record["n_updates"] > 0
