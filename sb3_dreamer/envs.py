"""Benchmark environments from rendered frames (registered with gymnasium when sb3_dreamer is imported).

- ``CartPolePixels-v1``: CartPole-v1 seen only through its rendered frame, resized to 64 x 64 RGB
  (uint8, channel-last [64, 64, 3]); the state vector is not given. Velocities must be inferred
  from frames over time (the RSSM's memory).
- ``CartPoleDict-v1``: a Dict observation of that frame (``"image"``) and the positions only
  (``"position"``: cart position and pole angle, no velocities), for ``MultiInputLatentPolicy``.

Rewards, terminations and the 500-step time limit are CartPole-v1's. Rendering needs pygame
(``pip install "gymnasium[classic-control]"``; it comes with this project's ``zoo`` extra).
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch as th
import torch.nn.functional as F
from gymnasium import spaces
from gymnasium.wrappers import HumanRendering


def resize_frame(frame: np.ndarray, size: int) -> np.ndarray:
    """RGB frame [H, W, 3] uint8 -> [size, size, 3] uint8 (bilinear, antialiased)."""
    x = th.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1).unsqueeze(0).float()
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.squeeze(0).permute(1, 2, 0).round().clamp(0, 255).to(th.uint8).numpy()


class PixelObservation(gym.ObservationWrapper):
    """Replace the observation by the env's rendered frame resized to ``size`` x ``size`` (uint8 RGB).

    :param env: an env made with ``render_mode="rgb_array"``
    :param size: side of the square frame
    :param state_keys: None: the frame only. Else a Dict observation ``{"image": frame, "position":
        obs[state_keys]}`` that keeps those entries of the original observation vector.
    """

    def __init__(self, env: gym.Env, size: int = 64, state_keys: list[int] | None = None) -> None:
        super().__init__(env)
        if env.render_mode != "rgb_array":
            raise ValueError(f"PixelObservation needs an env made with render_mode='rgb_array', got {env.render_mode!r}")
        self.size, self.state_keys = size, state_keys
        image = spaces.Box(0, 255, (size, size, 3), np.uint8)
        if state_keys is None:
            self.observation_space = image
        else:
            low = np.asarray(env.observation_space.low)[state_keys]  # type: ignore[attr-defined]
            high = np.asarray(env.observation_space.high)[state_keys]  # type: ignore[attr-defined]
            self.observation_space = spaces.Dict({"image": image, "position": spaces.Box(low, high, dtype=np.float32)})

    def observation(self, observation: np.ndarray) -> Any:
        frame = resize_frame(self.env.render(), self.size)  # type: ignore[arg-type]
        if self.state_keys is None:
            return frame
        return {"image": frame, "position": np.asarray(observation, dtype=np.float32)[self.state_keys]}


def make_pixel_env(
    env_id: str, size: int = 64, state_keys: list[int] | None = None, render_mode: str | None = None, **kwargs: Any
) -> gym.Env:
    """``env_id`` with :class:`PixelObservation`. The inner env always renders ``rgb_array`` frames (they are
    the observations); ``render_mode="human"`` (as the zoo's ``enjoy`` passes) shows them in a window
    (gymnasium's ``HumanRendering``), ``"rgb_array"`` or None returns them from ``render()``."""
    if render_mode not in (None, "rgb_array", "human"):
        raise ValueError(f"{env_id} pixel observations support render_mode None, 'rgb_array' or 'human', got {render_mode!r}")
    env: gym.Env = PixelObservation(gym.make(env_id, render_mode="rgb_array", **kwargs), size=size, state_keys=state_keys)
    return HumanRendering(env) if render_mode == "human" else env


def make_cartpole_pixels(size: int = 64, render_mode: str | None = None, **kwargs: Any) -> gym.Env:
    return make_pixel_env("CartPole-v1", size=size, render_mode=render_mode, **kwargs)


def make_cartpole_dict(size: int = 64, render_mode: str | None = None, **kwargs: Any) -> gym.Env:
    return make_pixel_env("CartPole-v1", size=size, state_keys=[0, 2], render_mode=render_mode, **kwargs)


def register_envs() -> None:
    """Register the envs above with gymnasium (idempotent)."""
    for env_id, entry_point in (
        ("CartPolePixels-v1", make_cartpole_pixels),
        ("CartPoleDict-v1", make_cartpole_dict),
    ):
        if env_id not in gym.registry:
            gym.register(env_id, entry_point=entry_point)
