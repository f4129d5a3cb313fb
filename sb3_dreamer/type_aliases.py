"""Named tuples passed between the buffer, the policy and the algorithm.

Shape letters used throughout the package: B sequences in a batch, T steps per sequence,
N flattened batch (B*T imagination starts, or n_envs when acting), H imagination horizon,
O observation size, A action size (one-hot size for Discrete), D deterministic state size,
S*K flattened stochastic state size, F = D + S*K feature size.
"""

from __future__ import annotations

from typing import NamedTuple

import torch as th


class SequenceSamples(NamedTuple):
    """A batch of replayed windows, batch-major, on the training device.

    ``actions[:, t]`` was taken at ``observations[:, t]``; ``rewards[:, t]`` led to ``observations[:, t]``.
    ``is_first[:, 0]`` is always 1: every window starts from the zero state.
    """

    observations: th.Tensor  # [B, T, O] float
    actions: th.Tensor  # [B, T, A] float (one-hot or in [-1, 1])
    rewards: th.Tensor  # [B, T]
    is_first: th.Tensor  # [B, T] float 0/1
    is_last: th.Tensor  # [B, T] float 0/1
    is_terminal: th.Tensor  # [B, T] float 0/1

    @property
    def prev_actions(self) -> th.Tensor:
        """[B, T, A]: the action taken before each step, zero at t=0 (the RSSM zeroes it at is_first anyway)."""
        return th.cat([th.zeros_like(self.actions[:, :1]), self.actions[:, :-1]], 1)


class LatentState(NamedTuple):
    """The recurrent state carried while acting: what ``predict`` returns as ``state`` (as numpy)."""

    deter: th.Tensor  # [N, D]
    stoch: th.Tensor  # [N, S*K]
    action: th.Tensor  # [N, A] the last action taken, normalised


class Trajectory(NamedTuple):
    """An imagined rollout of H steps from N start states (index 0 is the start)."""

    feat: th.Tensor  # [N, H+1, F], no gradient
    actions: th.Tensor  # [N, H+1, A]
    log_prob: th.Tensor  # [N, H+1], gradient into the actor
    entropy: th.Tensor  # [N, H+1], gradient into the actor
