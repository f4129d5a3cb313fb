"""Observation encoders: a symlog MLP over the vector keys and a CNN per group of image keys, their
outputs concatenated into the embedding (DreamerV3's multi-encoder).

Observations arrive as stored in replay: images channel-first [..., C, H, W] (SB3 transposes
channel-last envs with ``VecTransposeImage``), uint8 or float; vectors [..., *shape]; a Dict
observation as a dict of them (a Box one is the single key ``OBS_KEY``). :meth:`MultiEncoder.prepare`
turns them into the model's inputs once per batch, shared by the encoder and the decoder's targets:

- vector key: ``symlog(x)``, flattened to [..., O_k]; a discrete key's values first become floats
  (:func:`vector_values`): a Discrete's one-hot, a MultiDiscrete's one-hots side by side, a
  MultiBinary's bits;
- image key: ``x / 255`` with ``normalize_images`` (as SB3; else ``x`` as stored, as floats),
  resized (bilinear, antialiased) to ``image_size`` x ``image_size``: [..., C_k, S, S].

The CNN (DreamerV3 2023 layout): convolutions of kernel 4, stride 2, padding 1, each followed by
RMSNorm over channels and SiLU, with ``depth``, 2 ``depth``, 4 ``depth``, ... channels, down to a
4 x 4 map, flattened: at S = 64 and depth 16, 16 -> 32 -> 64 -> 128 channels and 2,048 features.
Image keys of the same height and width share one CNN, stacked on channels.
"""

from __future__ import annotations

import math

import numpy as np
import torch as th
import torch.nn.functional as F
from gymnasium import spaces
from stable_baselines3.common.preprocessing import is_image_space_channels_first
from torch import nn

from sb3_dreamer.buffers import OBS_KEY, is_image, observation_subspaces
from sb3_dreamer.functional import symlog
from sb3_dreamer.networks.layers import MLP, ChannelRMSNorm, init_linear_

MIN_RESOLUTION = 4  # side of the CNN's smallest feature map


def conv_stages(image_size: int) -> int:
    """Stride-2 stages from ``image_size`` down to the 4 x 4 map; ValueError unless a power of two >= 8."""
    stages = int(round(math.log2(image_size / MIN_RESOLUTION))) if image_size >= 2 * MIN_RESOLUTION else 0
    if stages < 1 or MIN_RESOLUTION * 2**stages != image_size:
        raise ValueError(f"image_size must be a power of two of at least 8 (8, 16, 32, 64, ...), got {image_size}")
    return stages


def resize_images(x: th.Tensor, size: int | tuple[int, int]) -> th.Tensor:
    """Float images [..., C, H, W] -> [..., C, *size] (an int: square), bilinear and antialiased; unchanged
    if already that size."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(x.shape[-2:]) == size:
        return x
    lead = x.shape[:-3]
    x = F.interpolate(x.reshape(-1, *x.shape[-3:]), size=size, mode="bilinear", antialias=True, align_corners=False)
    return x.reshape(*lead, *x.shape[-3:])


DISCRETE_SPACES = (spaces.Discrete, spaces.MultiDiscrete, spaces.MultiBinary)


def vector_size(space: spaces.Space) -> int:
    """O_k, the size of a vector key as the model sees it (:func:`vector_values`): a Box's values, a
    Discrete's classes, the sum of a MultiDiscrete's classes, a MultiBinary's bits."""
    if isinstance(space, spaces.Discrete):
        return int(space.n)
    if isinstance(space, spaces.MultiDiscrete):
        return int(space.nvec.sum())
    return math.prod(space.shape)


def vector_values(x: th.Tensor, space: spaces.Space) -> th.Tensor:
    """A stored vector observation [..., *shape] -> floats [..., O_k] (before symlog): a Box's values
    flattened; a Discrete's one-hot (classes from ``start``); a MultiDiscrete's one-hots, one per
    component in order, side by side; a MultiBinary's bits."""
    lead = x.shape[: x.dim() - len(space.shape)]
    if isinstance(space, spaces.Discrete):
        return F.one_hot(x.long() - int(space.start), int(space.n)).float()
    if isinstance(space, spaces.MultiDiscrete):
        x = x.long().reshape(*lead, -1) - th.as_tensor(space.start.reshape(-1), device=x.device)
        return th.cat([F.one_hot(x[..., i], int(n)) for i, n in enumerate(space.nvec.reshape(-1))], -1).float()
    return x.float().reshape(*lead, -1)


