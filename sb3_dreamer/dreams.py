"""Seeing the dreams: the world model's open-loop predictions against what really happened.

Given a real sequence (observations [T, O] and the actions taken at them [T, A], as action vectors
the world model sees: one-hots for discrete kinds, [-1, 1] for Box), the model observes the first
``context`` steps (posterior), then imagines the rest open-loop with the real actions (prior only):

    t:        0 .. context-1          | context .. T-1
    model:    posterior from obs_t    | prior from h_t = f(h_{t-1}, z_{t-1}, a_{t-1}), no obs
    returns:  -                       | decoded obs_t, reward that led to obs_t, P(continue at obs_t)

:func:`plot_dream` draws them against the real ones, one panel per observation dimension (and
one for rewards), to a PNG; :class:`DreamCallback` logs that picture to TensorBoard every N steps.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch as th
from stable_baselines3.common.callbacks import BaseCallback

from sb3_dreamer.functional import symexp

if TYPE_CHECKING:
    from sb3_dreamer.policies import DreamerPolicy


class Dream(NamedTuple):
    """Open-loop predictions for steps ``context`` .. T-1 of each sequence (numpy, batch-major)."""

    observations: np.ndarray  # [B, T - context, O]
    rewards: np.ndarray  # [B, T - context]
    continues: np.ndarray  # [B, T - context], probability of continuing (discount included)


@th.no_grad()
def dream(policy: DreamerPolicy, observations: np.ndarray, actions: np.ndarray, context: int = 5) -> Dream:
    """Open-loop predictions of ``policy``'s world model after ``context`` observed steps.

    :param observations: [B, T, O] (or [T, O]) real observations, flattened
    :param actions: [B, T, A] (or [T, A]) action vectors taken at them (see the module docstring)
    :param context: observed steps (at least 1, fewer than T); the sequences start an episode
    """
    obs = th.as_tensor(np.asarray(observations), dtype=th.float32, device=policy.device)
    act = th.as_tensor(np.asarray(actions), dtype=th.float32, device=policy.device)
    if obs.dim() == 2:
        obs, act = obs.unsqueeze(0), act.unsqueeze(0)
    batch, steps = obs.shape[:2]
    if act.shape[:2] != (batch, steps) or act.shape[-1] != policy.action_dim:
        raise ValueError(f"actions must have shape {(batch, steps, policy.action_dim)} to match the observations, got {tuple(act.shape)}")
    if not 1 <= context < steps:
        raise ValueError(f"context must be between 1 and the sequence length - 1 ({steps - 1}), got {context}")
    wm, rssm = policy.world_model, policy.world_model.rssm
    prev = th.cat([th.zeros_like(act[:, :1]), act[:, :-1]], 1)
    is_first = th.zeros(batch, context, device=obs.device)
    is_first[:, 0] = 1.0
    deter, stoch, _ = rssm.observe(wm.embed(obs[:, :context].flatten(2)), prev[:, :context], is_first)
    deter, stoch = deter[:, -1], stoch[:, -1]
    feats = []
    for t in range(context, steps):
        deter, stoch = rssm.img_step(deter, stoch, act[:, t - 1])
        feats.append(th.cat([deter, stoch], -1))
    feat = th.stack(feats, 1)
    return Dream(
        observations=symexp(wm.decoder(feat)).cpu().numpy(),
        rewards=wm.reward(feat).cpu().numpy(),
        continues=wm.cont(feat).cpu().numpy(),
    )


def dream_figure(observations: np.ndarray, rewards: np.ndarray | None, predicted: Dream, context: int):
    """A matplotlib figure: one panel per observation dimension (and rewards), real against dreamed,
    for the first sequence. ``observations`` [T, O] (or [1, T, O]), ``rewards`` [T] or None."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    obs = np.asarray(observations).reshape(-1, np.asarray(observations).shape[-1])
    steps, dims = obs.shape
    panels = dims + (rewards is not None)
    cols = min(panels, 4)
    rows = -(-panels // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
    t_real, t_dream = np.arange(steps), np.arange(context, steps)
    series = [(obs[:, d], predicted.observations[0, :, d], f"obs[{d}]") for d in range(dims)]
    if rewards is not None:
        series.append((np.asarray(rewards).reshape(-1), predicted.rewards[0], "reward"))
    for ax, (real, dreamed, title) in zip(axes.flat, series):
        ax.plot(t_real, real, color="black", linewidth=1.2, label="real")
        ax.plot(t_dream, dreamed, color="tab:orange", linewidth=1.2, linestyle="--", label="dreamed")
        ax.axvline(context - 0.5, color="gray", linewidth=0.8)
        ax.set_title(title, fontsize=9)
    for ax in list(axes.flat)[panels:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"open-loop predictions after {context} observed steps", fontsize=10)
    fig.tight_layout()
    return fig


def plot_dream(
    path: str | Path, observations: np.ndarray, predicted: Dream, context: int, rewards: np.ndarray | None = None
) -> Path:
    """Draw :func:`dream_figure` to a PNG at ``path``; returns the path."""
    import matplotlib.pyplot as plt

    fig = dream_figure(observations, rewards, predicted, context)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


class DreamCallback(BaseCallback):
    """Every ``log_freq`` env steps, dream over one replayed episode start and log the picture to
    TensorBoard (``dream/predictions``; other loggers skip images).

    :param log_freq: env steps between pictures
    :param sequence_length: steps of the replayed sequence (context included)
    :param context: observed steps before the open-loop part
    """

    def __init__(self, log_freq: int = 5_000, sequence_length: int = 40, context: int = 5, verbose: int = 0) -> None:
        super().__init__(verbose)
        self.log_freq, self.sequence_length, self.context = log_freq, sequence_length, context

    def _on_step(self) -> bool:
        if self.num_timesteps % self.log_freq >= self.training_env.num_envs:
            return True
        buffer = self.model.replay_buffer  # type: ignore[attr-defined]
        if not buffer.can_sample(self.sequence_length):
            return True
        import matplotlib.pyplot as plt
        from stable_baselines3.common.logger import Figure

        data = buffer.sample(1, self.sequence_length)
        obs, actions = data.observations.cpu().numpy(), data.actions.cpu().numpy()
        predicted = dream(self.model.policy, obs, actions, self.context)  # type: ignore[arg-type]
        fig = dream_figure(obs[0], data.rewards[0].cpu().numpy(), predicted, self.context)
        self.logger.record("dream/predictions", Figure(fig, close=True), exclude=("stdout", "log", "json", "csv"))
        plt.close(fig)
        return True
