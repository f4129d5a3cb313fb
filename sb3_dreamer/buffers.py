"""Sequence replay buffer: one time-ordered column per env, windows of T consecutive rows.

Time alignment (one row per env step, per env column)::

    row t:   obs_t   reward_t (led to obs_t)   is_first_t   is_last_t   is_terminal_t   action_t (taken at obs_t)
    reset:   obs_0   0                         True         False       False           a_0
    ...
    end:     obs_T   r_T                       False        True        terminated      0 (never used)
    reset:   obs'_0  0                         True         False       False           a'_0

- An episode that ends gets one extra row for its true final observation (SB3 hands it over in
  ``infos[i]["terminal_observation"]``): ``is_last`` always, ``is_terminal`` only when the env
  terminated, not when a time limit truncated it. Only ``is_terminal`` lowers the continue target.
- Columns advance independently (an ending episode writes two rows in its column), each a ring
  of ``buffer_size // n_envs`` rows, allocated on the first ``add``.
- Windows never cross a column's write position, may cross episode boundaries (the RSSM resets at
  ``is_first``), and start with ``is_first`` forced to True (each window starts from the zero state).
- Observations are stored in their space's shape, uint8 where the space is uint8 (images: 1 byte per
  value, 12,288 bytes for a 3x64x64 frame) and float32 otherwise; a Dict observation as one array
  per key. Images become floats (and are divided by 255) only on the device, in the encoder.
- Replay context (``latent_dims`` given, DreamerV3 2024): each row also stores the posterior latent
  (deter, stoch; float16) computed for it while acting, refreshed with the training posterior each
  time the row is replayed (:meth:`update_latents`). A window then starts from the latent of the
  row before it, as acting does, instead of from zeros; ``is_first`` is forced only on a window
  that starts at a column's oldest row. Without it, a model trained on T-step windows from zeros
  meets long-running latents only when acting.
- With a ``VecNormalize`` env (SB3's off-policy convention), rows hold the observations and rewards
  from before normalisation, and :meth:`sample` normalises them with the env's current statistics
  (``env=``), so a batch never mixes the statistics of different times.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.preprocessing import get_action_dim, is_image_space
from stable_baselines3.common.utils import get_device
from stable_baselines3.common.vec_env import VecNormalize

from sb3_dreamer.type_aliases import SequenceSamples

OBS_KEY = "obs"  # the key a non-Dict observation goes by, where observations are handled per key


def observation_subspaces(observation_space: spaces.Space) -> dict[str, spaces.Space]:
    """The parts of an observation space by key: a Dict's subspaces, or ``{OBS_KEY: space}`` for another space."""
    if isinstance(observation_space, spaces.Dict):
        return dict(observation_space.spaces)  # type: ignore[arg-type]
    return {OBS_KEY: observation_space}  # type: ignore[dict-item]


def is_image(space: spaces.Space, normalize_images: bool = True) -> bool:
    """Whether a Box is seen as an image (channel-first [C, H, W] once SB3 transposed it), as SB3 decides:
    any 3-D Box when ``normalize_images`` is False, else only uint8 ones with bounds [0, 255]."""
    return is_image_space(space, check_channels=False, normalized_image=not normalize_images)


def storage_dtype(space: spaces.Space) -> type[np.generic]:
    """dtype an observation is stored in: uint8 for uint8 spaces (images), float32 otherwise (discrete
    values too: exact below 2**24)."""
    return np.uint8 if space.dtype == np.uint8 else np.float32


def action_classes(action_space: spaces.Space) -> list[int] | None:
    """Class counts of the categorical components of a discrete action space, None for Box.

    Discrete(n) -> [n]; MultiDiscrete(nvec) -> list(nvec); MultiBinary(n) -> [2] * n (each bit a
    two-class categorical). Their action vectors are the components' one-hots, concatenated.
    """
    if isinstance(action_space, spaces.Discrete):
        return [int(action_space.n)]
    if isinstance(action_space, spaces.MultiDiscrete):
        return [int(n) for n in np.asarray(action_space.nvec).flatten()]
    if isinstance(action_space, spaces.MultiBinary):
        return [2] * int(np.prod(action_space.shape))
    return None


