"""Dreamer: DreamerV3 as a Stable-Baselines3 algorithm.

The algorithm orchestrates: it collects env steps while carrying the policy's latent state, writes
them to a :class:`~sb3_dreamer.buffers.SequenceReplayBuffer`, and runs ``train_ratio / (batch_size *
sequence_length)`` gradient updates per env step, each one (1) a world-model step on a replayed
batch, (2) imagination from its posterior states, (3) an actor-critic step on the imagined
trajectories and a replay value step on the real ones. The math lives in the modules.
"""

from __future__ import annotations

import io
import pathlib
import sys
import time
import warnings
from collections.abc import Collection, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.base_class import BaseAlgorithm, maybe_make_env
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.save_util import load_from_pkl, save_to_pkl
from stable_baselines3.common.type_aliases import GymEnv, MaybeCallback, Schedule
from stable_baselines3.common.utils import safe_mean
from stable_baselines3.common.vec_env import VecEnv, VecNormalize

from sb3_dreamer import arguments
from sb3_dreamer.allocator import glibc_available, retain_freed_memory, user_tuned_malloc
from sb3_dreamer.buffers import SequenceReplayBuffer
from sb3_dreamer.cuda_graph import CapturedUpdate
from sb3_dreamer.launcher import usable_cores
from sb3_dreamer.networks.world_model import WorldModelOutput
from sb3_dreamer.optimizers import LaProp
from sb3_dreamer.policies import (
    CnnLatentPolicy,
    DreamerPolicy,
    MlpLatentPolicy,
    MultiInputLatentPolicy,
    check_action_space,
    check_observation_space,
)
from sb3_dreamer.save_util import replaced_when_complete
from sb3_dreamer.type_aliases import ActorLosses, LatentState, SequenceSamples

SelfDreamer = TypeVar("SelfDreamer", bound="Dreamer")


# Eager CPU updates in one learn() from which Dreamer suggests compiling (1-3 minutes of compilation
# pay off after 1,000-2,000 updates; see the README's Speed section).
EAGER_CPU_UPDATES_WARNING = 2_000
# Constructor options that choose how updates run, checked by Dreamer._check_speed_options.
SPEED_OPTIONS = frozenset({"cuda_graph", "precision", "compile_steps", "compile_losses", "parallel_backward", "retain_cpu_memory"})
# The ranges of Dreamer's constructor arguments, checked at construction and for those passed to ``load``.
ARGUMENT_RULES: dict[str, arguments.Rule] = {
    "buffer_size": arguments.integer_at_least(1),
    "learning_starts": arguments.number_at_least(0),  # compared with env steps only: 1e3 works
    "batch_size": arguments.integer_at_least(1),
    "sequence_length": arguments.integer_at_least(2),
    "train_ratio": arguments.number_at_least(0),
    "imagination_horizon": arguments.integer_at_least(1),
    "imagination_starts": arguments.or_none(arguments.integer_at_least(1)),  # None: all posterior states
    "gamma": arguments.number_within(0, 1),
    "return_lambda": arguments.number_within(0, 1),
    "actor_gradient": arguments.one_of("auto", "reinforce", "dynamics"),
    "entropy_coef": arguments.number_at_least(0),
    "critic_ema_rate": arguments.number_within(0, 1, low_open=True),
    "replay_value_scale": arguments.number_at_least(0),
}


def available_cores() -> int:
    """How many CPU cores this process may run on (its affinity mask where the OS has one, e.g. under ``taskset``)."""
    return len(usable_cores())


def check_spaces(
    observation_space: spaces.Space,
    action_space: spaces.Space,
    policy_class: type[DreamerPolicy] = DreamerPolicy,
    normalize_images: bool = True,
) -> None:
    """Raise ValueError naming the space (and what is supported) when Dreamer with ``policy_class`` cannot handle it.

    Observations: Box vectors (MlpLatentPolicy), Box images (CnnLatentPolicy; uint8 in [0, 255],
    channel-last or channel-first; or, with ``normalize_images=False``, any 3-D Box, channel-first
    unless uint8, since SB3 transposes only those), Dict of those (MultiInputLatentPolicy).
    Actions: Discrete, MultiDiscrete, MultiBinary, bounded Box.
    """
    check_action_space(action_space)
    check_observation_space(policy_class, observation_space, normalize_images)


def check_policy_class(policy_class: Any) -> None:
    """Raise ValueError unless ``policy_class`` is one of Dreamer's policies (a :class:`DreamerPolicy` subclass)."""
    if not (isinstance(policy_class, type) and issubclass(policy_class, DreamerPolicy)):
        raise ValueError(
            f"Dreamer needs one of its own policies (MlpLatentPolicy, CnnLatentPolicy, MultiInputLatentPolicy or another "
            f"DreamerPolicy subclass), got {policy_class!r}: a model saved by another algorithm loads with that "
            "algorithm's class (e.g. SAC.load)"
        )


def check_finite_step(new_obs: np.ndarray | dict[str, np.ndarray], rewards: np.ndarray, dones: np.ndarray, infos: list[dict], step: int) -> None:
    """Raise ValueError where an env step gave a NaN or infinite reward or observation (also a final
    observation): stored in replay, it would turn every later loss, parameter and action into NaN."""

    def bad_envs(obs: np.ndarray | dict[str, np.ndarray]) -> np.ndarray:  # obs [n, *shape] (or a dict of them) -> [n] bool
        arrays = list(obs.values()) if isinstance(obs, dict) else [obs]
        bad = np.zeros(len(arrays[0]), dtype=bool)
        for array in arrays:
            if array.dtype.kind == "f":  # integer observations (images) are finite
                bad |= ~np.isfinite(array.reshape(len(array), -1)).all(1)
        return bad

    problems = [f"reward {rewards[i]} in env {i}" for i in np.flatnonzero(~np.isfinite(rewards))]
    problems += [f"an observation with NaN or inf in env {i}" for i in np.flatnonzero(bad_envs(new_obs))]
    for i in np.flatnonzero(dones):
        final = infos[i].get("terminal_observation")
        if final is not None and bad_envs({k: np.asarray(v)[None] for k, v in final.items()} if isinstance(final, dict) else np.asarray(final)[None])[0]:
            problems.append(f"a final observation with NaN or inf in env {i}")
    if problems:
        raise ValueError(
            f"The env gave {', '.join(problems)} at env step {step}: Dreamer would store it in replay and learn NaN "
            "from it. Fix the env (SB3's VecCheckNan(env, raise_exception=True) finds where it comes from)"
        )


