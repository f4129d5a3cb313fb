"""Recurrent state-space model (DreamerV3, 2024 code): a block GRU and categorical latents.

State: ``deter`` h [N, D] (deterministic, the GRU carry) and ``stoch`` z [N, S*K] (S categorical
variables with K classes, flattened one-hot samples). ``feat = [h, z]`` feeds every head.

- ``obs_step``: posterior step, h_t = f(h_{t-1}, z_{t-1}, a_{t-1}), z_t ~ q(z | h_t, embed_t).
- ``img_step``: prior step, h_t = f(...), z_t ~ p(z | h_t).
- ``observe``: obs_step over a [B, T] sequence, resetting h, z and the previous action at is_first;
  the work that does not depend on the previous step (weight split, action and embedding
  projections) is done once for the sequence.

The initial state is all zeros; a reset multiplies the carry by ``1 - is_first``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch as th
import torch.nn.functional as F
from torch import nn

from sb3_dreamer.compiled import CompiledMethods
from sb3_dreamer.distributions import gumbel_noise, sample_onehot
from sb3_dreamer.functional import unimix_logits
from sb3_dreamer.networks.layers import MLP, BlockLinear, Linear, NormLinear, RMSNorm, init_linear_


class GRUWeights(NamedTuple):
    """The block GRU's hidden-layer weight ``gru_hidden.weight`` [G, D/G + 3*hidden, D/G] split by input."""

    deter: th.Tensor  # [G, D/G, D/G]: each block's rows for its own slice of h
    state: th.Tensor  # [2*hidden, D]: the rows for in(h) and in(z), all blocks side by side
    action: th.Tensor  # [hidden, D]: the rows for in(a)