def action_vector_dim(action_space: spaces.Space) -> int:
    """Size of the action vector the world model sees: concatenated one-hots for discrete kinds, flat otherwise."""
    classes = action_classes(action_space)
    return sum(classes) if classes is not None else get_action_dim(action_space)


# The row arrays of a SequenceReplayBuffer (numpy in RAM, or tensors with storage="device").
ARRAYS = ("observations", "actions", "rewards", "is_first", "is_last", "is_terminal", "deter", "stoch")


def saved_device(name: str) -> th.device:
    """The device a saved buffer's rows go to on this machine: ``name`` as SB3's ``get_device`` reads it
    (the CPU without CUDA), and the current GPU where ``name``'s GPU index is past this machine's
    GPUs (a buffer saved from "cuda:1" loaded where there is one GPU)."""
    device = get_device(name)
    if device.type == "cuda" and device.index is not None and device.index >= th.cuda.device_count():
        return th.device("cuda")
    return device


def map_arrays(values: dict, fn: Callable[[Any], Any]) -> None:
    """Replace each stored array of :data:`ARRAYS` in ``values`` (a buffer's ``__dict__`` or its
    pickled state) by ``fn(array)``, per key for a Dict observation's dict of arrays; absent ones are skipped."""
    for key in ARRAYS:
        value = values.get(key)
        if isinstance(value, dict):
            values[key] = {k: fn(v) for k, v in value.items()}
        elif value is not None:
            values[key] = fn(value)


def normalize_observations(obs: th.Tensor | dict[str, th.Tensor], env: VecNormalize | None) -> th.Tensor | dict[str, th.Tensor]:
    """``VecNormalize.normalize_obs`` on sampled tensors [B, T, ...] (per normalised key of a Dict
    space), with ``env``'s current statistics; unchanged when ``env`` is None or does not normalise them."""
    if env is None or not env.norm_obs:
        return obs

    def normalize(x: th.Tensor, rms: Any) -> th.Tensor:
        mean = th.as_tensor(rms.mean, dtype=th.float32, device=x.device)
        std = th.as_tensor(np.sqrt(rms.var + env.epsilon), dtype=th.float32, device=x.device)
        return ((x.float() - mean) / std).clamp(-env.clip_obs, env.clip_obs)

    if isinstance(obs, dict):
        keys = env.norm_obs_keys or []
        return {key: normalize(x, env.obs_rms[key]) if key in keys else x for key, x in obs.items()}  # type: ignore[index]
    return normalize(obs, env.obs_rms)


def normalize_rewards(rewards: th.Tensor, env: VecNormalize | None) -> th.Tensor:
    """``VecNormalize.normalize_reward`` on sampled rewards [B, T] with ``env``'s current return
    statistics; unchanged when ``env`` is None or does not normalise rewards."""
    if env is None or not env.norm_reward:
        return rewards
    return (rewards / float(np.sqrt(env.ret_rms.var + env.epsilon))).clamp(-env.clip_reward, env.clip_reward)


