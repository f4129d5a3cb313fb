"""Seeing the dreams: the world model's open-loop predictions against what really happened.

Given a real sequence (observations [T, *shape], or a dict of them, and the actions taken at them
[T, A], as action vectors the world model sees: one-hots for discrete kinds, [-1, 1] for Box), the
model observes the first
``context`` steps (posterior), then imagines the rest open-loop with the real actions (prior only):

    t:        0 .. context-1          | context .. T-1
    model:    posterior from obs_t    | prior from h_t = f(h_{t-1}, z_{t-1}, a_{t-1}), no obs
    returns:  -                       | decoded obs_t, reward that led to obs_t, P(continue at obs_t)

:func:`plot_dream` draws them against the real ones to a PNG: one panel per vector dimension (and
one for rewards), and for images a strip of open-loop steps, real row over dreamed row;
:class:`DreamCallback` logs that picture to TensorBoard every N steps.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.callbacks import BaseCallback

from sb3_dreamer.buffers import OBS_KEY, SequenceReplayBuffer, observation_subspaces
from sb3_dreamer.functional import symexp
from sb3_dreamer.networks.encoders import resize_images

if TYPE_CHECKING:
    from sb3_dreamer.policies import DreamerPolicy


class Dream(NamedTuple):
    """Open-loop predictions for steps ``context`` .. T-1 of each sequence (numpy, batch-major).

    Observations are in the observation space's own units and shape: vectors [B, T - context, *shape],
    images [B, T - context, C, H, W] in the space's dtype (uint8 images: 0 .. 255, resized back from
    the model's ``image_size``); for a Dict space, a dict of them over the decoded keys.
    """

    observations: np.ndarray | dict[str, np.ndarray]
    rewards: np.ndarray  # [B, T - context]
    continues: np.ndarray  # [B, T - context], probability of continuing (discount included)


@th.no_grad()
@th.no_grad()
def dream(
    policy: DreamerPolicy, observations: np.ndarray | dict[str, np.ndarray], actions: np.ndarray, context: int = 5
) -> Dream:
    """Open-loop predictions of ``policy``'s world model after ``context`` observed steps.

    :param observations: [B, T, *shape] (or [T, *shape]) real observations as stored in replay (images
        channel-first), or a dict of them per key for a Dict space
    :param actions: [B, T, A] (or [T, A]) action vectors taken at them (see the module docstring)
    :param context: observed steps (at least 1, fewer than T); the sequences start an episode
    """
    subspaces = observation_subspaces(policy.observation_space)
    obs = {}
    for key, space in subspaces.items():
        x = th.as_tensor(np.asarray(per_key(observations)[key]), device=policy.device)
        obs[key] = x.unsqueeze(0) if x.dim() == len(space.shape) + 1 else x
        if obs[key].dim() != len(space.shape) + 2 or tuple(obs[key].shape[2:]) != space.shape:
            name = f"observations[{key!r}]" if isinstance(policy.observation_space, spaces.Dict) else "observations"
            raise ValueError(f"{name} must have shape [B, T, *{space.shape}] or [T, *{space.shape}] (images channel-first, "
                             f"as stored in replay), got {tuple(x.shape)}")  # fmt: skip
    act = th.as_tensor(np.asarray(actions), dtype=th.float32, device=policy.device)
    act = act.unsqueeze(0) if act.dim() == 2 else act
    batch, steps = next(iter(obs.values())).shape[:2]
    if act.shape[:2] != (batch, steps) or act.shape[-1] != policy.action_dim:
        raise ValueError(f"actions must have shape {(batch, steps, policy.action_dim)} to match the observations, got {tuple(act.shape)}")
    if not 1 <= context < steps:
        raise ValueError(f"context must be between 1 and the sequence length - 1 ({steps - 1}), got {context}")
    wm, rssm = policy.world_model, policy.world_model.rssm
    prev = th.cat([th.zeros_like(act[:, :1]), act[:, :-1]], 1)
    is_first = th.zeros(batch, context, device=act.device)
    is_first[:, 0] = 1.0
    observed = {key: x[:, :context] for key, x in obs.items()}
    deter, stoch, _ = rssm.observe(wm.embed(observed), prev[:, :context], is_first)
    deter, stoch = deter[:, -1], stoch[:, -1]
    feats = []
    for t in range(context, steps):
        deter, stoch = rssm.img_step(deter, stoch, act[:, t - 1])
        feats.append(th.cat([deter, stoch], -1))
    feat = th.stack(feats, 1)
    predicted = {
        key: to_observation_units(pred, subspaces[key], key in wm.encoder.image_keys, policy.normalize_images)
        for key, pred in wm.decoder(feat).items()
    }
    return Dream(
        observations=predicted if isinstance(observations, dict) else predicted[OBS_KEY],
        rewards=wm.reward(feat).cpu().numpy(),
        continues=wm.cont(feat).cpu().numpy(),
    )


def to_observation_units(pred: th.Tensor, space: spaces.Space, image: bool, normalize_images: bool) -> np.ndarray:
    """A decoder prediction (model inputs' space) [B, T, ...] -> the observation's units and shape [B, T, *shape]
    (a discrete key's most likely values: the largest of each one-hot, the bits above 0.5)."""
    if not image:
        values = symexp(pred.float())
        if isinstance(space, spaces.Discrete):
            return (values.argmax(-1) + int(space.start)).cpu().numpy()
        if isinstance(space, spaces.MultiDiscrete):
            parts = values.split([int(n) for n in space.nvec.reshape(-1)], -1)
            chosen = th.stack([part.argmax(-1) for part in parts], -1).cpu().numpy() + space.start.reshape(-1)
            return chosen.reshape(*pred.shape[:2], *space.shape).astype(space.dtype)
        if isinstance(space, spaces.MultiBinary):
            return (values > 0.5).reshape(*pred.shape[:2], *space.shape).cpu().numpy().astype(space.dtype)
        return values.reshape(*pred.shape[:2], *space.shape).cpu().numpy()
    pred = resize_images(pred.float(), space.shape[-2:])  # back from the model's image_size
    pred = pred * 255.0 if normalize_images else pred
    if space.dtype == np.uint8:
        return pred.round().clamp(0, 255).to(th.uint8).cpu().numpy()
    return pred.cpu().numpy().astype(space.dtype)


def per_key(observations: np.ndarray | dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Observations as a dict per key (a Box space's under ``OBS_KEY``)."""
    return observations if isinstance(observations, dict) else {OBS_KEY: observations}


def _first_sequence(observations: np.ndarray | dict[str, np.ndarray], dreamed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Real observations [T, *shape] (or [B, T, *shape]: the first), per dreamed key ([T - context, *shape])."""
    real = {}
    for key, pred in dreamed.items():
        x = np.asarray(per_key(observations)[key])
        real[key] = x[0] if x.ndim == pred.ndim + 1 else x
    return real


def _plot_series(axes: np.ndarray, series: list, context: int, steps: int) -> None:
    """Real (black) against dreamed (dashed) lines, one (real [T], dreamed [T - context], title) per panel."""
    t_real, t_dream = np.arange(steps), np.arange(context, steps)
    for ax, (real, dreamed, title) in zip(axes.flat, series):
        ax.plot(t_real, real, color="black", linewidth=1.2, label="real")
        ax.plot(t_dream, dreamed, color="tab:orange", linewidth=1.2, linestyle="--", label="dreamed")
        ax.axvline(context - 0.5, color="gray", linewidth=0.8)
        ax.set_title(title, fontsize=9)
    for ax in list(axes.flat)[len(series) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)


def _show_frame(ax, frame: np.ndarray) -> None:
    """Draw one image [C, H, W]: RGB when C is 3, else its last channel (the newest of a frame stack) in grey."""
    high = 255 if frame.dtype == np.uint8 else 1.0
    if frame.shape[0] == 3:
        ax.imshow(np.clip(frame.transpose(1, 2, 0), 0, high))
    else:
        ax.imshow(frame[-1], cmap="gray", vmin=0, vmax=high)
    ax.set_xticks([])
    ax.set_yticks([])


def dream_figure(
    observations: np.ndarray | dict[str, np.ndarray],
    rewards: np.ndarray | None,
    predicted: Dream,
    context: int,
    frames: int = 6,
):
    """A matplotlib figure of the first sequence, real against dreamed: one panel per vector
    dimension (and rewards), and for each image key (3-D per step) a strip of ``frames`` open-loop
    steps, real row over dreamed row.

    :param observations: [T, *shape] (or [B, T, *shape]: the first sequence's), or a dict of them per key
    :param rewards: [T] (or [B, T]: the first sequence's) or None
    """
    from matplotlib.figure import Figure  # not pyplot: the user's backend and figures stay as they were

    dreamed = {key: x[0] for key, x in per_key(predicted.observations).items()}
    real = _first_sequence(observations, dreamed)
    steps = len(predicted.rewards[0]) + context
    series = []
    for key in [k for k in dreamed if dreamed[k].ndim != 4]:
        name = "obs" if key == OBS_KEY else key
        r, d = real[key].reshape(steps, -1), dreamed[key].reshape(steps - context, -1)
        series += [(r[:, i], d[:, i], f"{name}[{i}]") for i in range(r.shape[1])]
    if rewards is not None:
        series.append((np.asarray(rewards).reshape(-1, steps)[0], predicted.rewards[0], "reward"))
    images = [k for k in dreamed if dreamed[k].ndim == 4]
    cols = min(max(len(series), 1), 4)
    rows = -(-len(series) // cols)
    title = f"open-loop predictions after {context} observed steps"
    if not images:
        fig = Figure(figsize=(3.2 * cols, 2.4 * rows))
        axes = fig.subplots(rows, cols, squeeze=False)
        _plot_series(axes, series, context, steps)
        fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        return fig
    shown = np.unique(np.linspace(context, steps - 1, min(frames, steps - context)).round().astype(int))
    heights = [2.6] * len(images) + ([2.4 * rows] if series else [])
    fig = Figure(figsize=(max(1.3 * len(shown), 3.2 * cols), sum(heights) + 0.4), layout="constrained")
    subfigs = np.atleast_1d(fig.subfigures(len(heights), 1, height_ratios=heights))
    for subfig, key in zip(subfigs, images):
        axes = subfig.subplots(2, len(shown), squeeze=False)
        for j, t in enumerate(shown):
            _show_frame(axes[0, j], real[key][t])
            _show_frame(axes[1, j], dreamed[key][t - context])
            axes[0, j].set_title(f"t={t}", fontsize=8)
        axes[0, 0].set_ylabel("real", fontsize=8)
        axes[1, 0].set_ylabel("dreamed", fontsize=8)
        subfig.suptitle("obs" if key == OBS_KEY else key, fontsize=9)
    if series:
        _plot_series(subfigs[-1].subplots(rows, cols, squeeze=False), series, context, steps)
    fig.suptitle(title, fontsize=10)
    return fig


def plot_dream(
    path: str | Path, observations: np.ndarray, predicted: Dream, context: int, rewards: np.ndarray | None = None
) -> Path:
    """Draw :func:`dream_figure` to a PNG at ``path``; returns the path."""
    dream_figure(observations, rewards, predicted, context).savefig(path, dpi=100)
    return Path(path)


def within_one_episode(is_first: np.ndarray) -> int | None:
    """Index of the first of B windows (is_first [B, T]) with no episode start after its first row,
    None if every window crosses one. :func:`dream` treats its sequence as one episode from row 0."""
    inside = ~np.asarray(is_first, dtype=bool)[:, 1:].any(axis=1)
    return int(np.argmax(inside)) if inside.any() else None


class DreamCallback(BaseCallback):
    """Every ``log_freq`` env steps, dream over a replayed sequence that stays inside one episode
    and log the picture to TensorBoard (``dream/predictions``; other loggers skip images). When
    none of ``candidates`` sampled windows stays inside one episode (episodes shorter than
    ``sequence_length``), it warns and logs nothing that time.

    :param log_freq: env steps between pictures
    :param sequence_length: steps of the replayed sequence (context included)
    :param context: observed steps before the open-loop part
    :param candidates: windows sampled to find one inside an episode
    """

    def __init__(
        self, log_freq: int = 5_000, sequence_length: int = 40, context: int = 5, candidates: int = 32, verbose: int = 0
    ) -> None:
        super().__init__(verbose)
        self.log_freq, self.sequence_length, self.context = log_freq, sequence_length, context
        self.candidates = candidates

    def _on_step(self) -> bool:
        if self.num_timesteps % self.log_freq >= self.training_env.num_envs:
            return True
        buffer = self.model.replay_buffer  # type: ignore[attr-defined]
        if not buffer.can_sample(self.sequence_length):
            return True
        # Its random numbers (the replayed windows, the dream's latent samples) come from generators
        # restored afterwards, so training goes on exactly as without the callback.
        device = self.model.device
        numpy_state = np.random.get_state()
        try:
            with th.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
                self._log_dream(buffer)
        finally:
            np.random.set_state(numpy_state)
        return True

    def _log_dream(self, buffer: SequenceReplayBuffer) -> None:
        from stable_baselines3.common.logger import Figure

        data = buffer.sample(self.candidates, self.sequence_length, env=self.model._replay_normalizer)  # type: ignore[attr-defined]
        i = within_one_episode(data.is_first.cpu().numpy())
        if i is None:
            warnings.warn(
                f"DreamCallback: none of {self.candidates} replayed windows of {self.sequence_length} steps stays inside "
                "one episode; lower sequence_length to see dreams of these short episodes",
                stacklevel=3,
            )
            return
        one = lambda x: x[i : i + 1].cpu().numpy()  # noqa: E731
        obs = {key: one(x) for key, x in data.observations.items()} if isinstance(data.observations, dict) else one(data.observations)
        predicted = dream(self.model.policy, obs, one(data.actions), self.context)  # type: ignore[arg-type]
        fig = dream_figure(obs, one(data.rewards)[0], predicted, self.context)
        self.logger.record("dream/predictions", Figure(fig, close=True), exclude=("stdout", "log", "json", "csv"))