class RSSM(CompiledMethods, nn.Module):
    """Block-GRU RSSM.

    :param embed_dim: E, size of the observation embedding
    :param action_dim: A, size of the (one-hot or [-1, 1]-normalised) action vector
    :param deter: D, size of the deterministic state
    :param hidden: width of the input projections and the prior/posterior layers
    :param stoch: S, number of categorical variables
    :param classes: K, classes per variable
    :param blocks: G, number of GRU blocks (D must be divisible by G)
    :param unimix: fraction of the uniform distribution mixed into prior and posterior
    :param prior_layers: hidden layers of the prior network
    """

    def __init__(
        self,
        embed_dim: int,
        action_dim: int,
        deter: int = 512,
        hidden: int = 64,
        stoch: int = 32,
        classes: int = 4,
        blocks: int = 8,
        unimix: float = 0.01,
        prior_layers: int = 2,
    ) -> None:
        super().__init__()
        if deter % blocks:
            raise ValueError(f"deter={deter} must be divisible by blocks={blocks}")
        self.deter_dim, self.stoch, self.classes, self.blocks = deter, stoch, classes, blocks
        self.stoch_dim = stoch * classes
        self.hidden = hidden
        self.unimix = unimix
        self.in_deter = NormLinear(deter, hidden)
        self.in_stoch = NormLinear(self.stoch_dim, hidden)
        self.in_action = NormLinear(action_dim, hidden)
        self.gru_hidden = BlockLinear(deter + blocks * 3 * hidden, deter, blocks)
        self.gru_norm = RMSNorm(deter, eps=1e-4)
        self.gru_gates = BlockLinear(deter, 3 * deter, blocks)
        self.prior = MLP(deter, hidden, prior_layers, self.stoch_dim)
        # Posterior q(z | h, embed): one hidden layer whose linear part is split in two, so the
        # embedding's share is computed for a whole sequence at once, outside the time loop.
        self.post_deter = nn.Linear(deter, hidden, bias=False)
        self.post_embed = nn.Linear(embed_dim, hidden, bias=False)
        init_linear_(self.post_deter.weight, deter + embed_dim)
        init_linear_(self.post_embed.weight, deter + embed_dim)
        self.post_norm = RMSNorm(hidden, eps=1e-4)
        self.post_out = Linear(hidden, self.stoch_dim)
        # Steps per call of posterior_steps in observe (the same values for any chunk size); 1 in
        # eager, where a call costs nothing extra. DreamerPolicy.compile_steps raises it.
        self.observe_chunk = 1

    @property
    def feat_dim(self) -> int:
        return self.deter_dim + self.stoch_dim

    def initial(self, batch_size: int, device: th.device) -> tuple[th.Tensor, th.Tensor]:
        """Zero state: deter [N, D], stoch [N, S*K]."""
        return th.zeros(batch_size, self.deter_dim, device=device), th.zeros(batch_size, self.stoch_dim, device=device)

    def gru_weights(self) -> GRUWeights:
        """The block GRU's hidden-layer weight split by input (see :class:`GRUWeights`).

        A sequence splits it once and passes it to every step, so neither the split nor its
        backward runs per step.
        """
        weight = self.gru_hidden.weight  # [G, D/G + 3*hidden, D/G]
        size = self.deter_dim // self.blocks
        shared = weight[:, size:].transpose(0, 1).reshape(-1, self.deter_dim)  # [3*hidden, D]
        return GRUWeights(weight[:, :size], shared[: 2 * self.hidden], shared[2 * self.hidden :])

    def action_input(self, action: th.Tensor, weights: GRUWeights) -> th.Tensor:
        """The action's term of the GRU's hidden layer, its bias included: [..., A] -> [..., D].

        Actions are squashed by ``a / max(1, |a|)`` first. Independent of the state, so a replayed
        sequence computes it for all steps at once.
        """
        action = action / th.clamp(action.abs(), min=1.0).detach()
        return F.linear(self.in_action(action), weights.action.t(), self.gru_hidden.bias)

    def reset_inputs(self, prev_action: th.Tensor, is_first: th.Tensor, weights: GRUWeights) -> tuple[th.Tensor, th.Tensor]:
        """The posterior step's reset inputs from is_first [...] (float 0/1) and prev_action [..., A]:
        ``keep = 1 - is_first`` [..., 1] and the :meth:`action_input` of the previous action zeroed
        at episode starts [..., D]."""
        keep = (1.0 - is_first).unsqueeze(-1)
        return keep, self.action_input(prev_action * keep, weights)

    def core(self, deter: th.Tensor, stoch: th.Tensor, action: th.Tensor, weights: GRUWeights | None = None) -> th.Tensor:
        """Block GRU: h [N, D], z [N, S*K], a [N, A] -> next h [N, D] (``weights``: from
        :meth:`gru_weights`, None to split them here)."""
        weights = self.gru_weights() if weights is None else weights
        return self.gru(deter, stoch, self.action_input(action, weights), weights)

    def gru(self, deter: th.Tensor, stoch: th.Tensor, action_in: th.Tensor, weights: GRUWeights) -> th.Tensor:
        """Block GRU from h [N, D], z [N, S*K] and the action's term ``action_in`` [N, D] -> next h [N, D].

        Each block g sees its own slice of h and the shared input x = [in(h), in(z), in(a)]; its
        weight ``gru_hidden.weight[g]`` is split into the rows for h and the rows for x, so the
        shared part is one [N, 2*hidden] x [2*hidden, D] product (plus the action's term) instead
        of G copies of x concatenated to the blocks (the same sums; the concatenation was a
        quarter of an imagination step on CPU).
        """
        x = th.cat([self.in_deter(deter), self.in_stoch(stoch)], -1)
        n, g = deter.shape[0], self.blocks
        size = self.deter_dim // g
        blocks = deter.view(n, g, size).transpose(0, 1)  # [G, N, D/G]
        hidden = th.bmm(blocks, weights.deter).transpose(0, 1) + th.addmm(action_in, x, weights.state).view(n, g, size)
        hidden = F.silu(self.gru_norm(hidden.reshape(n, -1)))
        # Gates in block-major layout [G, N, 3*D/G], the bias folded into the product.
        gates = th.baddbmm(
            self.gru_gates.bias.view(g, 1, -1), hidden.view(n, g, size).transpose(0, 1), self.gru_gates.weight
        )
        reset, cand, update = gates.chunk(3, -1)
        cand = 2.0 * th.sigmoid(2.0 * th.sigmoid(reset) * cand) - 1.0  # tanh, 2x cheaper on CPU
        update = th.sigmoid(update - 1.0)
        return (update * cand + (1.0 - update) * blocks).transpose(0, 1).reshape(n, -1)

    def _dist(self, logits: th.Tensor) -> th.Tensor:
        """Flat logits [..., S*K] -> unimixed log-probs [..., S, K]."""
        return unimix_logits(logits.unflatten(-1, (self.stoch, self.classes)), self.unimix)

    def prior_logits(self, deter: th.Tensor) -> th.Tensor:
        """Prior log-probs p(z | h): [..., D] -> [..., S, K]."""
        return self._dist(self.prior(deter))

    def embed_projection(self, embed: th.Tensor) -> th.Tensor:
        """The embedding's share of the posterior layer: [..., E] -> [..., hidden]."""
        return self.post_embed(embed)

    def posterior_logits(self, deter: th.Tensor, embed_proj: th.Tensor) -> th.Tensor:
        """Posterior log-probs q(z | h, embed) from h [N, D] and ``embed_projection`` [N, hidden]: [N, S, K]."""
        x = F.silu(self.post_norm(self.post_deter(deter) + embed_proj))
        return self._dist(self.post_out(x))

    def obs_step(
        self,
        deter: th.Tensor,
        stoch: th.Tensor,
        prev_action: th.Tensor,
        embed_proj: th.Tensor,
        is_first: th.Tensor,
        deterministic: bool = False,
        noise: th.Tensor | None = None,
    ) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
        """One posterior step; resets where ``is_first`` [N] (float 0/1); ``noise``: the sample's
        Gumbel noise [N, S, K] (None: drawn here).

        :return: deter [N, D], stoch [N, S*K], posterior log-probs [N, S, K]
        """
        weights = self.gru_weights()
        keep, action_in = self.reset_inputs(prev_action, is_first, weights)
        return self.posterior_step(deter, stoch, keep, action_in, embed_proj, weights, deterministic, noise)

    def posterior_step(
        self,
        deter: th.Tensor,
        stoch: th.Tensor,
        keep: th.Tensor,
        action_in: th.Tensor,
        embed_proj: th.Tensor,
        weights: GRUWeights,
        deterministic: bool = False,
        noise: th.Tensor | None = None,
    ) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
        """:meth:`obs_step` with the per-sequence work done by the caller: ``keep`` [N, 1] and
        ``action_in`` [N, D] from :meth:`reset_inputs`, ``weights`` from :meth:`gru_weights`;
        ``noise``: the sample's Gumbel noise [N, S, K] (None: drawn here).

        :return: deter [N, D], stoch [N, S*K], posterior log-probs [N, S, K]
        """
        deter = self.gru(deter * keep, stoch * keep, action_in, weights)
        logits = self.posterior_logits(deter, embed_proj)
        return deter, sample_onehot(logits, deterministic, noise).flatten(-2), logits

    def img_step(
        self,
        deter: th.Tensor,
        stoch: th.Tensor,
        action: th.Tensor,
        weights: GRUWeights | None = None,
        noise: th.Tensor | None = None,
    ) -> tuple[th.Tensor, th.Tensor]:
        """One prior (imagination) step: returns deter [N, D], stoch [N, S*K] (``weights`` as in
        :meth:`core`; ``noise``: the sample's Gumbel noise [N, S, K], None: drawn here)."""
        deter = self.core(deter, stoch, action, weights)
        return deter, sample_onehot(self.prior_logits(deter), noise=noise).flatten(-2)

    def noise(self, *shape: int, device: th.device | None = None) -> th.Tensor:
        """Gumbel noise for the latent samples of ``shape`` steps (e.g. B, T): [*shape, S, K]."""
        return gumbel_noise((*shape, self.stoch, self.classes), device)

    def observe(
        self,
        embed: th.Tensor,
        prev_action: th.Tensor,
        is_first: th.Tensor,
        initial: tuple[th.Tensor, th.Tensor] | None = None,
        noise: th.Tensor | None = None,
    ) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
        """Posterior states of a sequence.

        :param embed: [B, T, E]
        :param prev_action: [B, T, A], the action taken before step t (row t-1's action)
        :param is_first: [B, T] float 0/1
        :param initial: (deter [B, D], stoch [B, S*K]) carried into step 0; None means zeros
        :param noise: Gumbel noise of the samples [B, T, S, K]; None: drawn here, in one call
        :return: deter [B, T, D], stoch [B, T, S*K], posterior log-probs [B, T, S, K]
        """
        batch = embed.shape[0]
        deter, stoch = self.initial(batch, embed.device) if initial is None else initial
        # Everything that does not depend on the previous step, for the whole sequence at once.
        weights = self.gru_weights()
        keep, action_in = self.reset_inputs(prev_action, is_first, weights)  # [B, T, 1], [B, T, D]
        embed_proj = self.embed_projection(embed)
        noise = self.noise(*embed.shape[:2], device=embed.device) if noise is None else noise
        # split, not [:, t]: its backward concatenates the chunks' gradients once, where slices would
        # each scatter into a zero tensor of the whole sequence.
        chunks = (x.split(self.observe_chunk, 1) for x in (keep, action_in, embed_proj, noise))
        deters, stochs, logits = [], [], []
        for keep_c, action_c, embed_c, noise_c in zip(*chunks):
            deter_c, stoch_c, logit_c = self.posterior_steps(deter, stoch, keep_c, action_c, embed_c, weights, noise_c)
            deter, stoch = deter_c[:, -1], stoch_c[:, -1]
            deters.append(deter_c)
            stochs.append(stoch_c)
            logits.append(logit_c)
        return th.cat(deters, 1), th.cat(stochs, 1), th.cat(logits, 1)

    def posterior_steps(
        self,
        deter: th.Tensor,
        stoch: th.Tensor,
        keep: th.Tensor,
        action_in: th.Tensor,
        embed_proj: th.Tensor,
        weights: GRUWeights,
        noise: th.Tensor,
    ) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
        """:meth:`posterior_step` over k consecutive steps from deter [N, D], stoch [N, S*K], with
        ``keep`` [N, k, 1], ``action_in`` [N, k, D], ``embed_proj`` [N, k, hidden] and ``noise``
        [N, k, S, K]. One function, so that ``compile_steps`` makes a chunk of
        :attr:`observe_chunk` steps one compiled call (one guard check, one autograd node).

        :return: deter [N, k, D], stoch [N, k, S*K], posterior log-probs [N, k, S, K]
        """
        inputs = zip(keep.unbind(1), action_in.unbind(1), embed_proj.unbind(1), noise.unbind(1))
        deters, stochs, logits = [], [], []
        for keep_t, action_t, embed_t, noise_t in inputs:
            deter, stoch, logit = self.posterior_step(deter, stoch, keep_t, action_t, embed_t, weights, noise=noise_t)
            deters.append(deter)
            stochs.append(stoch)
            logits.append(logit)
        return th.stack(deters, 1), th.stack(stochs, 1), th.stack(logits, 1)