class SequenceReplayBuffer:
    """Replay of env steps, sampled as [B, T] windows.

    :param buffer_size: total number of rows over all env columns (each column holds ``buffer_size // n_envs``)
    :param observation_space: observation space: Box (vector or image), Discrete, MultiDiscrete,
        MultiBinary or a Dict of them; observations are stored in their own shape, uint8 for uint8 spaces and float32 otherwise (see module docstring)
    :param action_space: action space (actions are stored as vectors, see :func:`action_vector_dim`)
    :param device: device the sampled tensors are put on
    :param n_envs: number of env columns
    :param latent_dims: (D, S*K) to store latents for replay context; None stores none
    :param storage: where the rows live: "host" (numpy arrays in RAM; each batch is gathered there
        and copied to ``device``) or "device" (torch tensors on ``device``, e.g. GPU memory: batches
        are gathered there without a host-to-device copy; each env step's row is copied over instead).
        Saved replay buffers hold numpy arrays either way.
    """

    STORAGES = ("host", "device")

    def __init__(
        self,
        buffer_size: int,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        device: th.device | str = "auto",
        n_envs: int = 1,
        latent_dims: tuple[int, int] | None = None,
        storage: str = "host",
    ) -> None:
        if buffer_size < n_envs:
            raise ValueError(f"buffer_size={buffer_size} must be at least n_envs={n_envs}")
        if storage not in self.STORAGES:
            raise ValueError(
                f"storage must be one of {self.STORAGES} (replay in RAM or on the training device), got {storage!r}"
            )
        self.storage = storage
        self.buffer_size = buffer_size
        self.observation_space, self.action_space = observation_space, action_space
        self.obs_spaces = observation_subspaces(observation_space)
        self.action_dim = action_vector_dim(action_space)
        self.device = get_device(device)
        self.n_envs = n_envs
        self.latent_dims = tuple(latent_dims) if latent_dims is not None else None
        self.capacity = buffer_size // n_envs
        self.pos = np.zeros(n_envs, dtype=np.int64)  # next row to write, per column
        self.count = np.zeros(n_envs, dtype=np.int64)  # rows written, capped at capacity
        self._allocated = False
        self.warn_if_memory_short()

    @property
    def on_device(self) -> bool:
        return self.storage == "device"

    def _zeros(self, shape: tuple[int, ...], dtype: type[np.generic]) -> np.ndarray | th.Tensor:
        """A zero array for rows: numpy in RAM, or a tensor on the device (``storage="device"``)."""
        if not self.on_device:
            return np.zeros(shape, dtype=dtype)
        return th.zeros(shape, dtype=th.from_numpy(np.zeros(0, dtype=dtype)).dtype, device=self.device)

    def _write(self, array: np.ndarray | th.Tensor, rows: np.ndarray, cols: np.ndarray, value: Any) -> None:
        """``array[rows, cols] = value`` for either storage; ``value`` may be numpy or a tensor on any device."""
        if isinstance(array, th.Tensor):
            value = th.as_tensor(value, device=self.device).to(array.dtype)
            array[th.as_tensor(rows, device=self.device), th.as_tensor(cols, device=self.device)] = value
        else:
            array[rows, cols] = value.cpu().numpy() if isinstance(value, th.Tensor) else value

    def _gather(self, array: np.ndarray | th.Tensor, rows: Any, cols: Any, dtype: th.dtype | None = None) -> th.Tensor:
        """``array[rows, cols]`` as a tensor on the device (in ``dtype``, else the stored one)."""
        if isinstance(array, th.Tensor):
            out = array[th.as_tensor(rows, device=self.device), th.as_tensor(cols, device=self.device)]
        else:
            out = th.as_tensor(array[rows, cols], device=self.device)
        return out if dtype is None else out.to(dtype)

    def warn_if_memory_short(self) -> None:
        """Warn, as SB3's replay buffers do, when the full buffer would not fit in the available RAM
        (in the device's free memory with ``storage="device"`` on a CUDA device).

        The arrays are allocated at the first ``add``, and filled as training goes, so a buffer too
        large for the machine fails late; this says so at construction. Needs psutil (else silent).
        """
        if self.on_device and self.device.type == "cuda":
            available = th.cuda.mem_get_info(self.device)[0]
            if self.nbytes > available:
                warnings.warn(
                    f"The replay buffer needs {self.nbytes / 1e9:.2f} GB when full but {self.device} has "
                    f"{available / 1e9:.2f} GB free: lower buffer_size or use storage='host'",
                    stacklevel=3,
                )
            return
        try:
            import psutil
        except ImportError:
            return
        available = psutil.virtual_memory().available
        if self.nbytes > available:
            warnings.warn(
                f"The replay buffer needs {self.nbytes / 1e9:.2f} GB when full ({self.capacity * self.n_envs:,} rows of "
                f"{self.nbytes // (self.capacity * self.n_envs)} bytes) but this system has {available / 1e9:.2f} GB "
                "available: lower buffer_size",
                stacklevel=3,
            )

    def _allocate(self) -> None:
        shape = (self.capacity, self.n_envs)
        zeros = self._zeros
        observations = {key: zeros((*shape, *sub.shape), storage_dtype(sub)) for key, sub in self.obs_spaces.items()}
        self.observations: Any = observations if isinstance(self.observation_space, spaces.Dict) else observations[OBS_KEY]
        self.actions = zeros((*shape, self.action_dim), np.float32)
        self.rewards = zeros(shape, np.float32)
        self.is_first = zeros(shape, np.bool_)
        self.is_last = zeros(shape, np.bool_)
        self.is_terminal = zeros(shape, np.bool_)
        self._allocate_latents()
        self._allocated = True

    def _allocate_latents(self) -> None:
        """Zero arrays for the replay-context latents of :attr:`latent_dims` (none without them), in
        place of any the buffer held."""
        for key in ("deter", "stoch"):
            self.__dict__.pop(key, None)
        if self.latent_dims is not None:
            shape = (self.capacity, self.n_envs)
            self.deter = self._zeros((*shape, self.latent_dims[0]), np.float16)
            self.stoch = self._zeros((*shape, self.latent_dims[1]), np.float16)

    @property
    def nbytes(self) -> int:
        """Memory the buffer uses (or will use once allocated), in bytes."""
        obs_bytes = sum(int(np.prod(sub.shape)) * np.dtype(storage_dtype(sub)).itemsize for sub in self.obs_spaces.values())
        per_row = obs_bytes + 4 * (self.action_dim + 1) + 3 + (2 * sum(self.latent_dims) if self.latent_dims else 0)
        return per_row * self.capacity * self.n_envs

    def size(self) -> int:
        """Number of rows stored, over all columns."""
        return int(self.count.sum())

    def add(
        self,
        obs: np.ndarray | dict[str, np.ndarray],
        action: np.ndarray,
        reward: np.ndarray,
        is_first: np.ndarray,
        is_last: np.ndarray,
        is_terminal: np.ndarray,
        env_indices: np.ndarray | None = None,
        deter: np.ndarray | None = None,
        stoch: np.ndarray | None = None,
    ) -> None:
        """Write one row in each of the given columns (all columns by default).

        :param obs: [n, ...] observations, or a dict of them for a Dict space
        :param action: [n, A] normalised action vectors
        :param reward: [n] reward that led to ``obs``
        :param is_first, is_last, is_terminal: [n] bool flags
        :param env_indices: [n] column of each row; None means columns 0..n_envs-1
        :param deter, stoch: [n, D], [n, S*K] latents of the rows (replay context; zeros if omitted)
        """
        if not self._allocated:
            self._allocate()
        cols = np.arange(self.n_envs) if env_indices is None else np.asarray(env_indices)
        rows = self.pos[cols]
        write = self._write
        stored_obs = self.observations if isinstance(self.observations, dict) else {OBS_KEY: self.observations}
        values = obs if isinstance(obs, dict) else {OBS_KEY: obs}
        for key, stored in stored_obs.items():
            write(stored, rows, cols, self._observation_rows(key, values[key], len(cols)))
        write(self.actions, rows, cols, action)
        write(self.rewards, rows, cols, reward)
        write(self.is_first, rows, cols, is_first)
        write(self.is_last, rows, cols, is_last)
        write(self.is_terminal, rows, cols, is_terminal)
        if self.latent_dims is not None:
            write(self.deter, rows, cols, 0.0 if deter is None else deter)
            write(self.stoch, rows, cols, 0.0 if stoch is None else stoch)
        self.pos[cols] = (rows + 1) % self.capacity
        self.count[cols] = np.minimum(self.count[cols] + 1, self.capacity)

    def _observation_rows(self, key: str, obs: Any, n: int) -> np.ndarray:
        """``obs`` as ``n`` rows of the space's shape, rounded to the nearest integer for uint8 storage (a
        ``VecNormalize``'s unnormalised final observation is 3.9999998 where the env gave 4); ValueError
        for another shape (a reshape would scramble, e.g., a channel-last image into channel-first rows)."""
        value = np.asarray(obs)
        shape = self.obs_spaces[key].shape
        if value.shape != (n, *shape):
            name = "observations" if key == OBS_KEY else f"observations[{key!r}]"
            raise ValueError(
                f"The replay buffer takes {name} of shape {(n, *shape)} ({n} row(s) of the space's {shape}), got "
                f"{value.shape}. Where the final observation of an episode (infos[i]['terminal_observation']) has "
                "that shape, a VecEnvWrapper changed the observations without changing it: it must transform both"
            )
        dtype = storage_dtype(self.obs_spaces[key])
        if np.issubdtype(dtype, np.integer) and not np.issubdtype(value.dtype, np.integer):
            info = np.iinfo(dtype)
            value = np.clip(np.rint(value), info.min, info.max)
        return value

    def num_windows(self, sequence_length: int) -> np.ndarray:
        """Valid window starts per column for windows of ``sequence_length`` rows: [n_envs]."""
        return np.maximum(self.count - sequence_length + 1, 0)

    def can_sample(self, sequence_length: int) -> bool:
        return bool(self.num_windows(sequence_length).sum() > 0)

    def truncate_last_trajectories(self) -> None:
        """Mark the newest row of each column ``is_last``: its episode will not be continued (after loading)."""
        if not self._allocated:
            return
        cols = np.flatnonzero(self.count > 0)
        self._write(self.is_last, (self.pos[cols] - 1) % self.capacity, cols, np.ones(len(cols), dtype=bool))

    def sample(self, batch_size: int, sequence_length: int, env: VecNormalize | None = None) -> SequenceSamples:
        """Uniformly sample ``batch_size`` windows of ``sequence_length`` rows among all valid windows.

        :param env: the ``VecNormalize`` whose current statistics normalise the stored (original)
            observations and rewards, as in SB3's ``ReplayBuffer.sample``; None: as stored
        """
        windows = self.num_windows(sequence_length)
        total = windows.sum()
        if total == 0:
            raise ValueError(
                f"Cannot sample windows of {sequence_length} steps: the longest column holds {self.count.max()} rows. "
                "Collect more steps first (learning_starts) or use a shorter sequence_length."
            )
        flat = np.random.randint(0, total, size=batch_size)
        cols = np.searchsorted(np.cumsum(windows), flat, side="right")
        offset = flat - (np.cumsum(windows) - windows)[cols]
        oldest = np.where(self.count[cols] < self.capacity, 0, self.pos[cols])
        rows = (oldest[:, None] + offset[:, None] + np.arange(sequence_length)) % self.capacity  # [B, T]
        cols = cols[:, None]
        # With storage on the device, the indices go there once (as_tensor of them is then a no-op).
        r_index, c_index = rows, cols
        if self.on_device:
            r_index, c_index = th.as_tensor(rows, device=self.device), th.as_tensor(cols, device=self.device)
        gather = lambda x, r=r_index, c=c_index: self._gather(x, r, c, th.float32)  # noqa: E731
        is_first = gather(self.is_first)
        context = {}
        if self.latent_dims is None:
            is_first[:, 0] = 1.0
        else:
            before, col = (rows[:, 0] - 1) % self.capacity, cols[:, 0]
            stoch = gather(self.stoch, before, col)  # [B, S*K]
            # Context where a row before the window exists in the column and holds a latent: a stored
            # latent's stoch is one-hots, all zeros where none was stored (set_latent_dims, final rows).
            has_context = th.as_tensor(offset > 0, dtype=th.float32, device=self.device)
            keep = (has_context * (stoch.amax(-1) > 0))[:, None]  # [B, 1]
            is_first[:, 0] = th.maximum(is_first[:, 0], 1.0 - keep[:, 0])
            context = dict(
                context_deter=gather(self.deter, before, col) * keep,
                context_stoch=stoch * keep,
                context_action=gather(self.actions, before, col) * keep,
            )
        return SequenceSamples(
            observations=normalize_observations(self._sample_observations(r_index, c_index), env),
            actions=gather(self.actions),
            rewards=normalize_rewards(gather(self.rewards), env),
            is_first=is_first,
            is_last=gather(self.is_last),
            is_terminal=gather(self.is_terminal),
            indices=(rows, cols),
            **context,
        )

    def _sample_observations(self, rows: Any, cols: Any) -> th.Tensor | dict[str, th.Tensor]:
        """Observations of the rows [B, T] (per key for a Dict space), on the device in their stored dtype."""
        if isinstance(self.observations, dict):
            return {key: self._gather(stored, rows, cols) for key, stored in self.observations.items()}
        return self._gather(self.observations, rows, cols)

    def to(self, device: th.device | str, storage: str | None = None) -> None:
        """Use ``device`` from now on: sampled batches land there, and with ``storage="device"`` the
        stored rows move there (a buffer loaded into a model on another device).

        :param storage: "host" or "device" to move the rows between RAM and the device's memory (a
            buffer loaded into a model whose ``replay_buffer_kwargs`` ask for the other); None keeps
            the buffer's own
        """
        device = get_device(device)
        storage = self.storage if storage is None else storage
        if storage not in self.STORAGES:
            raise ValueError(f"storage must be one of {self.STORAGES}, got {storage!r}")
        if self._allocated and storage == "device":
            map_arrays(self.__dict__, lambda x: th.as_tensor(x, device=device))  # numpy rows, or tensors elsewhere
        elif self._allocated and self.on_device:
            map_arrays(self.__dict__, lambda x: x.cpu().numpy())
        self.storage, self.device = storage, device

    def set_latent_dims(self, latent_dims: tuple[int, int] | None) -> bool:
        """Store latents of sizes (D, S*K) for replay context from now on (None: none). Latents of
        other sizes are dropped, and rows without latents get zeros, which :meth:`sample` reads as
        no latent: the window after such a row starts as without replay context (``is_first``)
        until the row is replayed and its latent refreshed. Returns whether anything changed."""
        latent_dims = tuple(latent_dims) if latent_dims is not None else None
        if latent_dims == self.latent_dims:
            return False
        self.latent_dims = latent_dims
        if self._allocated:
            self._allocate_latents()
        return True

    def update_latents(self, indices: tuple[np.ndarray, np.ndarray], deter: th.Tensor, stoch: th.Tensor) -> None:
        """Write fresh posterior latents [B, T, D], [B, T, S*K] back to the sampled rows (replay context)."""
        if self.latent_dims is None:
            return
        rows, cols = indices
        self._write(self.deter, rows, cols, deter.detach())
        self._write(self.stoch, rows, cols, stoch.detach())

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["device"] = str(self.device)  # a torch.device pickles fine, but a str survives torch upgrades
        # Only the rows written so far are saved (a buffer that is not yet full would otherwise write
        # its whole capacity: 7.7 GB for 2,000 rows of 64 x 64 frames), as numpy arrays whatever the
        # storage, so a file written from GPU memory loads anywhere. __setstate__ pads them back.
        rows = int(self.count.max())
        map_arrays(state, lambda x: x[:rows].cpu().numpy() if isinstance(x, th.Tensor) else x[:rows])
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.device = saved_device(state["device"])
        self.obs_spaces = observation_subspaces(self.observation_space)  # absent from buffers pickled before Dict support
        self.storage = state.get("storage", "host")  # absent from buffers pickled before the option
        device = self.device if self.on_device and self._allocated else None
        map_arrays(self.__dict__, lambda x: self._pad_to_capacity(x, device))

    def _pad_to_capacity(self, rows: np.ndarray, device: th.device | None = None) -> np.ndarray | th.Tensor:
        """Saved rows [R, n_envs, ...] -> [capacity, n_envs, ...], zeros after them (see __getstate__);
        a tensor on ``device`` when given (storage on the device)."""
        full = rows
        if len(rows) != self.capacity:
            full = np.zeros((self.capacity, *rows.shape[1:]), dtype=rows.dtype)
            full[: len(rows)] = rows
        return full if device is None else th.as_tensor(full, device=device)
