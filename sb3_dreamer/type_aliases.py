"""Named tuples passed between the buffer, the policy and the algorithm.

Shape letters used throughout the package: B sequences in a batch, T steps per sequence,
N flattened batch (B*T imagination starts, or n_envs when acting), H imagination horizon,
O observation size (C, H, W for images), A action size (one-hot size for Discrete), D deterministic state size,
S*K flattened stochastic state size, F = D + S*K feature size.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch as th


class SequenceSamples(NamedTuple):
    """A batch of replayed windows, batch-major, on the training device.

    ``actions[:, t]`` was taken at ``observations[:, t]``; ``rewards[:, t]`` led to ``observations[:, t]``.
    Without replay context every window starts from the zero state (``is_first[:, 0]`` is 1). With
    it, a window starts from the latent stored for the row before it (``context_*``), and
    ``is_first[:, 0]`` is 1 only where there is no such row.
    """

    observations: th.Tensor | dict[str, th.Tensor]  # [B, T, *shape] as stored (uint8 images), per key for Dict spaces
    actions: th.Tensor  # [B, T, A] float (one-hot or in [-1, 1])
    rewards: th.Tensor  # [B, T]
    is_first: th.Tensor  # [B, T] float 0/1
    is_last: th.Tensor  # [B, T] float 0/1
    is_terminal: th.Tensor  # [B, T] float 0/1
    context_deter: th.Tensor | None = None  # [B, D] latent of the row before the window
    context_stoch: th.Tensor | None = None  # [B, S*K]
    context_action: th.Tensor | None = None  # [B, A] action of the row before the window
    indices: tuple[np.ndarray, np.ndarray] | None = None  # (rows [B, T], cols [B, 1]) in the buffer

    @property
    def prev_actions(self) -> th.Tensor:
        """[B, T, A]: the action taken before each step (the context action, or zero, at t=0)."""
        first = self.context_action.unsqueeze(1) if self.context_action is not None else th.zeros_like(self.actions[:, :1])
        return th.cat([first, self.actions[:, :-1]], 1)


class LatentState(NamedTuple):
    """The recurrent state carried while acting: what ``predict`` returns as ``state`` (as numpy)."""

    deter: th.Tensor  # [N, D]
    stoch: th.Tensor  # [N, S*K]
    action: th.Tensor  # [N, A] the last action taken, normalised


class Trajectory(NamedTuple):
    """An imagined rollout of H steps from N start states (index 0 is the start)."""

    feat: th.Tensor  # [N, H+1, F], gradient into the actor only when imagined with backprop
    actions: th.Tensor  # [N, H+1, A]
    log_prob: th.Tensor  # [N, H+1], gradient into the actor
    entropy: th.Tensor  # [N, H+1], gradient into the actor


class ActorLosses(NamedTuple):
    """The actor's loss on an imagined :class:`Trajectory` and what the critic's losses reuse."""

    policy_loss: th.Tensor  # 0-d
    feat: th.Tensor  # [N, H+1, F] imagined features, detached
    value_logits: th.Tensor  # [N, H+1, bins] the critic's logits at ``feat`` (gradient into the critic; set by dynamics_loss after dynamics_objective)
    returns: th.Tensor  # [N, H] lambda-returns, detached
    weight: th.Tensor  # [N, H] probability of still being in the episode, detached
    scale: th.Tensor  # 0-d return scale max(1, P95 - P5)
    reward: th.Tensor  # [N, H+1] predicted rewards, detached
    cont: th.Tensor  # [N, H+1] predicted continues, detached
    entropy: th.Tensor  # [N, H+1] the actor's entropies, detached
