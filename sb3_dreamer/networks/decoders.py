"""Observation decoders: feat -> the prepared observation of each decoded key, and the reconstruction loss.

Predictions live in the space of :meth:`~sb3_dreamer.networks.encoders.MultiEncoder.prepare`:
symlog vectors [..., O_k] (symlog-MSE, DreamerV3) and images [..., C_k, S, S] in [0, 1] for
normalised images (MSE summed over pixels; the CNN predicts ``image - 0.5``). The loss of a step
is the sum of the squared errors over every value of every decoded key.

The CNN mirrors the encoder's: a linear layer to the (deepest) 4 x 4 map, then transposed
convolutions of kernel 4, stride 2, padding 1 halving the channels, each followed by RMSNorm over
channels and SiLU but the last, which outputs the image channels at S x S.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch as th
import torch.nn.functional as F
from gymnasium import spaces
from torch import nn

from sb3_dreamer.buffers import observation_subspaces
from sb3_dreamer.networks.encoders import MIN_RESOLUTION, conv_stages, split_keys, vector_size
from sb3_dreamer.networks.layers import MLP, ChannelRMSNorm, Linear, init_linear_


class ConvDecoder(nn.Module):
    """feat [..., F] -> images [..., C, S, S] (mean prediction, ``0.5`` at zero output).

    :param feat_dim: F
    :param out_channels: C
    :param depth: channels of the last hidden map (the encoder's first depth); doubled towards the input
    :param image_size: S (a power of two, at least 8)
    """

    def __init__(self, feat_dim: int, out_channels: int, depth: int = 16, image_size: int = 64) -> None:
        super().__init__()
        channels = [depth * 2**i for i in reversed(range(conv_stages(image_size)))]  # deepest first
        self.start_channels = channels[0]
        self.linear = Linear(feat_dim, channels[0] * MIN_RESOLUTION**2)
        self.convs = nn.ModuleList()
        self.norms = nn.ModuleList()
        for c_in, c_out in zip(channels, [*channels[1:], out_channels]):
            conv = nn.ConvTranspose2d(c_in, c_out, kernel_size=4, stride=2, padding=1, bias=c_out == out_channels)
            init_linear_(conv.weight, c_in * 16)
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)
            self.convs.append(conv)
        for c_out in channels[1:]:
            self.norms.append(ChannelRMSNorm(c_out, eps=1e-4))

    def forward(self, feat: th.Tensor) -> th.Tensor:
        lead = feat.shape[:-1]
        x = self.linear(feat).reshape(-1, self.start_channels, MIN_RESOLUTION, MIN_RESOLUTION)
        for conv, norm in zip(self.convs, self.norms):
            x = F.silu(norm(conv(x)))
        x = self.convs[-1](x) + 0.5
        return x.reshape(*lead, *x.shape[-3:])


class MultiDecoder(nn.Module):
    """Reconstructs the chosen keys of an observation from feat [..., F].

    :param feat_dim: F
    :param observation_space: the (channel-first) observation space
    :param keys: keys to reconstruct (None: all); the others get no reconstruction loss
    :param units: width of the vector MLP's layers
    :param layers: hidden layers of the vector MLP
    :param depth: CNN depth (see :class:`ConvDecoder`)
    :param image_size: S
    :param normalize_images: whether images are seen divided by 255 (decides which keys are images)
    """

    def __init__(
        self,
        feat_dim: int,
        observation_space: spaces.Space,
        keys: Sequence[str] | None = None,
        units: int = 64,
        layers: int = 3,
        depth: int = 16,
        image_size: int = 64,
        normalize_images: bool = True,
    ) -> None:
        super().__init__()
        subspaces = observation_subspaces(observation_space)
        if keys is not None:
            if not isinstance(observation_space, spaces.Dict):
                raise ValueError(f"decoder_keys applies to Dict observation spaces; got {observation_space}: pass None")
            unknown = [key for key in keys if key not in subspaces]
            if unknown:
                raise ValueError(
                    f"decoder_keys {unknown} are not keys of the observation space; choose among {list(subspaces)}"
                )
            subspaces = {key: space for key, space in subspaces.items() if key in keys}
        self.vector_keys, self.image_groups = split_keys(subspaces, normalize_images)
        self.vector_sizes = [vector_size(subspaces[key]) for key in self.vector_keys]
        self.mlp = MLP(feat_dim, units, layers, sum(self.vector_sizes)) if self.vector_keys else None
        self.image_channels = [[subspaces[key].shape[0] for key in group] for group in self.image_groups]
        self.cnns = nn.ModuleList(ConvDecoder(feat_dim, sum(c), depth, image_size) for c in self.image_channels)

    def forward(self, feat: th.Tensor) -> dict[str, th.Tensor]:
        """Predictions per decoded key, in the prepared space: vectors [..., O_k], images [..., C_k, S, S]."""
        out: dict[str, th.Tensor] = {}
        if self.mlp is not None:
            out.update(zip(self.vector_keys, self.mlp(feat).split(self.vector_sizes, -1)))
        for cnn, group, channels in zip(self.cnns, self.image_groups, self.image_channels):
            out.update(zip(group, cnn(feat).split(channels, -3)))
        return out

    def loss(self, feat: th.Tensor, targets: dict[str, th.Tensor]) -> th.Tensor:
        """Squared errors summed over all values of the decoded keys: feat [..., F] -> [...].

        :param targets: prepared observations per key (at least the decoded keys)
        """
        lead = feat.dim() - 1
        losses = [((pred.float() - targets[key]) ** 2).flatten(lead).sum(-1) for key, pred in self.forward(feat).items()]
        if not losses:
            return th.zeros(feat.shape[:-1], device=feat.device)
        return losses[0] if len(losses) == 1 else th.stack(losses).sum(0)