def check_final_observations(dones: np.ndarray, infos: list[dict]) -> None:
    """Raise ValueError where an env's episode ended without ``infos[i]["terminal_observation"]``,
    the final observation Dreamer stores (its reward and continue flag are what the world model
    learns an episode's end from)."""
    missing = [int(i) for i in np.flatnonzero(dones) if infos[i].get("terminal_observation") is None]
    if missing:
        raise ValueError(
            f"the VecEnv gave no infos[i]['terminal_observation'] for the episode that ended in env(s) {missing}: Dreamer "
            "stores each episode's final observation. Use a VecEnv that puts it there, as SB3's DummyVecEnv and "
            "SubprocVecEnv do (a VecEnvWrapper that rebuilds the infos must keep that key)"
        )


class Dreamer(BaseAlgorithm):
    """DreamerV3 (Hafner et al., 2023; 2024 code): a world model and an actor-critic trained in its imagination.

    :param policy: policy class or alias: "MlpLatentPolicy" (or "MlpPolicy") for vector observations,
        "CnnLatentPolicy" (or "CnnPolicy") for images, "MultiInputLatentPolicy" (or "MultiInputPolicy")
        for Dict observations of images and vectors
    :param env: environment or its registered id
    :param learning_rate: learning rate of the single optimiser (float or schedule of progress remaining)
    :param buffer_size: replay capacity in env steps, over all envs (rows, see ``buffers.py``)
    :param learning_starts: env steps of uniformly random actions before the first update
    :param batch_size: sequences per batch (B)
    :param sequence_length: steps per replayed sequence (T)
    :param train_ratio: replayed steps per env step. Gradient updates per env step are
        ``train_ratio / (batch_size * sequence_length)``: with the defaults 512 / (16 * 32) = 1, one
        update per env step (counted over all envs), the update rate of DreamerV3's proprioceptive
        control preset (1024 with 16 x 64 batches). Its other presets: 32 (default), 256 (Atari100k).
        The realised value is logged as ``train/replay_ratio``.
    :param imagination_horizon: imagined steps from each start state (H)
    :param imagination_starts: posterior states imagination starts from, drawn at random from the
        ``batch_size * sequence_length`` of the batch; None uses all of them (DreamerV3). The
        actor-critic's cost grows with this number, the world model's does not.
    :param gamma: discount, learned into the continue head (DreamerV3: 1 - 1/333)
    :param return_lambda: lambda of the lambda-returns
    :param actor_gradient: how the actor learns from imagined returns: "reinforce" (DreamerV3 2024,
        log-prob times advantage), "dynamics" (backpropagate the returns through the world model,
        DreamerV1 and DreamerV3 2023 for continuous actions), or "auto": "dynamics" for Box actions,
        "reinforce" for Discrete, MultiDiscrete and MultiBinary ones
    :param entropy_coef: actor entropy bonus
    :param critic_ema_rate: rate of the slow critic's EMA towards the critic, per update
    :param replay_value_scale: weight of the critic loss on real replayed sequences
    :param replay_context: store each step's latent in replay and start every replayed sequence from
        the latent of the step before it (DreamerV3 2024) instead of from zeros; stored latents are
        refreshed each time their rows are replayed. Costs (D + S*K) * 2 bytes per stored step.
    :param cuda_graph: capture the whole gradient update in a CUDA graph and replay it for every
        batch (:mod:`sb3_dreamer.cuda_graph`); None: on for CUDA devices, off otherwise. Needs the
        default optimiser (LaProp).
    :param precision: "float32", "bfloat16" (autocast: matrix products in bfloat16, softmaxes, losses,
        two-hot, KL and percentiles in float32) or "auto": bfloat16 on CUDA devices that support it,
        float32 otherwise
    :param compile_steps: ``torch.compile`` the per-step functions (posterior step, prior step,
        actor; 8 posterior steps of a replayed sequence and 5 imagination steps per compiled call)
        and the lambda-return loop, fusing their small kernels; compiled once per batch shape
        (~2 minutes on a fresh GPU machine at size12m, cached on disk after).
        None: on with CUDA graphs, off otherwise (on a CPU: ~0.8x the eager update after 1-2 minutes
        of compilation, worth it for long runs; see the README's Speed section)
    :param compile_losses: ``torch.compile`` the loss computations outside the time loops (world-model
        heads and KL terms, the actor's loss after imagination, REINFORCE or through the dynamics,
        critic losses), forward and backward. Off by
        default: it needs a C++ compiler. CPU only: on a CUDA device (torch 2.11) its imagined returns
        did not match eager, so it raises ValueError there (a model saved with it and loaded on a
        CUDA device computes its losses eagerly there)
    :param parallel_backward: on a CPU, run the world model's backward pass (with the replay value
        loss's) on a second thread while the imagined critic loss and the actor-critic backward pass
        run on this one; the gradients are the same. None: on while torch runs one thread
        (``torch.set_num_threads(1)``, ``OMP_NUM_THREADS=1``) and this process may use at least two
        CPU cores, where it uses the idle second core (0.84-0.91x the update measured); off when torch's own
        threads already use the cores (slower there). See the README's Speed section. Never on
        CUDA, where the backward pass already runs asynchronously
    :param retain_cpu_memory: keep the memory each update frees in the process for the next update
        (glibc's ``malloc`` on Linux: allocations up to 32 MiB from the heap, free heap memory
        returned to the OS only beyond 1 GiB; :mod:`sb3_dreamer.allocator`) instead of returning
        it to the OS and page-faulting it in again at the next update. Process-wide and not undone.
        None: on for CPU devices, unless the environment already tunes ``malloc``
        (``MALLOC_*_`` variables, ``GLIBC_TUNABLES``, or jemalloc/tcmalloc in ``LD_PRELOAD``);
        measured 0.87-0.90x the eager update and 0.90x the compiled one on CartPole-v1
        (one thread). True needs glibc
    :param policy_kwargs: policy keyword arguments, e.g. ``dict(size="size12m")``
    :param replay_buffer_kwargs: extra :class:`SequenceReplayBuffer` keyword arguments, e.g.
        ``dict(storage="device")`` to keep replay in the training device's memory (GPU) instead of RAM
    :param stats_window_size: episodes averaged in the rollout logs
    :param tensorboard_log: TensorBoard log folder (None: no TensorBoard)
    :param verbose: 0 silent, 1 info, 2 debug
    :param seed: random seed
    :param device: torch device ("auto" picks CUDA when available)
    :param _init_setup_model: build the networks at construction (``load`` passes False)
    """

    # Attributes that belong to this process (a worker thread, a captured CUDA graph, whether this process
    # compiled for a batch shape): neither saved nor copied; made again on first use.
    _PROCESS_LOCAL: ClassVar[tuple[str, ...]] = ("_backward_pool", "_captured_update", "_updated_shape")
    policy_aliases: ClassVar[dict[str, type[DreamerPolicy]]] = {
        "MlpLatentPolicy": MlpLatentPolicy,
        "MlpPolicy": MlpLatentPolicy,
        "CnnLatentPolicy": CnnLatentPolicy,
        "CnnPolicy": CnnLatentPolicy,
        "MultiInputLatentPolicy": MultiInputLatentPolicy,
        "MultiInputPolicy": MultiInputLatentPolicy,
    }
    policy: DreamerPolicy
    replay_buffer: SequenceReplayBuffer

    def __init__(
        self,
        policy: str | type[DreamerPolicy],
        env: GymEnv | str | None,
        learning_rate: float | Schedule = 3e-4,
        buffer_size: int = 1_000_000,
        learning_starts: int = 500,
        batch_size: int = 16,
        sequence_length: int = 32,
        train_ratio: float = 512.0,
        imagination_horizon: int = 15,
        imagination_starts: int | None = 256,
        gamma: float = 1.0 - 1.0 / 333.0,
        return_lambda: float = 0.95,
        actor_gradient: str = "auto",
        entropy_coef: float = 3e-4,
        critic_ema_rate: float = 0.02,
        replay_value_scale: float = 0.3,
        replay_context: bool = False,
        cuda_graph: bool | None = None,
        precision: str = "auto",
        compile_steps: bool | None = None,
        compile_losses: bool = False,
        parallel_backward: bool | None = None,
        retain_cpu_memory: bool | None = None,
        policy_kwargs: dict[str, Any] | None = None,
        replay_buffer_kwargs: dict[str, Any] | None = None,
        stats_window_size: int = 100,
        tensorboard_log: str | None = None,
        verbose: int = 0,
        seed: int | None = None,
        device: th.device | str = "auto",
        _init_setup_model: bool = True,
    ) -> None:
        policy_class = self._get_policy_from_name(policy) if isinstance(policy, str) else policy
        check_policy_class(policy_class)  # (load() builds with the saved policy class)
        if env is not None:
            env = maybe_make_env(env, verbose)
        if env is not None and _init_setup_model:
            # (load() rebuilds without policy_kwargs: there SB3 checks the env against the saved spaces.)
            normalize_images = (policy_kwargs or {}).get("normalize_images", True)
            check_spaces(env.observation_space, env.action_space, policy_class, normalize_images)
        # Every ruled argument, by name (a rule for an argument the constructor lacks fails here, loudly).
        given = locals()
        problems = arguments.problems({name: given[name] for name in ARGUMENT_RULES}, ARGUMENT_RULES)
        if problems:
            raise ValueError("Dreamer: " + "; ".join(problems))
        super().__init__(
            policy_class,  # resolved above
            env,
            learning_rate,
            policy_kwargs=policy_kwargs,
            stats_window_size=stats_window_size,
            tensorboard_log=tensorboard_log,
            verbose=verbose,
            device=device,
            support_multi_env=True,
            seed=seed,
        )
        self.buffer_size = buffer_size
        self.learning_starts = learning_starts
        self.batch_size = batch_size
        self.sequence_length = sequence_length
        self.train_ratio = train_ratio
        self.imagination_horizon = imagination_horizon
        self.imagination_starts = imagination_starts
        self.gamma = gamma
        self.return_lambda = return_lambda
        self.actor_gradient = actor_gradient
        self.entropy_coef = entropy_coef
        self.critic_ema_rate = critic_ema_rate
        self.replay_value_scale = replay_value_scale
        self.replay_context = replay_context
        self.cuda_graph = cuda_graph
        self.precision = precision
        self.compile_steps = compile_steps
        self.compile_losses = compile_losses
        self.parallel_backward = parallel_backward
        self.retain_cpu_memory = retain_cpu_memory
        self._backward_pool: ThreadPoolExecutor | None = None
        self._updated_shape: tuple | None = None  # the last batch shape updated on (see _seen_batch_shape)
        self._captured_update: CapturedUpdate | None = None
        self._check_speed_options(policy_kwargs or {})
        self.replay_buffer_kwargs = replay_buffer_kwargs or {}
        self._update_credit = 0.0  # gradient updates owed to the env steps collected so far
        self._replayed_steps = 0  # sequence steps replayed by the updates of the current learn() (train/replay_ratio)
        self._credited_env_steps = 0  # env steps of the current learn() that earned updates (train/replay_ratio)
        self._replay_normalizer_fit: tuple[VecNormalize, bool] | None = None  # see _replay_normalizer
        self._last_latent: LatentState | None = None
        self._last_rewards: np.ndarray | None = None
        if _init_setup_model:
            self._check_replay_columns(self.buffer_size // self.n_envs)
            self._setup_model()

    # ------------------------------------------------------------------------------------ setup
    @property
    def updates_per_step(self) -> float:
        """Gradient updates per env step: ``train_ratio / (batch_size * sequence_length)``."""
        return self.train_ratio / (self.batch_size * self.sequence_length)

    @property
    def backprop_actor(self) -> bool:
        """Whether the actor learns by backpropagation through the dynamics (see ``actor_gradient``)."""
        if self.actor_gradient == "auto":
            return isinstance(self.action_space, spaces.Box)
        return self.actor_gradient == "dynamics"

    def _setup_model(self) -> None:
        self._setup_lr_schedule()
        self.set_random_seed(self.seed)
        self.policy = self.policy_class(  # type: ignore[assignment]
            self.observation_space, self.action_space, self.lr_schedule, **self.policy_kwargs
        ).to(self.device)
        rssm = self.policy.world_model.rssm
        self.replay_buffer = SequenceReplayBuffer(
            self.buffer_size, self.observation_space, self.action_space, device=self.device, n_envs=self.n_envs,
            latent_dims=(rssm.deter_dim, rssm.stoch_dim) if self.replay_context else None, **self.replay_buffer_kwargs,
        )  # fmt: skip
        self._last_latent = None
        self._captured_update = None
        if self.uses_retained_cpu_memory:
            retain_freed_memory()
        if self.compile_steps or (self.compile_steps is None and self.uses_cuda_graph):
            self.policy.compile_steps()
        # On CUDA, asked for, compile_losses is refused (_check_speed_options); saved with a model and
        # loaded there, it runs the losses eagerly.
        if self.compile_losses and self.device.type != "cuda":
            self.policy.compile_losses()

    def _check_replay_columns(self, rows: int) -> None:
        """ValueError when each env's replay column (``rows = buffer_size // n_envs``) is shorter than
        one sampled sequence: no batch could ever be sampled, so no update would run."""
        if rows < self.sequence_length:
            raise ValueError(
                f"buffer_size={self.buffer_size} over n_envs={self.n_envs} gives each env's replay column {rows} rows, "
                f"fewer than sequence_length={self.sequence_length}: no sequence could be sampled and Dreamer would never "
                f"update. Pass buffer_size >= {self.sequence_length * self.n_envs}, or a shorter sequence_length."
            )

    def _check_speed_options(self, policy_kwargs: dict[str, Any], options: Collection[str] = SPEED_OPTIONS) -> None:
        """Refuse speed options this device or optimiser cannot honour: at construction all of them,
        at :meth:`load` only ``options``, those passed to it. (Saved with a model, an option adapts
        to the device it loads on: ``cuda_graph=True`` on a CPU simply runs eagerly.)"""
        optimizer_class = policy_kwargs.get("optimizer_class", LaProp)
        if "cuda_graph" in options and self.cuda_graph and self.device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs a CUDA device, got device={self.device}; pass cuda_graph=None or False")
        laprop = isinstance(optimizer_class, type) and issubclass(optimizer_class, LaProp)
        if "cuda_graph" in options and self.cuda_graph and not laprop:
            raise ValueError(
                "cuda_graph=True needs the default optimiser LaProp (step count and learning rate on the device), "
                f"got {optimizer_class}; pass cuda_graph=False"
            )
        if "parallel_backward" in options and self.parallel_backward and self.device.type != "cpu":
            raise ValueError(
                f"parallel_backward=True runs the world model's backward pass on a second CPU thread, got device={self.device} "
                "(where the backward pass already runs asynchronously); pass parallel_backward=None or False"
            )
        if "retain_cpu_memory" in options and self.retain_cpu_memory and not glibc_available():
            raise ValueError(
                "retain_cpu_memory=True sets glibc's malloc (Linux), which this process does not use "
                f"({sys.platform}); pass retain_cpu_memory=None or False"
            )
        if "compile_losses" in options and self.compile_losses and self.device.type == "cuda":
            # Measured 2026-11-24 (torch 2.11.0+cu130, H100; tests/test_cuda_graph.py): with the
            # compiled losses the mean imagined return after one update was -0.036 where eager
            # gave 1e-4, with or without the CUDA graph; the same code matches eager on a CPU. A
            # model saved with it and loaded on a CUDA device runs its losses eagerly there.
            raise ValueError(
                f"compile_losses=True is not supported on CUDA devices (device={self.device}): there the compiled "
                "REINFORCE loss gave imagined returns far from the eager ones. Pass compile_losses=False; "
                "compile_steps and the CUDA graph, the CUDA defaults, are the fast path there."
            )
        if "precision" in options and self.precision not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"precision must be 'auto', 'float32' or 'bfloat16', got {self.precision!r}")
        bf16_on_cuda = self.precision == "bfloat16" and self.device.type == "cuda"
        if "precision" in options and bf16_on_cuda and not th.cuda.is_bf16_supported():
            raise ValueError(f"precision='bfloat16' is not supported by {th.cuda.get_device_name(self.device)}; use 'float32'")

    @property
    def uses_cuda_graph(self) -> bool:
        """Whether updates replay a captured CUDA graph: ``cuda_graph`` (None or True) on a CUDA
        device with LaProp; eager everywhere else."""
        return (
            self.cuda_graph is not False and self.device.type == "cuda" and isinstance(self.policy.optimizer, LaProp)
        )

    @property
    def uses_parallel_backward(self) -> bool:
        """Whether the world model's backward pass runs on a second thread (``parallel_backward``):
        True, or None while torch runs one thread (``torch.get_num_threads()``) and this process
        may use at least two CPU cores; only on a CPU."""
        if self.device.type != "cpu" or self.parallel_backward is False:
            return False
        return bool(self.parallel_backward) or (th.get_num_threads() == 1 and available_cores() >= 2)

    @property
    def uses_retained_cpu_memory(self) -> bool:
        """Whether this model sets glibc's malloc to keep freed memory (``retain_cpu_memory``), on
        glibc only: True, or None on a CPU device where the environment does not tune malloc itself.
        (A model saved with True still loads where there is no glibc: there it leaves malloc alone.)"""
        if self.retain_cpu_memory is False or not glibc_available():
            return False
        return bool(self.retain_cpu_memory) or (self.device.type == "cpu" and not user_tuned_malloc())

    @property
    def autocast_dtype(self) -> th.dtype | None:
        """bfloat16 when the update runs under autocast (``precision``, resolved for the device), else None."""
        if self.precision == "bfloat16" or (
            self.precision == "auto" and self.device.type == "cuda" and th.cuda.is_bf16_supported()
        ):
            return th.bfloat16
        return None

    def __getstate__(self) -> dict[str, Any]:
        """For ``copy.deepcopy`` and ``pickle`` (as they work on SB3's algorithms): the state without
        what belongs to this process, the ``parallel_backward`` thread and a captured CUDA graph; a
        copy makes its own on first use."""
        state = self.__dict__.copy()
        state.update(dict.fromkeys(self._PROCESS_LOCAL))
        return state

    def _excluded_save_params(self) -> list[str]:
        return [*super()._excluded_save_params(), *self._PROCESS_LOCAL, "_last_latent", "_replay_normalizer_fit"]

    def set_parameters(self, *args, **kwargs) -> None:  # type: ignore[override]
        """SB3's ``set_parameters``; a captured update holds the old optimiser state, so it is dropped."""
        super().set_parameters(*args, **kwargs)
        self._captured_update = None

    def _update_learning_rate(self, optimizers: list[th.optim.Optimizer] | th.optim.Optimizer) -> None:
        """Set the scheduled learning rate, in place where it is a device tensor (a captured update reads it)."""
        lr = self.lr_schedule(self._current_progress_remaining)
        self.logger.record("train/learning_rate", lr)
        for optimizer in optimizers if isinstance(optimizers, list) else [optimizers]:
            for group in optimizer.param_groups:
                if isinstance(group["lr"], th.Tensor):
                    group["lr"].fill_(lr)
                else:
                    group["lr"] = lr

    @classmethod
    def load(  # type: ignore[override]
        cls: type[SelfDreamer],
        path: str | pathlib.Path | io.BufferedIOBase,
        env: GymEnv | None = None,
        device: th.device | str = "auto",
        custom_objects: dict[str, Any] | None = None,
        print_system_info: bool = False,
        force_reset: bool = True,
        **kwargs: Any,
    ) -> SelfDreamer:
        """SB3's ``load``; speed options passed here (``cuda_graph=True`` on a CPU, ...) are refused as
        the constructor refuses them, while those saved with the model adapt to the device; other
        constructor arguments passed here are checked as the constructor checks them."""
        problems = arguments.problems(kwargs, ARGUMENT_RULES)
        if problems:
            raise ValueError("Dreamer.load: " + "; ".join(problems))
        model = super().load(
            path, env=env, device=device, custom_objects=custom_objects, print_system_info=print_system_info,
            force_reset=force_reset, **kwargs,
        )  # fmt: skip
        if SPEED_OPTIONS & kwargs.keys():
            model._check_speed_options(model.policy_kwargs, options=SPEED_OPTIONS & kwargs.keys())
        return model

    def _get_torch_save_params(self) -> tuple[list[str], list[str]]:
        return ["policy", "policy.optimizer"], []

    def save(
        self,
        path: str | pathlib.Path | io.BufferedIOBase,
        exclude: Iterable[str] | None = None,
        include: Iterable[str] | None = None,
    ) -> None:
        """SB3's ``save``, written so that a file already at ``path`` is replaced only by a complete
        new one (a save stopped midway leaves the previous model; see
        :func:`~sb3_dreamer.save_util.replaced_when_complete`)."""
        with replaced_when_complete(path, "zip") as target:
            super().save(target, exclude=exclude, include=include)

    def save_replay_buffer(self, path: str | pathlib.Path | io.BufferedIOBase) -> None:
        """Pickle the replay buffer (as SB3's off-policy algorithms do); a file already at ``path`` is
        replaced only by a complete new one, as in :meth:`save`."""
        with replaced_when_complete(path, "pkl") as target:
            save_to_pkl(target, self.replay_buffer, self.verbose)

    def load_replay_buffer(self, path: str | pathlib.Path | io.BufferedIOBase, truncate_last_traj: bool = True) -> None:
        """Load a pickled replay buffer (onto this model's device, its rows kept in RAM or on the
        device as this model's ``storage`` says; its replay-context latents adapted to this model,
        see :meth:`SequenceReplayBuffer.set_latent_dims`).

        :param truncate_last_traj: mark each column's newest row as the end of its episode and start
            the next row collected as a new sequence (the episodes in progress in the env, if any, do
            not continue the buffer's); False when the buffer was saved at the env's current step
        """
        buffer = load_from_pkl(path, self.verbose)
        if not isinstance(buffer, SequenceReplayBuffer):
            raise TypeError(f"{path} holds a {type(buffer).__name__}, not a SequenceReplayBuffer")
        if buffer.n_envs != self.n_envs:
            raise ValueError(
                f"The replay buffer has {buffer.n_envs} env columns but the model has n_envs={self.n_envs}: build or load "
                f"the model with an env of {buffer.n_envs} envs (Dreamer(policy, env) or Dreamer.load(path, env=env); set_env "
                "cannot change the number of envs) before loading this buffer"
            )
        for kind, saved, own in (("observation", buffer.observation_space, self.observation_space),
                                 ("action", buffer.action_space, self.action_space)):  # fmt: skip
            if saved != own:
                raise ValueError(f"The replay buffer holds {kind}s of {saved} but this model's {kind} space is {own}: "
                                 "load a buffer saved by a model of the same env")  # fmt: skip
        if buffer.capacity < self.sequence_length:
            raise ValueError(
                f"The replay buffer holds {buffer.capacity} rows per env column, fewer than sequence_length="
                f"{self.sequence_length}: no sequence could be sampled from it. Load it into a model with "
                f"sequence_length <= {buffer.capacity}"
            )
        rssm = self.policy.world_model.rssm
        saved_latents = buffer.latent_dims
        if buffer.set_latent_dims((rssm.deter_dim, rssm.stoch_dim) if self.replay_context else None):
            warnings.warn(
                f"The replay buffer stores replay-context latents of sizes {saved_latents} but this model "
                f"(replay_context={self.replay_context}, deter={rssm.deter_dim}, stoch={rssm.stoch_dim}) needs "
                f"{buffer.latent_dims}: its rows are kept, their latents {'zeroed' if buffer.latent_dims else 'dropped'}",
                UserWarning,
                stacklevel=2,
            )
        buffer.to(self.device, storage=self.replay_buffer.storage)  # as this model keeps its replay (replay_buffer_kwargs)
        if truncate_last_traj:
            buffer.truncate_last_trajectories()
            if self._last_episode_starts is not None:
                self._last_episode_starts = np.ones_like(self._last_episode_starts)
        self.replay_buffer = buffer

    # ------------------------------------------------------------------------------------ learn
    def _setup_learn(
        self,
        total_timesteps: int,
        callback: MaybeCallback = None,
        reset_num_timesteps: bool = True,
        tb_log_name: str = "run",
        progress_bar: bool = False,
    ) -> tuple[int, BaseCallback]:
        if self.env is None:
            raise ValueError(
                "This model has no env to learn from (loaded without one?): pass env= to Dreamer.load, or call "
                "model.set_env(env) before learn()"
            )
        self._check_replay_columns(self.replay_buffer.capacity)
        if reset_num_timesteps or self._last_obs is None:
            # The env is about to be reset: the episode in progress in each column ends here.
            self.replay_buffer.truncate_last_trajectories()
        self._replayed_steps = 0  # the realised replay ratio is that of this learn() call
        self._credited_env_steps = 0
        return super()._setup_learn(total_timesteps, callback, reset_num_timesteps, tb_log_name, progress_bar)

    def learn(
        self: SelfDreamer,
        total_timesteps: int,
        callback: MaybeCallback = None,
        log_interval: int | None = 4,
        tb_log_name: str = "Dreamer",
        reset_num_timesteps: bool = True,
        progress_bar: bool = False,
    ) -> SelfDreamer:
        """Train for ``total_timesteps`` env steps; logs every ``log_interval`` episodes (None: never)."""
        total_timesteps, callback = self._setup_learn(total_timesteps, callback, reset_num_timesteps, tb_log_name, progress_bar)
        self._warn_if_eager_on_cpu(total_timesteps - self.num_timesteps)
        callback.on_training_start(locals(), globals())
        assert self.env is not None, "You must set the environment before calling learn()"
        while self.num_timesteps < total_timesteps:
            continue_training = self.collect_rollouts(self.env, callback, log_interval)
            # Updates are owed from the first env step at which a batch can be sampled (no burst of
            # owed updates when the columns fill after learning_starts).
            can_learn = self.num_timesteps >= self.learning_starts and self.replay_buffer.can_sample(self.sequence_length)
            if can_learn:
                self._update_credit += self.env.num_envs * self.updates_per_step
                self._credited_env_steps += self.env.num_envs
            if not continue_training:
                break  # the step is stored (see collect_rollouts) and its updates stay owed to a continuing learn()
            gradient_steps = int(self._update_credit) if can_learn else 0  # owed updates wait for a batch to sample
            if gradient_steps > 0:
                self._update_credit -= gradient_steps
                self.train(gradient_steps)
        callback.on_training_end()
        return self

    def _warn_if_eager_on_cpu(self, env_steps: int) -> None:
        """UserWarning (as SB3 warns about PPO on a GPU) when a ``learn`` of ``env_steps`` more env
        steps will run at least :data:`EAGER_CPU_UPDATES_WARNING` updates eagerly on a CPU with
        ``compile_steps`` left at None; an explicit ``compile_steps=False`` silences it."""
        if self.device.type != "cpu" or self.compile_steps is not None:
            return
        learning_steps = max(env_steps - max(self.learning_starts - self.num_timesteps, 0), 0)
        updates = int(learning_steps * self.updates_per_step)
        if updates >= EAGER_CPU_UPDATES_WARNING:
            warnings.warn(
                f"Dreamer will run this learn()'s ~{updates} gradient updates eagerly on the CPU. For a run this long, "
                "compile_steps=True, compile_losses=True make each update about 0.55-0.75x as long (measured on a 2-core "
                "CPU), after 1-3 minutes of compilation the first time (torch.compile, which needs a C++ compiler; cached "
                "on disk after). See the README's Speed section. Pass compile_steps=False to keep eager updates without "
                "this warning.",
                UserWarning,
                stacklevel=3,
            )

    def collect_rollouts(self, env: VecEnv, callback: BaseCallback, log_interval: int | None = None) -> bool:
        """One step of every env, acting with the carried latent; stores the rows. Returns False to stop."""
        assert self._last_obs is not None and self._last_episode_starts is not None
        n = env.num_envs
        if self._last_latent is None or self._last_latent.deter.shape[0] != n:
            self._last_latent = self.policy.initial_state(n)
        if self._last_rewards is None or self._last_rewards.shape != (n,):
            self._last_rewards = np.zeros(n, dtype=np.float32)
        self.policy.set_training_mode(False)
        callback.on_rollout_start()
        obs, starts = self._last_obs, self._last_episode_starts
        with th.no_grad():
            obs_tensor, _ = self.policy.obs_to_tensor(obs)
            starts_tensor = th.as_tensor(starts, dtype=th.float32, device=self.device)
            latent = self.policy.act(obs_tensor, self._last_latent, starts_tensor)  # type: ignore[arg-type]
            if self.num_timesteps < self.learning_starts:
                latent = latent._replace(action=self.policy.random_action(n))
        action = latent.action.cpu().numpy()
        actions = self.policy.to_env_action(action)  # as the env takes them (``locals["actions"]``, as in SB3)
        new_obs, rewards, dones, infos = env.step(actions)
        self.num_timesteps += n
        check_final_observations(dones, infos)
        stored_obs, stored_rewards, stored_infos, next_stored_obs = obs, rewards, infos, new_obs
        normalizer = self._replay_normalizer
        if normalizer is not None:  # store what the env gave before normalisation, as SB3's off-policy algorithms do
            assert self._last_original_obs is not None
            stored_obs, stored_rewards = self._last_original_obs, normalizer.get_original_reward()
            stored_infos = [  # new dicts: the callbacks' locals keep the env's
                dict(info, terminal_observation=normalizer.unnormalize_obs(info["terminal_observation"])) if done else info
                for info, done in zip(infos, dones)
            ]
            next_stored_obs = normalizer.get_original_obs()
        # What replay will hold (before VecNormalize, which clips an infinite observation to a finite one).
        check_finite_step(next_stored_obs, stored_rewards, dones, stored_infos, self.num_timesteps)
        if normalizer is not None:
            self._last_original_obs = next_stored_obs
        self._store_transition(stored_obs, action, starts, stored_rewards, dones, stored_infos, latent)
        callback.update_locals(locals())
        # Called once this step's rows are stored (SB3's off-policy loop calls it before storing, so a checkpoint
        # saved by a callback there misses the step, and the end of an episode with it). A callback that stops
        # training still gets this step stored and the latent carried: a later learn(reset_num_timesteps=False)
        # continues the episodes where they are.
        continue_training = callback.on_step()
        self._update_info_buffer(infos, dones)
        self._last_obs, self._last_episode_starts, self._last_latent = new_obs, dones, latent  # type: ignore[assignment]
        self._update_current_progress_remaining(self.num_timesteps, self._total_timesteps)
        for done in dones:
            if done:
                self._episode_num += 1
                if log_interval is not None and self._episode_num % log_interval == 0:
                    self.dump_logs()
        if not continue_training:
            return False
        callback.on_rollout_end()
        return True

    @property
    def _replay_normalizer(self) -> VecNormalize | None:
        """The env's ``VecNormalize`` (SB3's ``_vec_normalize_env``), whose statistics the replay is
        normalised with at sample time, its rows holding the observations and rewards from before it.
        None when there is none, or when a wrapper on top changes the observation space (a
        VecFrameStack, VecTransposeImage): then its original observations are not the agent's, and
        the rows hold the normalised ones the agent acted on."""
        normalizer = self._vec_normalize_env
        if normalizer is None:
            return None
        # Comparing two spaces costs ~0.1 ms (Box bounds), so once per env, not every env step.
        if self._replay_normalizer_fit is None or self._replay_normalizer_fit[0] is not normalizer:
            self._replay_normalizer_fit = (normalizer, normalizer.observation_space == self.observation_space)
        return normalizer if self._replay_normalizer_fit[1] else None

    def _store_transition(
        self,
        obs: np.ndarray | dict[str, np.ndarray],
        action: np.ndarray,
        starts: np.ndarray,
        rewards: np.ndarray,
        dones: np.ndarray,
        infos: list[dict],
        latent: LatentState,
    ) -> None:
        """Write the row of each env's current step, plus a final-observation row where an episode ended."""
        assert self._last_rewards is not None
        starts = np.asarray(starts, dtype=bool)
        false = np.zeros_like(starts)
        context = dict(deter=latent.deter.cpu().numpy(), stoch=latent.stoch.cpu().numpy()) if self.replay_context else {}
        # Reward that led to obs: 0 right after a reset (also after a forced reset by _setup_learn).
        self.replay_buffer.add(obs, action, np.where(starts, 0.0, self._last_rewards), starts, false, false, **context)
        ended = np.flatnonzero(dones)
        if len(ended):
            final = [infos[i]["terminal_observation"] for i in ended]
            final_obs = {key: np.stack([o[key] for o in final]) for key in obs} if isinstance(obs, dict) else np.stack(final)
            truncated = np.array([infos[i].get("TimeLimit.truncated", False) for i in ended], dtype=bool)
            self.replay_buffer.add(
                final_obs, np.zeros_like(action[ended]), rewards[ended], np.zeros(len(ended), bool),
                np.ones(len(ended), bool), ~truncated, env_indices=ended,
            )  # fmt: skip
        self._last_rewards = np.where(dones, 0.0, rewards).astype(np.float32)

    # ------------------------------------------------------------------------------------ train
    def train(self, gradient_steps: int, batch_size: int | None = None) -> None:
        """Run ``gradient_steps`` updates, each on a fresh replayed batch of ``batch_size`` sequences
        (default: the model's ``batch_size``; as SAC's ``train``, e.g. for extra updates on a loaded
        replay buffer). Another batch size runs eagerly where updates are captured in a CUDA graph
        (the graph holds one batch shape)."""
        batch_size = self.batch_size if batch_size is None else batch_size
        self.policy.set_training_mode(True)
        self._update_learning_rate(self.policy.optimizer)
        totals: dict[str, th.Tensor] = {}  # each metric summed over the updates, on the device
        for _ in range(gradient_steps):
            metrics = self.train_step(self.replay_buffer.sample(batch_size, self.sequence_length, env=self._replay_normalizer))
            if not totals:  # cloned: a CUDA graph's outputs are its static tensors, which the next replay overwrites
                totals = {key: value.clone() for key, value in metrics.items()}
            else:
                totals = {key: totals[key] + value for key, value in metrics.items()}
        self._n_updates += gradient_steps
        self._replayed_steps += gradient_steps * batch_size * self.sequence_length
        # The mean over this call's updates, as SAC logs its losses; one host sync.
        values = dict(zip(totals, (th.stack(list(totals.values())) / gradient_steps).tolist()))
        for key, value in values.items():
            self.logger.record(f"train/{key}", value)
        self.logger.record("train/n_updates", self._n_updates, exclude="tensorboard")
        # Over this learn() call (a continued or reloaded model's num_timesteps may restart at 0): replayed
        # steps per env step that earned updates (from the first at which a batch could be sampled), so
        # train_ratio up to the fraction of an update still owed.
        self.logger.record("train/replay_ratio", self._replayed_steps / max(self._credited_env_steps, 1))

    def train_step(self, data: SequenceSamples) -> dict[str, th.Tensor]:
        """One gradient update (eager, or replayed from a CUDA graph): returns detached 0-d metrics."""
        if self.uses_cuda_graph and data.rewards.shape[0] == self.batch_size:
            if self._captured_update is None:
                self._captured_update = CapturedUpdate(self._update, self.policy, self.policy.optimizer)
            metrics, deter, stoch = self._captured_update(data)
        else:
            metrics, deter, stoch = self._update(data)
        if self.replay_context:
            assert data.indices is not None
            self.replay_buffer.update_latents(data.indices, deter, stoch)
        return metrics

    def _update(self, data: SequenceSamples) -> tuple[dict[str, th.Tensor], th.Tensor, th.Tensor]:
        """World model, imagination, actor-critic, replay value and one optimiser step.

        Capturable in a CUDA graph: no host syncs, no data-dependent branches. With
        ``parallel_backward`` (CPU) the world model's backward pass, through the replay value loss
        too, runs on a second thread while this one computes the imagined critic loss and the
        actor-critic backward pass. The two graphs share only the critic's parameters (leaves), so
        the gradients are those of one backward pass of the summed loss.

        :return: detached 0-d metrics, posterior deter [B, T, D] and stoch [B, T, S*K]
        """
        policy = self.policy
        policy.optimizer.zero_grad(set_to_none=True)
        # The weight-cast cache lives inside each block (cleared on exit), so it is safe to capture.
        with self._autocast():
            wm_out, actor, replay_loss = self._world_and_actor_losses(data)
        model_loss = wm_out.loss.mean()
        world_loss = model_loss + self.replay_value_scale * replay_loss
        parallel = self.uses_parallel_backward and self._seen_batch_shape(data)
        pending = self._backward_thread().submit(world_loss.backward) if parallel else None
        try:
            with self._autocast():
                value_loss = policy.critic_value_loss(actor)
            actor_critic_loss = actor.policy_loss + value_loss
            loss = world_loss + actor_critic_loss
            if pending is None:
                loss.backward()
            else:
                actor_critic_loss.backward()
        finally:
            if pending is not None:
                pending.result()  # waits, even when this thread failed; re-raises the thread's error
        policy.optimizer.step()
        with th.no_grad():
            slow, fast = list(policy.critic_slow.parameters()), list(policy.critic.parameters())
            th._foreach_lerp_(slow, fast, self.critic_ema_rate)
        metrics = {
            "loss": loss,
            "model_loss": model_loss,
            **wm_out.metrics,
            "actor_loss": actor.policy_loss,
            "critic_loss": value_loss,
            "replay_value_loss": replay_loss,
            "actor_entropy": actor.entropy.mean(),
            "return_scale": actor.scale,
            "imagined_return": actor.returns.mean(),
            "imagined_reward": actor.reward.mean(),
            "imagined_cont": actor.cont.mean(),
        }
        metrics = {k: v.detach().float() for k, v in metrics.items()}
        return metrics, wm_out.deter.detach(), wm_out.stoch.detach()

    def _autocast(self) -> th.autocast:
        dtype = self.autocast_dtype
        return th.autocast(self.device.type, dtype=dtype or th.float32, enabled=dtype is not None)

    def _backward_thread(self) -> ThreadPoolExecutor:
        """The one worker thread of ``parallel_backward`` (made on first use; not saved)."""
        if self._backward_pool is None:
            self._backward_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dreamer-backward")
        return self._backward_pool

    def _seen_batch_shape(self, data: SequenceSamples) -> bool:
        """Whether an update of this batch shape has run before (in this process). The first one
        runs its backward passes on one thread: ``compile_steps`` and ``compile_losses`` compile
        then (the backward graphs on first use), and torch.compile is not thread-safe."""
        shape = (*data.rewards.shape, self.imagination_starts, self.imagination_horizon, self.backprop_actor)
        if shape == self._updated_shape:
            return True
        self._updated_shape = shape
        return False

    def _world_and_actor_losses(self, data: SequenceSamples) -> tuple[WorldModelOutput, ActorLosses, th.Tensor]:
        """The world model's output (with its loss), the actor's loss on imagined trajectories and
        the critic's replay value loss (0-d) of one update; the imagined critic loss comes after
        (:meth:`DreamerPolicy.critic_value_loss`)."""
        policy, wm = self.policy, self.policy.world_model
        batch, steps = data.rewards.shape
        # 1. World model on the replayed batch.
        initial = None if data.context_deter is None else (data.context_deter, data.context_stoch)
        wm_out = wm.loss(data.observations, data.prev_actions, data.rewards, data.is_first, data.is_terminal, self.gamma, initial)
        # 2. Imagination from the posterior states (all of them, or a random subset).
        deter, stoch = wm_out.deter.flatten(0, 1), wm_out.stoch.flatten(0, 1)
        starts = None
        if self.imagination_starts is not None and self.imagination_starts < batch * steps:
            # A random subset (rand + argsort rather than randperm: capturable in a CUDA graph).
            starts = th.rand(batch * steps, device=deter.device).argsort()[: self.imagination_starts]
            deter, stoch = deter[starts], stoch[starts]
        if self.backprop_actor:
            # 3. Actor: maximise the lambda-returns, differentiated through dynamics, heads and critic.
            actor = policy.dynamics_loss(deter, stoch, self.imagination_horizon, self.return_lambda, self.entropy_coef)
        else:
            # 3. Actor: REINFORCE with the percentile-normalised advantage.
            traj = policy.imagine(deter, stoch, self.imagination_horizon)
            actor = policy.reinforce_loss(traj, self.return_lambda, self.entropy_coef)
        # 4. Critic on the replayed sequences, bootstrapped by the imagined returns.
        real_feat = th.cat([wm_out.deter, wm_out.stoch], -1)
        replay_loss = policy.replay_value_loss(
            actor, real_feat, data.rewards, data.is_terminal, data.is_last, starts, self.gamma, self.return_lambda
        )
        return wm_out, actor, replay_loss

    def dump_logs(self) -> None:
        """Write rollout and time statistics, as SB3's off-policy algorithms do."""
        time_elapsed = max((time.time_ns() - self.start_time) / 1e9, sys.float_info.epsilon)
        fps = int((self.num_timesteps - self._num_timesteps_at_start) / time_elapsed)
        self.logger.record("time/episodes", self._episode_num, exclude="tensorboard")
        if self.ep_info_buffer and len(self.ep_info_buffer[0]) > 0:
            self.logger.record("rollout/ep_rew_mean", safe_mean([info["r"] for info in self.ep_info_buffer]))
            self.logger.record("rollout/ep_len_mean", safe_mean([info["l"] for info in self.ep_info_buffer]))
        if self.ep_success_buffer:
            self.logger.record("rollout/success_rate", safe_mean(self.ep_success_buffer))
        self.logger.record("time/fps", fps)
        self.logger.record("time/time_elapsed", int(time_elapsed), exclude="tensorboard")
        self.logger.record("time/total_timesteps", self.num_timesteps, exclude="tensorboard")
        self.logger.dump(step=self.num_timesteps)
