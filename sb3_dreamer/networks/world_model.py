"""World model: encoder (symlog MLP for vectors, CNN for images), RSSM, decoder (symlog-MSE for
vectors, MSE summed over pixels for images), two-hot reward head, continue head.

Losses per replayed step (DreamerV3): ``rec + rew + con + dyn_scale * dyn + rep_scale * rep`` where
``dyn = max(free_bits, KL(sg(post) || prior))`` and ``rep = max(free_bits, KL(post || sg(prior)))``.
The continue target is ``(1 - is_terminal) * gamma``, so the discount is learned into it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch as th
import torch.nn.functional as F
from gymnasium import spaces
from torch import nn

from sb3_dreamer.compiled import CompiledMethods
from sb3_dreamer.functional import categorical_kl, kl_free_bits, twohot_bins, twohot_loss, twohot_mean
from sb3_dreamer.networks.decoders import MultiDecoder
from sb3_dreamer.networks.encoders import MultiEncoder
from sb3_dreamer.networks.layers import MLP
from sb3_dreamer.networks.rssm import RSSM


class WorldModelOutput(NamedTuple):
    """Result of :meth:`WorldModel.loss`: per-step loss [B, T], posterior states and metrics."""

    loss: th.Tensor
    deter: th.Tensor
    stoch: th.Tensor
    metrics: dict[str, th.Tensor]


class WorldModel(CompiledMethods, nn.Module):
    """Encoder, RSSM, decoder and reward/continue heads.

    :param observation_space: (channel-first) observation space: Box vector, Box image, Discrete,
        MultiDiscrete, MultiBinary or Dict of them
    :param action_dim: A
    :param units: width of encoder, decoder and head layers
    :param encoder_layers: hidden layers of the vector encoder (its output is the vector embedding)
    :param decoder_layers: hidden layers of the vector decoder
    :param depth: CNN depth of the image encoder and decoder (see :mod:`sb3_dreamer.networks.encoders`)
    :param image_size: side images are resized to
    :param decoder_keys: keys of a Dict observation to reconstruct (None: all)
    :param normalize_images: divide images by 255 (SB3's meaning); False: use them as stored
    :param head_layers: hidden layers of the reward and continue heads
    :param num_bins: bins of the two-hot reward head
    :param free_bits: KL free nats per step (summed over the stochastic variables)
    :param dyn_scale: weight of the dynamics KL
    :param rep_scale: weight of the representation KL
    :param rssm_kwargs: passed to :class:`RSSM` (deter, hidden, stoch, classes, blocks, unimix)
    """

    def __init__(
        self,
        observation_space: spaces.Space,
        action_dim: int,
        units: int = 64,
        encoder_layers: int = 3,
        decoder_layers: int = 3,
        depth: int = 16,
        image_size: int = 64,
        decoder_keys: Sequence[str] | None = None,
        normalize_images: bool = True,
        head_layers: int = 1,
        num_bins: int = 255,
        free_bits: float = 1.0,
        dyn_scale: float = 1.0,
        rep_scale: float = 0.1,
        **rssm_kwargs,
    ) -> None:
        super().__init__()
        self.free_bits, self.dyn_scale, self.rep_scale = free_bits, dyn_scale, rep_scale
        images = dict(depth=depth, image_size=image_size, normalize_images=normalize_images)
        self.encoder = MultiEncoder(observation_space, units, encoder_layers, **images)
        self.rssm = RSSM(self.encoder.embed_dim, action_dim, **rssm_kwargs)
        feat = self.rssm.feat_dim
        self.decoder = MultiDecoder(feat, observation_space, decoder_keys, units, decoder_layers, **images)
        self.reward_head = MLP(feat, units, head_layers, num_bins, outscale=0.0)
        self.cont_head = MLP(feat, units, head_layers, 1)
        self.register_buffer("bins", twohot_bins(num_bins), persistent=False)

    def embed(self, obs: th.Tensor | dict[str, th.Tensor]) -> th.Tensor:
        """Stored observation [..., *shape] (or a dict of them) -> embedding [..., E]."""
        return self.encoder(self.encoder.prepare(obs))

    def reward(self, feat: th.Tensor) -> th.Tensor:
        """Predicted reward [...] from feat [..., F]."""
        return twohot_mean(self.reward_head(feat), self.bins)

    def cont(self, feat: th.Tensor) -> th.Tensor:
        """Predicted probability of continuing, discount included, [...] from feat [..., F]."""
        return th.sigmoid(self.cont_head(feat).squeeze(-1).float())

    def loss(
        self,
        obs: th.Tensor | dict[str, th.Tensor],
        prev_action: th.Tensor,
        reward: th.Tensor,
        is_first: th.Tensor,
        is_terminal: th.Tensor,
        gamma: float,
        initial: tuple[th.Tensor, th.Tensor] | None = None,
    ) -> WorldModelOutput:
        """World-model loss of a replayed batch.

        :param obs: [B, T, *shape] stored observations (uint8 images as uint8), or a dict of them
        :param prev_action: [B, T, A] action before each step (zero where is_first)
        :param reward: [B, T] reward that led to each observation
        :param is_first: [B, T] float, 1 on the first step of an episode
        :param is_terminal: [B, T] float, 1 on a terminal observation
        :param gamma: discount learned into the continue head
        :param initial: (deter [B, D], stoch [B, S*K]) carried into step 0 (replay context); None: zeros
        """
        inputs = self.encoder.prepare(obs)
        deter, stoch, post = self.rssm.observe(self.encoder(inputs), prev_action, is_first, initial)
        loss, metrics = self.head_losses(deter, stoch, post, inputs, reward, is_terminal, gamma)
        return WorldModelOutput(loss, deter, stoch, metrics)

    def head_losses(
        self,
        deter: th.Tensor,
        stoch: th.Tensor,
        post: th.Tensor,
        inputs: th.Tensor | dict[str, th.Tensor],
        reward: th.Tensor,
        is_terminal: th.Tensor,
        gamma: float,
    ) -> tuple[th.Tensor, dict[str, th.Tensor]]:
        """The per-step loss [B, T] and metrics of :meth:`loss` from the posterior states: prior,
        decoder, reward and continue heads, and the two KL terms. No time loop, so one region for
        ``torch.compile`` (:meth:`~sb3_dreamer.policies.DreamerPolicy.compile_losses`).

        :param deter: [B, T, D] :param stoch: [B, T, S*K] :param post: posterior log-probs [B, T, S, K]
        :param inputs: the encoder's prepared observations (``encoder.prepare``)
        """
        prior = self.rssm.prior_logits(deter)
        feat = th.cat([deter, stoch], -1)
        rec = self.decoder.loss(feat, inputs)
        rew = twohot_loss(self.reward_head(feat), reward, self.bins)
        cont_target = (1.0 - is_terminal) * gamma
        con = F.binary_cross_entropy_with_logits(self.cont_head(feat).squeeze(-1), cont_target, reduction="none")
        dyn = categorical_kl(post.detach(), prior)
        rep = categorical_kl(post, prior.detach())
        loss = rec + rew + con + self.dyn_scale * kl_free_bits(dyn, self.free_bits) + self.rep_scale * kl_free_bits(rep, self.free_bits)
        metrics = {
            "rec_loss": rec.mean(),
            "reward_loss": rew.mean(),
            "cont_loss": con.mean(),
            "dyn_kl": dyn.mean(),
            "rep_kl": rep.mean(),
            "prior_entropy": -(prior.exp() * prior).sum((-2, -1)).mean(),
            "post_entropy": -(post.exp() * post).sum((-2, -1)).mean(),
        }
        return loss, metrics
