"""DreamerPolicy: world model + actor + critic (+ slow critic), their optimiser, and stateful acting.

``predict(obs, state, episode_start, deterministic)`` carries the latent like sb3-contrib's
RecurrentPPO, batch-first: ``state = (deter [n, D], stoch [n, S*K], last_action [n, A])`` as float32
numpy arrays; ``None`` means a fresh state sized from the batch; ``episode_start`` [n] resets it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.type_aliases import PyTorchObs, Schedule

from sb3_dreamer import arguments
from sb3_dreamer.buffers import action_classes, action_vector_dim, is_image
from sb3_dreamer.compiled import CompiledMethods
from sb3_dreamer.dreams import Dream, dream
from sb3_dreamer.functional import lambda_return
from sb3_dreamer.networks.actor_critic import Actor, Critic, actor_loss, critic_loss, update_return_percentiles
from sb3_dreamer.networks.encoders import DISCRETE_SPACES
from sb3_dreamer.networks.rssm import GRUWeights
from sb3_dreamer.networks.world_model import WorldModel
from sb3_dreamer.optimizers import LaProp
from sb3_dreamer.presets import DEFAULT_SIZE, resolve_size
from sb3_dreamer.save_util import replaced_when_complete
from sb3_dreamer.type_aliases import ActorLosses, LatentState, Trajectory

# The policy (alias) suited to each kind of observation space.
POLICY_FOR_KIND = {"vector": "MlpLatentPolicy", "image": "CnnLatentPolicy", "dict": "MultiInputLatentPolicy"}
# The ranges of the policy's size and architecture settings (policy_kwargs); image_size is checked by the encoder.
ARCHITECTURE_RULES: dict[str, arguments.Rule] = {
    **{name: arguments.integer_at_least(1) for name in ("deter", "hidden", "units", "depth", "stoch", "blocks")},
    "classes": arguments.integer_at_least(2),  # a categorical of one class carries nothing
    "unimix": arguments.number_within(0, 1, high_open=True),
    "actor_layers": arguments.integer_at_least(0),  # 0: a linear head on the latent features
    "critic_layers": arguments.integer_at_least(0),
    "free_bits": arguments.number_at_least(0),
    "dyn_scale": arguments.number_at_least(0),
    "rep_scale": arguments.number_at_least(0),
}


def observation_kind(observation_space: spaces.Space, normalize_images: bool = True) -> str:
    """"vector" (a Box, or a Discrete, MultiDiscrete or MultiBinary space, seen as one-hots or bits),
    "image" (a Box SB3 sees as an image, see :func:`~sb3_dreamer.buffers.is_image`) or "dict" (a Dict
    of those); ValueError naming the space for anything else."""
    supported = (spaces.Box, *DISCRETE_SPACES)
    subspaces = observation_space.spaces if isinstance(observation_space, spaces.Dict) else {"": observation_space}
    for key, sub in subspaces.items():
        if isinstance(sub, spaces.MultiDiscrete) and sub.nvec.ndim > 1:
            raise ValueError(
                f"Dreamer (as Stable-Baselines3) supports only one-dimensional MultiDiscrete observations, got MultiDiscrete({sub.nvec.tolist()})"
                + (f" for key {key!r}" if key else "")
                + "; flatten it with a gymnasium ObservationWrapper (obs.reshape(-1), MultiDiscrete(nvec.reshape(-1)))"
            )
    if isinstance(observation_space, spaces.Dict):
        others = {key: sub for key, sub in observation_space.spaces.items() if not isinstance(sub, supported)}
        if others or not observation_space.spaces:
            raise ValueError(
                "Dreamer supports Dict observation spaces whose values are Box (vectors or images), Discrete, "
                f"MultiDiscrete or MultiBinary spaces, got {observation_space}"
                + (f" with other keys {others}" if others else "")
            )
        return "dict"
    if not isinstance(observation_space, supported):
        raise ValueError(
            "Dreamer supports Box (vector or image), Discrete, MultiDiscrete, MultiBinary and Dict (of those) "
            f"observation spaces, got {observation_space}"
        )
    return "image" if is_image(observation_space, normalize_images) else "vector"


def check_action_space(action_space: spaces.Space) -> None:
    """Raise ValueError, naming the space, unless it is Discrete, MultiDiscrete, MultiBinary or a Box with finite bounds."""
    if not isinstance(action_space, (spaces.Box, spaces.Discrete, spaces.MultiDiscrete, spaces.MultiBinary)):
        raise ValueError(
            f"Dreamer supports Box (bounded), Discrete, MultiDiscrete and MultiBinary action spaces, got {action_space}"
        )
    if isinstance(action_space, spaces.Box) and not np.all(np.isfinite([action_space.low, action_space.high])):
        raise ValueError(f"Dreamer needs finite bounds on Box action spaces, got {action_space}; wrap the env to bound them")


def check_observation_space(
    policy_class: type[DreamerPolicy], observation_space: spaces.Space, normalize_images: bool = True
) -> None:
    """Raise ValueError, naming the space and the policy to use, when ``policy_class`` cannot take it."""
    kind = observation_kind(observation_space, normalize_images)
    if kind not in policy_class.observation_kinds:
        takes = " or ".join(policy_class.observation_kinds)
        raise ValueError(
            f"{policy_class.__name__} takes {takes} observations, got {'an' if kind == 'image' else 'a'} {kind} space "
            f"{observation_space}: use {POLICY_FOR_KIND[kind]}" + image_hint(observation_space, policy_class, normalize_images)
        )


def image_hint(observation_space: spaces.Space, policy_class: type[DreamerPolicy], normalize_images: bool) -> str:
    """For a Box that looks like an image (2-D or 3-D) given to an image policy, what makes it one; else ""."""
    box = observation_space
    if "image" not in policy_class.observation_kinds or not isinstance(box, spaces.Box) or len(box.shape) not in (2, 3):
        return ""
    if len(box.shape) == 2:
        return f"; for images, give {box.shape} a channel axis, e.g. (1, *shape) or (*shape, 1)"
    return (
        "; for images, an image policy takes uint8 Boxes with bounds [0, 255] (channel-last or channel-first), or, "
        "with policy_kwargs=dict(normalize_images=False), any channel-first 3-D Box (the env scales it)"
    )


class DreamerPolicy(CompiledMethods, BasePolicy):
    """Policy holding the whole Dreamer agent (any supported observation space; the aliases
    :class:`MlpLatentPolicy`, :class:`CnnLatentPolicy` and :class:`MultiInputLatentPolicy` each take one kind).

    :param observation_space: Box (vector or channel-first image), Discrete, MultiDiscrete, MultiBinary, or a Dict of them
    :param action_space: Discrete, MultiDiscrete, MultiBinary or bounded Box action space
    :param lr_schedule: learning rate schedule (of the single optimiser)
    :param size: size preset name (see :mod:`sb3_dreamer.presets`)
    :param deter: deterministic state size D (None: from the preset)
    :param hidden: RSSM hidden width (None: from the preset)
    :param classes: classes K per stochastic variable (None: from the preset)
    :param units: width of encoder, decoder, heads, actor and critic layers (None: from the preset)
    :param depth: CNN depth of image encoders and decoders: channels of the first stage, doubled at
        each next one (None: from the preset, 16 for ``size400k``)
    :param stoch: number S of categorical stochastic variables
    :param blocks: number of blocks of the block GRU
    :param unimix: uniform mixture in the latent categoricals
    :param actor_layers: hidden layers of the actor
    :param critic_layers: hidden layers of the critic
    :param free_bits: KL free nats
    :param dyn_scale: dynamics KL weight
    :param rep_scale: representation KL weight
    :param optimizer_class: optimiser over all trained parameters (default LaProp + AGC + warm-up)
    :param optimizer_kwargs: its keyword arguments (besides lr)
    :param image_size: side S of the square the images are resized to (bilinear, antialiased) before
        the CNN, and reconstructed at: a power of two, at least 8
    :param decoder_keys: keys of a Dict observation the world model reconstructs (None: all of them);
        the others are still encoded but get no reconstruction loss
    :param normalize_images: divide uint8 images by 255 on the device (as SB3); False: use images as
        stored (as floats), for images already normalised. Vector observations are symlog-scaled either way.
    """

    # Kinds of observation space the policy takes (see observation_kind).
    observation_kinds: ClassVar[tuple[str, ...]] = ("vector", "image", "dict")
    # Imagination steps per imagine_steps call (the same values for any chunk size); 1 in eager,
    # where a call costs nothing extra. compile_steps raises it.
    imagine_chunk: int = 1

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        lr_schedule: Schedule,
        size: str = DEFAULT_SIZE,
        deter: int | None = None,
        hidden: int | None = None,
        classes: int | None = None,
        units: int | None = None,
        depth: int | None = None,
        stoch: int = 32,
        blocks: int = 8,
        unimix: float = 0.01,
        actor_layers: int = 3,
        critic_layers: int = 3,
        free_bits: float = 1.0,
        dyn_scale: float = 1.0,
        rep_scale: float = 0.1,
        optimizer_class: type[th.optim.Optimizer] = LaProp,
        optimizer_kwargs: dict[str, Any] | None = None,
        image_size: int = 64,
        decoder_keys: Sequence[str] | None = None,
        normalize_images: bool = True,
    ) -> None:
        check_observation_space(type(self), observation_space, normalize_images)
        check_action_space(action_space)
        super().__init__(
            observation_space,
            action_space,
            optimizer_class=optimizer_class,
            optimizer_kwargs=optimizer_kwargs,
            normalize_images=normalize_images,
        )
        sizes = resolve_size(size, deter=deter, hidden=hidden, classes=classes, units=units, depth=depth)
        problems = arguments.problems(
            dict(sizes, stoch=stoch, blocks=blocks, unimix=unimix, actor_layers=actor_layers, critic_layers=critic_layers,
                 free_bits=free_bits, dyn_scale=dyn_scale, rep_scale=rep_scale),
            ARCHITECTURE_RULES,
        )  # fmt: skip
        if problems:
            raise ValueError("policy_kwargs: " + "; ".join(problems))
        self.size, self.sizes = size, sizes
        decoder_keys = None if decoder_keys is None else list(decoder_keys)
        self.arch = dict(
            stoch=stoch, blocks=blocks, unimix=unimix, actor_layers=actor_layers, critic_layers=critic_layers,
            free_bits=free_bits, dyn_scale=dyn_scale, rep_scale=rep_scale, image_size=image_size, decoder_keys=decoder_keys,
        )  # fmt: skip
        self.action_classes = action_classes(action_space)
        self.discrete = self.action_classes is not None
        self.action_dim = action_vector_dim(action_space)
        self.world_model = WorldModel(
            observation_space,
            self.action_dim,
            units=sizes["units"],
            depth=sizes["depth"],
            image_size=image_size,
            decoder_keys=decoder_keys,
            normalize_images=normalize_images,
            free_bits=free_bits,
            dyn_scale=dyn_scale,
            rep_scale=rep_scale,
            deter=sizes["deter"],
            hidden=sizes["hidden"],
            stoch=stoch,
            classes=sizes["classes"],
            blocks=blocks,
            unimix=unimix,
        )
        feat_dim = self.world_model.rssm.feat_dim
        self.actor = Actor(feat_dim, self.action_dim, self.action_classes, units=sizes["units"], layers=actor_layers)
        self.critic = Critic(feat_dim, units=sizes["units"], layers=critic_layers)
        self.critic_slow = Critic(feat_dim, units=sizes["units"], layers=critic_layers)
        self.critic_slow.load_state_dict(self.critic.state_dict())
        self.critic_slow.requires_grad_(False)
        # EMA of the 5th and 95th percentiles of imagined returns (the advantage scale).
        self.register_buffer("return_low", th.zeros(()))
        self.register_buffer("return_high", th.zeros(()))
        trained = [*self.world_model.parameters(), *self.actor.parameters(), *self.critic.parameters()]
        self.optimizer = self.optimizer_class(trained, lr=lr_schedule(1), **self.optimizer_kwargs)

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        data.update(
            lr_schedule=self._dummy_schedule,
            size=self.size,
            **self.sizes,
            **self.arch,
            optimizer_class=self.optimizer_class,
            optimizer_kwargs=self.optimizer_kwargs,
        )
        return data

    def compile_steps(self, observe_chunk: int = 8, imagine_chunk: int = 5) -> None:
        """``torch.compile`` the functions called once per time step (posterior step, prior step,
        actor; in imagination the prior step, the actor and its action sample) and the lambda-return
        recursion (:meth:`lambda_return`): each becomes a few fused kernels instead of dozens. In the
        world model's observe loop, ``observe_chunk`` consecutive posterior steps are one compiled
        call (:meth:`~sb3_dreamer.networks.rssm.RSSM.posterior_steps`), and in imagination
        ``imagine_chunk`` steps (:meth:`imagine_steps`), so a sequence of T steps pays T / chunk
        calls' overhead (forward and backward) and casts the weights once per call. Shapes are
        static, so each batch shape compiles once (training batch, imagination starts, acting envs)."""
        for name, chunk in (("observe_chunk", observe_chunk), ("imagine_chunk", imagine_chunk)):
            if chunk < 1:
                raise ValueError(f"{name} must be a positive number of steps, got {chunk}")
        rssm = self.world_model.rssm
        rssm.compile_method("posterior_step")
        rssm.compile_method("posterior_steps")
        rssm.observe_chunk = observe_chunk
        rssm.compile_method("img_step")
        self.actor.net.compile_method("forward")
        self.compile_method("imagine_steps")
        self.imagine_chunk = imagine_chunk
        self.compile_method("lambda_return")

    def compile_losses(self) -> None:
        """``torch.compile`` the loss computations outside the time loops: the world model's heads
        and KL terms (:meth:`~sb3_dreamer.networks.world_model.WorldModel.head_losses`), the
        REINFORCE actor loss (:meth:`reinforce_loss`) or the dynamics-gradient one after its
        imagination loop (:meth:`dynamics_objective`), and the critic's losses (:meth:`critic_value_loss`,
        :meth:`replay_value_loss`), forward and backward: their elementwise operations fuse into a few kernels."""
        wm = self.world_model
        wm.compile_method("head_losses")
        for name in ("reinforce_loss", "dynamics_objective", "critic_value_loss", "replay_value_loss"):
            self.compile_method(name)

    def set_training_mode(self, mode: bool) -> None:
        """SB3's train/eval switch, skipped when already in ``mode``: ``nn.Module.train`` walks every
        submodule, a quarter of a one-env ``predict`` on CPU. (No layer here behaves differently in
        the two modes; the flag is kept for SB3's contract.)"""
        if self.training != mode:
            super().set_training_mode(mode)

    # ----------------------------------------------------------------------------------- acting
    def initial_state(self, n: int) -> LatentState:
        """Zero latent for ``n`` envs."""
        deter, stoch = self.world_model.rssm.initial(n, self.device)
        return LatentState(deter, stoch, th.zeros(n, self.action_dim, device=self.device))

    def act(
        self, obs: PyTorchObs, state: LatentState, episode_start: th.Tensor, deterministic: bool = False
    ) -> LatentState:
        """One acting step: update the latent with ``obs`` [N, ...] (a dict of them for Dict spaces) and pick an action.

        :param episode_start: [N] float, 1 where ``obs`` starts an episode (resets the latent)
        :return: the new latent; its ``action`` [N, A] is the chosen (normalised) action
        """
        wm = self.world_model
        embed = wm.embed(obs)
        deter, stoch, _ = wm.rssm.obs_step(
            state.deter, state.stoch, state.action, wm.rssm.embed_projection(embed), episode_start, deterministic
        )
        dist = self.actor(th.cat([deter, stoch], -1))
        action = dist.mode() if deterministic else dist.sample()
        return LatentState(deter, stoch, action)

    def random_action(self, n: int) -> th.Tensor:
        """Uniformly random normalised actions [n, A] (exploration before ``learning_starts``)."""
        if self.action_classes is not None:
            parts = [th.nn.functional.one_hot(th.randint(k, (n,), device=self.device), k) for k in self.action_classes]
            return th.cat(parts, -1).float()
        return th.rand(n, self.action_dim, device=self.device) * 2.0 - 1.0

    def to_env_action(self, action: np.ndarray) -> np.ndarray:
        """Normalised actions [n, A] -> actions of the env's action space [n, ...]."""
        if self.action_classes is not None:
            bounds = np.cumsum([0, *self.action_classes])
            index = np.stack([action[:, a:b].argmax(-1) for a, b in zip(bounds[:-1], bounds[1:])], -1)  # [n, groups]
            if isinstance(self.action_space, spaces.Discrete):
                return index[:, 0] + int(self.action_space.start)
            if isinstance(self.action_space, spaces.MultiDiscrete):
                index = index.reshape((-1, *self.action_space.shape)) + np.asarray(self.action_space.start)
            return index.reshape((-1, *self.action_space.shape)).astype(self.action_space.dtype)
        assert isinstance(self.action_space, spaces.Box)
        low, high = self.action_space.low, self.action_space.high
        action = np.clip(action, -1.0, 1.0).reshape((-1, *self.action_space.shape))
        value = low + 0.5 * (action + 1.0) * (high - low)
        if np.issubdtype(self.action_space.dtype, np.integer):
            value = np.rint(value)  # the nearest integer: a cast would truncate, so `high` would almost never be taken
        # Clipped again: in float32 the affine map can round one step past a bound (e.g. high=2.3077023 gave 2.3077025),
        # which the env's own action-space check refuses.
        return np.clip(value, low, high).astype(self.action_space.dtype)

    def _check_state(self, state: tuple[np.ndarray, ...], n: int) -> LatentState:
        expected = ((n, self.world_model.rssm.deter_dim), (n, self.world_model.rssm.stoch_dim), (n, self.action_dim))
        shapes = tuple(np.shape(x) for x in state) if isinstance(state, (tuple, list)) else None
        if shapes != expected:
            raise ValueError(
                f"Dreamer's state is a tuple (deter, stoch, last_action) of shapes {expected} for {n} observation(s), "
                f"got {shapes if shapes is not None else type(state).__name__}. Pass the state returned by the "
                "previous predict() call for the same envs, or None to start fresh."
            )
        return LatentState(*(th.as_tensor(np.asarray(x), dtype=th.float32, device=self.device) for x in state))

    def predict(
        self,
        observation: np.ndarray | dict[str, np.ndarray],
        state: tuple[np.ndarray, ...] | None = None,
        episode_start: np.ndarray | None = None,
        deterministic: bool = False,
    ) -> tuple[np.ndarray, tuple[np.ndarray, ...] | None]:
        """Actions for a batch of observations, carrying the latent state (see module docstring)."""
        if isinstance(observation, tuple) and len(observation) == 2 and isinstance(observation[1], dict):
            raise ValueError(
                "You have passed a tuple to the predict() function instead of a Numpy array or a Dict. "
                "You are probably mixing Gym API with SB3 VecEnv API: `obs, info = env.reset()` (Gym) "
                "vs `obs = vec_env.reset()` (SB3 VecEnv)."
            )
        self.set_training_mode(False)
        obs_tensor, vectorized = self.obs_to_tensor(observation)  # validates the shape
        n = batch_size(obs_tensor)
        latent = self.initial_state(n) if state is None else self._check_state(state, n)
        starts = np.zeros(n, dtype=np.float32) if episode_start is None else np.asarray(episode_start, dtype=np.float32)
        if starts.shape == () and n == 1:  # a bool for one unbatched observation, as RecurrentPPO accepts
            starts = starts.reshape(1)
        if starts.shape != (n,):
            raise ValueError(f"episode_start must have shape ({n},) for {n} observation(s), got {starts.shape}")
        with th.no_grad():
            latent = self.act(obs_tensor, latent, th.as_tensor(starts, device=self.device), deterministic)
        new_state = tuple(x.cpu().numpy() for x in latent)
        actions = self.to_env_action(new_state[2])
        if not vectorized:
            actions = actions.squeeze(axis=0)
        return actions, new_state

    def _predict(self, observation: PyTorchObs, deterministic: bool = False) -> th.Tensor:
        """Stateless action from a fresh latent (SB3's abstract hook; ``predict`` carries the state)."""
        n = batch_size(observation)
        latent = self.act(observation, self.initial_state(n), th.ones(n, device=self.device), deterministic)
        return latent.action

    def forward(self, obs: PyTorchObs, deterministic: bool = False) -> th.Tensor:
        return self._predict(obs, deterministic)

    def save(self, path: str) -> None:
        """As SB3's ``BasePolicy.save`` (``DreamerPolicy.load`` reads it), but a file already at ``path`` is
        replaced only by a complete new one (:func:`~sb3_dreamer.save_util.replaced_when_complete`)."""
        with replaced_when_complete(path, "") as target:
            super().save(target)  # type: ignore[arg-type]

    def dream(self, observations: np.ndarray | dict[str, np.ndarray], actions: np.ndarray, context: int = 5) -> Dream:
        """The world model's open-loop predictions after ``context`` observed steps of a real
        sequence (observations [B, T, *shape] or a dict of them, action vectors [B, T, A]); see
        :mod:`sb3_dreamer.dreams`."""
        return dream(self, observations, actions, context)

    # ------------------------------------------------------------------------------ imagination
    def imagine(self, deter: th.Tensor, stoch: th.Tensor, horizon: int, backprop: bool = False) -> Trajectory:
        """Roll the prior forward ``horizon`` steps from N start states, acting with the actor.

        With ``backprop=False`` (REINFORCE) the rollout runs without autograd, and the actor's
        log-probs and entropies of the chosen actions are computed afterwards in one batched pass
        over all [N, H+1] states (the same values, one large product instead of H+1 small ones);
        only they carry gradients. With ``backprop=True`` actions are reparameterised samples and
        the features carry gradients through the dynamics back to the actor; the caller freezes the
        world model's parameters (:func:`frozen`) so that only the actor learns from it. Either way
        the noise of every sample is drawn before the loop, and each step samples its action inside
        :meth:`imagine_steps` (:attr:`imagine_chunk` steps per call).

        :param deter: [N, D] :param stoch: [N, S*K] :return: a :class:`Trajectory`
        """
        rssm = self.world_model.rssm
        deter, stoch = deter.detach(), stoch.detach()
        with th.set_grad_enabled(backprop and th.is_grad_enabled()):
            weights = rssm.gru_weights()
            # The random numbers of the whole rollout, each in one call: [H, N, S, K] and [H+1, N, A].
            noise = rssm.noise(horizon, deter.shape[0], device=deter.device)
            action_noise = self.actor.noise(horizon + 1, deter.shape[0], device=deter.device)
            feat = th.cat([deter, stoch], -1)
            raw = self.actor.net(feat)
            action = self.actor.distribution(raw).sample(action_noise[0])
            feats, raws, actions = [feat.unsqueeze(1)], [raw.unsqueeze(1)], [action.unsqueeze(1)]
            # Through the dynamics, one step per call: a compiled chunk's backward took 71 s instead
            # of 13 s to compile on a CPU and was no faster.
            chunk = 1 if backprop else self.imagine_chunk
            for noise_c, action_noise_c in zip(noise.split(chunk), action_noise[1:].split(chunk)):
                deter, stoch, feat_c, raw_c, action_c = self.imagine_steps(deter, stoch, action, weights, noise_c, action_noise_c)
                action = action_c[:, -1]
                feats.append(feat_c)
                raws.append(raw_c)
                actions.append(action_c)
        feat, action = th.cat(feats, 1), th.cat(actions, 1)
        if backprop:
            dist = self.actor.distribution(th.cat(raws, 1))
            return Trajectory(feat, action, dist.log_prob(action.detach()), dist.entropy())
        dist = self.actor(feat)
        return Trajectory(feat, action, dist.log_prob(action), dist.entropy())

    def imagine_steps(
        self,
        deter: th.Tensor,
        stoch: th.Tensor,
        action: th.Tensor,
        weights: GRUWeights,
        noise: th.Tensor,
        action_noise: th.Tensor,
    ) -> tuple[th.Tensor, th.Tensor, th.Tensor, th.Tensor, th.Tensor]:
        """k steps of :meth:`imagine` from deter [N, D], stoch [N, S*K] and ``action`` [N, A], each
        the prior step (``RSSM.img_step``) with Gumbel ``noise`` [k, N, S, K], then the actor at the
        new state and its action sampled with ``action_noise`` [k, N, A] (:meth:`Actor.noise`). One
        function, so that ``compile_steps`` makes :attr:`imagine_chunk` steps one compiled call
        (without autograd; one step with it).

        :return: the last deter [N, D] and stoch [N, S*K], and per step feat [N, k, D + S*K], the
            actor's raw output ``actor.net(feat)`` [N, k, *] and the sampled action [N, k, A]
        """
        feats, raws, actions = [], [], []
        for noise_t, action_noise_t in zip(noise.unbind(0), action_noise.unbind(0)):
            deter, stoch = self.world_model.rssm.img_step(deter, stoch, action, weights, noise_t)
            feat = th.cat([deter, stoch], -1)
            raw = self.actor.net(feat)
            action = self.actor.distribution(raw).sample(action_noise_t)
            feats.append(feat)
            raws.append(raw)
            actions.append(action)
        return deter, stoch, th.stack(feats, 1), th.stack(raws, 1), th.stack(actions, 1)

    def lambda_return(
        self, reward: th.Tensor, discount: th.Tensor, bootstrap: th.Tensor, lam: float, last: th.Tensor | None = None
    ) -> th.Tensor:
        """:func:`~sb3_dreamer.functional.lambda_return` ([B, T+1] inputs -> [B, T] returns), as a
        method so that ``compile_steps`` compiles its time loop into one kernel."""
        return lambda_return(reward, discount, bootstrap, lam, last=last)

    # ----------------------------------------------------------------------------------- losses
    def reinforce_loss(self, traj: Trajectory, lam: float, entropy_coef: float) -> ActorLosses:
        """REINFORCE actor loss on an imagined trajectory (from :meth:`imagine` without backprop):
        ``-weight * (logpi(a) * sg(R - v) / scale + entropy_coef * H)``, with the lambda-returns R
        bootstrapped by the critic and ``scale = max(1, P95 - P5)`` of the returns (EMA, updated
        in place on ``return_low`` / ``return_high``)."""
        wm, critic = self.world_model, self.critic
        with th.no_grad():
            reward, cont = wm.reward(traj.feat), wm.cont(traj.feat)
            weight = th.cumprod(cont, 1)[:, :-1]  # probability of still being in the episode
        value_logits = critic(traj.feat)
        value = critic.value(value_logits)
        returns = self.lambda_return(reward, cont, value.detach(), lam)  # [N, H]
        scale = update_return_percentiles(returns, self.return_low, self.return_high)
        advantage = (returns - value[:, :-1]) / scale
        policy_loss = actor_loss(traj.log_prob[:, :-1], traj.entropy[:, :-1], advantage, weight, entropy_coef).mean()
        return ActorLosses(
            policy_loss, traj.feat, value_logits, returns.detach(), weight, scale, reward, cont, traj.entropy.detach()
        )

    def dynamics_loss(
        self, deter: th.Tensor, stoch: th.Tensor, horizon: int, lam: float, entropy_coef: float
    ) -> ActorLosses:
        """Actor loss by backpropagation through the dynamics (continuous actions): imagine from
        deter [N, D], stoch [N, S*K] with reparameterised actions and maximise
        ``weight * (R / scale + entropy_coef * H)``, the lambda-returns R differentiated through the
        dynamics, the reward head and the critic (their parameters frozen; the continue head's
        probabilities discount R as constants). The part after
        the imagination loop is :meth:`dynamics_objective`."""
        with frozen(self.world_model, self.critic):
            traj = self.imagine(deter, stoch, horizon, backprop=True)
            actor = self.dynamics_objective(traj, lam, entropy_coef)
        # The critic's logits for its own loss, outside frozen(): they carry its gradient.
        return actor._replace(value_logits=self.critic(actor.feat))

    def dynamics_objective(self, traj: Trajectory, lam: float, entropy_coef: float) -> ActorLosses:
        """:meth:`dynamics_loss` on an imagined trajectory (from :meth:`imagine` with backprop,
        called with the world model and critic frozen; ``value_logits`` is left None for the
        caller). No time loop, so one region for ``torch.compile`` (:meth:`compile_losses`)."""
        wm, critic = self.world_model, self.critic
        # The continue probabilities discount the returns as constants (DreamerV3 2023 took the continue
        # head's mode, which has no gradient): through them the actor would also learn to keep episodes
        # from ending wherever the values bootstrapped past an imagined end are positive, and those are
        # never trained (the critic's weight there is cumprod(cont) ~ 0). On a tiny task that pays at its
        # end, that path pointed against the reward's and cancelled most of the gradient towards the goal.
        reward, cont = wm.reward(traj.feat), wm.cont(traj.feat).detach()
        returns = self.lambda_return(reward, cont, critic.value(critic(traj.feat)), lam)  # [N, H]
        weight = th.cumprod(cont, 1)[:, :-1]
        scale = update_return_percentiles(returns, self.return_low, self.return_high)
        policy_loss = -(weight * (returns / scale + entropy_coef * traj.entropy[:, :-1])).mean()
        return ActorLosses(
            policy_loss, traj.feat.detach(), None, returns.detach(), weight, scale, reward.detach(), cont,  # type: ignore[arg-type]
            traj.entropy.detach(),
        )  # fmt: skip

    def critic_value_loss(self, actor: ActorLosses) -> th.Tensor:
        """The critic's loss on the imagined trajectories (0-d): two-hot cross-entropy of
        ``actor.value_logits`` towards the actor's lambda-returns, regularised towards the slow
        critic's values and weighted by ``actor.weight``. Its gradient reaches only the critic."""
        critic = self.critic
        with th.no_grad():
            slow_value = critic.value(self.critic_slow(actor.feat))
        return (actor.weight * critic_loss(critic, actor.value_logits[:, :-1], actor.returns, slow_value[:, :-1])).mean()

    def replay_value_loss(
        self,
        actor: ActorLosses,
        real_feat: th.Tensor,
        rewards: th.Tensor,
        is_terminal: th.Tensor,
        is_last: th.Tensor,
        starts: th.Tensor | None,
        gamma: float,
        lam: float,
    ) -> th.Tensor:
        """The critic's loss on the replayed sequences (0-d): on the real posterior features
        ``real_feat`` [B, T, F] (not detached: as in DreamerV3, its gradient also reaches the world
        model), towards lambda-returns of the replayed ``rewards`` [B, T] bootstrapped by the
        imagined returns (by the critic's own value at states imagination did not start from:
        ``starts`` [N] indexes the B*T states, None: all), regularised towards the slow critic."""
        critic, slow = self.critic, self.critic_slow
        batch, steps = rewards.shape
        real_logits = critic(real_feat)
        with th.no_grad():
            real_slow = critic.value(slow(real_feat))
            if starts is None:
                boot = actor.returns[:, 0].view(batch, steps)
            else:
                boot = critic.value(real_logits).flatten().index_put((starts,), actor.returns[:, 0]).view(batch, steps)
        real_returns = self.lambda_return(rewards, (1.0 - is_terminal) * gamma, boot, lam, last=is_last)
        keep = 1.0 - is_last[:, :-1]
        return (keep * critic_loss(critic, real_logits[:, :-1], real_returns, real_slow[:, :-1])).mean()


def batch_size(obs: PyTorchObs) -> int:
    """N of observations [N, ...] (or a dict of them)."""
    return next(iter(obs.values())).shape[0] if isinstance(obs, dict) else obs.shape[0]


@contextmanager
def frozen(*modules: th.nn.Module) -> Iterator[None]:
    """Operations inside record no gradient for the modules' parameters (gradients still flow through them)."""
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


class MlpLatentPolicy(DreamerPolicy):
    """Dreamer policy for vector observations (Box; Discrete, MultiDiscrete and MultiBinary as one-hots and
    bits): symlog MLP encoder and decoder."""

    observation_kinds = ("vector",)


class CnnLatentPolicy(DreamerPolicy):
    """Dreamer policy for image (Box, uint8 in [0, 255]) observations: CNN encoder and decoder over
    channel-first images resized to ``image_size`` (see :mod:`sb3_dreamer.networks.encoders`)."""

    observation_kinds = ("image",)


class MultiInputLatentPolicy(DreamerPolicy):
    """Dreamer policy for Dict observations of image keys and vector keys (Box, Discrete, MultiDiscrete,
    MultiBinary): a CNN per group of image keys of one size, a symlog MLP over the vector keys, one
    decoder per kind for the ``decoder_keys``."""

    observation_kinds = ("dict",)