def split_keys(subspaces: dict[str, spaces.Box], normalize_images: bool = True) -> tuple[list[str], list[list[str]]]:
    """(vector keys, image keys grouped by height and width), both in key order.

    :raises ValueError: for an image that is not channel-first
    """
    vector_keys, groups = [], {}
    for key, space in subspaces.items():
        if not is_image(space, normalize_images):
            vector_keys.append(key)
            continue
        if not is_image_space_channels_first(space):
            fix = (
                "wrap the env in VecTransposeImage (Dreamer does it for envs it is given)"
                if space.dtype == np.uint8
                else "SB3's VecTransposeImage (which Dreamer applies to the envs it is given) transposes only uint8 images, "
                "so give this one channel-first, e.g. with a gymnasium ObservationWrapper that moves its last axis first "
                "(np.moveaxis(obs, -1, 0), and the same for the Box's bounds)"
            )
            raise ValueError(
                f"Image observations must be channel-first [C, H, W], got shape {space.shape} for key {key!r}; {fix}"
            )
        groups.setdefault(space.shape[1:], []).append(key)
    return vector_keys, list(groups.values())


class ConvEncoder(nn.Module):
    """Stride-2 convolutions, RMSNorm over channels, SiLU; flattened: [..., C, S, S] -> [..., out_dim].

    :param in_channels: C
    :param depth: channels of the first convolution, doubled at each following one
    :param image_size: S, the input's height and width (a power of two, at least 8)
    """

    def __init__(self, in_channels: int, depth: int = 16, image_size: int = 64) -> None:
        super().__init__()
        channels = [depth * 2**i for i in range(conv_stages(image_size))]
        self.convs = nn.ModuleList()
        self.norms = nn.ModuleList()
        for c_in, c_out in zip([in_channels, *channels[:-1]], channels):
            conv = nn.Conv2d(c_in, c_out, kernel_size=4, stride=2, padding=1, bias=False)
            init_linear_(conv.weight, c_in * 16)
            self.convs.append(conv)
            self.norms.append(ChannelRMSNorm(c_out, eps=1e-4))
        self.out_dim = channels[-1] * MIN_RESOLUTION**2

    def forward(self, x: th.Tensor) -> th.Tensor:
        lead = x.shape[:-3]
        x = x.reshape(-1, *x.shape[-3:])
        for conv, norm in zip(self.convs, self.norms):
            x = F.silu(norm(conv(x)))
        return x.reshape(*lead, -1)


class MultiEncoder(nn.Module):
    """Embeds an observation (Box vector, Box image, or Dict of them) as [..., embed_dim].

    :param observation_space: the (channel-first) observation space
    :param units: width of the vector MLP's layers (its output size)
    :param layers: layers of the vector MLP
    :param depth: first CNN depth (see :class:`ConvEncoder`)
    :param image_size: S, the side images are resized to
    :param normalize_images: divide images by 255 (SB3's meaning); False: use them as stored
    """

    def __init__(
        self,
        observation_space: spaces.Space,
        units: int = 64,
        layers: int = 3,
        depth: int = 16,
        image_size: int = 64,
        normalize_images: bool = True,
    ) -> None:
        super().__init__()
        self.subspaces = observation_subspaces(observation_space)
        self.image_size, self.normalize_images = image_size, normalize_images
        self.vector_keys, self.image_groups = split_keys(self.subspaces, normalize_images)
        self.image_keys = [key for group in self.image_groups for key in group]
        vector_dim = sum(vector_size(self.subspaces[key]) for key in self.vector_keys)
        self.mlp = MLP(vector_dim, units, layers) if self.vector_keys else None
        self.cnns = nn.ModuleList(
            ConvEncoder(sum(self.subspaces[key].shape[0] for key in group), depth, image_size) for group in self.image_groups
        )
        self.embed_dim = (units if self.vector_keys else 0) + sum(cnn.out_dim for cnn in self.cnns)

    def prepare(self, obs: th.Tensor | dict[str, th.Tensor]) -> dict[str, th.Tensor]:
        """Stored observations -> model inputs per key (see the module docstring): vectors
        [..., O_k] symlog-scaled, images [..., C_k, S, S] scaled and resized."""
        obs = obs if isinstance(obs, dict) else {OBS_KEY: obs}
        inputs = {}
        for key in self.vector_keys:
            inputs[key] = symlog(vector_values(obs[key], self.subspaces[key]))
        for key in self.image_keys:
            x = obs[key].float()
            inputs[key] = resize_images(x / 255.0 if self.normalize_images else x, self.image_size)
        return inputs

    def forward(self, inputs: dict[str, th.Tensor]) -> th.Tensor:
        """Prepared inputs (:meth:`prepare`) -> embedding [..., embed_dim]."""
        parts = []
        if self.mlp is not None:
            parts.append(self.mlp(concat([inputs[key] for key in self.vector_keys], -1)))
        for cnn, group in zip(self.cnns, self.image_groups):
            parts.append(cnn(concat([inputs[key] for key in group], -3)))
        return concat(parts, -1)


def concat(tensors: list[th.Tensor], dim: int) -> th.Tensor:
    """``th.cat`` that returns a single tensor as is (no copy on the plain-vector path)."""
    return tensors[0] if len(tensors) == 1 else th.cat(tensors, dim)
