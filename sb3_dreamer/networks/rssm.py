"""Recurrent state-space model (DreamerV3, 2024 code): a block GRU and categorical latents.

State: ``deter`` h [N, D] (deterministic, the GRU carry) and ``stoch`` z [N, S*K] (S categorical
variables with K classes, flattened one-hot samples). ``feat = [h, z]`` feeds every head.

- ``obs_step``: posterior step, h_t = f(h_{t-1}, z_{t-1}, a_{t-1}), z_t ~ q(z | h_t, embed_t).
- ``img_step``: prior step, h_t = f(...), z_t ~ p(z | h_t).
- ``observe``: obs_step over a [B, T] sequence, resetting h, z and the previous action at is_first.

The initial state is all zeros; a reset multiplies the carry by ``1 - is_first``.
"""

from __future__ import annotations

import torch as th
import torch.nn.functional as F
from torch import nn

from sb3_dreamer.distributions import sample_onehot
from sb3_dreamer.functional import unimix_logits
from sb3_dreamer.networks.layers import MLP, BlockLinear, Linear, NormLinear, RMSNorm, init_linear_


class RSSM(nn.Module):
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

    @property
    def feat_dim(self) -> int:
        return self.deter_dim + self.stoch_dim

    def initial(self, batch_size: int, device: th.device) -> tuple[th.Tensor, th.Tensor]:
        """Zero state: deter [N, D], stoch [N, S*K]."""
        return th.zeros(batch_size, self.deter_dim, device=device), th.zeros(batch_size, self.stoch_dim, device=device)

    def core(self, deter: th.Tensor, stoch: th.Tensor, action: th.Tensor) -> th.Tensor:
        """Block GRU: h [N, D], z [N, S*K], a [N, A] -> next h [N, D].

        Each block g sees its own slice of h and the shared input x = [in(h), in(z), in(a)]; its
        weight ``gru_hidden.weight[g]`` is split into the rows for h and the rows for x, so the
        shared part is one [N, 3*hidden] x [3*hidden, D] product instead of G copies of x
        concatenated to the blocks (the same sums; the concatenation was a quarter of an imagination
        step on CPU).
        """
        action = action / th.clamp(action.abs(), min=1.0).detach()
        x = th.cat([self.in_deter(deter), self.in_stoch(stoch), self.in_action(action)], -1)
        n, g = deter.shape[0], self.blocks
        size = self.deter_dim // g
        weight = self.gru_hidden.weight  # [G, D/G + 3*hidden, D/G]
        w_deter, w_x = weight[:, :size], weight[:, size:].transpose(0, 1).reshape(x.shape[-1], -1)
        blocks = deter.view(n, g, size).transpose(0, 1)  # [G, N, D/G]
        hidden = th.bmm(blocks, w_deter).transpose(0, 1) + th.addmm(self.gru_hidden.bias, x, w_x).view(n, g, size)
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
    ) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
        """One posterior step; resets where ``is_first`` [N] (float 0/1).

        :return: deter [N, D], stoch [N, S*K], posterior log-probs [N, S, K]
        """
        keep = (1.0 - is_first).unsqueeze(-1)
        deter = self.core(deter * keep, stoch * keep, prev_action * keep)
        logits = self.posterior_logits(deter, embed_proj)
        return deter, sample_onehot(logits, deterministic).flatten(-2), logits

    def img_step(self, deter: th.Tensor, stoch: th.Tensor, action: th.Tensor) -> tuple[th.Tensor, th.Tensor]:
        """One prior (imagination) step: returns deter [N, D], stoch [N, S*K]."""
        deter = self.core(deter, stoch, action)
        return deter, sample_onehot(self.prior_logits(deter)).flatten(-2)

    def observe(
        self,
        embed: th.Tensor,
        prev_action: th.Tensor,
        is_first: th.Tensor,
        initial: tuple[th.Tensor, th.Tensor] | None = None,
    ) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
        """Posterior states of a sequence.

        :param embed: [B, T, E]
        :param prev_action: [B, T, A], the action taken before step t (row t-1's action)
        :param is_first: [B, T] float 0/1
        :param initial: (deter [B, D], stoch [B, S*K]) carried into step 0; None means zeros
        :return: deter [B, T, D], stoch [B, T, S*K], posterior log-probs [B, T, S, K]
        """
        batch, steps = embed.shape[:2]
        deter, stoch = self.initial(batch, embed.device) if initial is None else initial
        embed_proj = self.embed_projection(embed)
        deters, stochs, logits = [], [], []
        for t in range(steps):
            deter, stoch, logit = self.obs_step(deter, stoch, prev_action[:, t], embed_proj[:, t], is_first[:, t])
            deters.append(deter)
            stochs.append(stoch)
            logits.append(logit)
        return th.stack(deters, 1), th.stack(stochs, 1), th.stack(logits, 1)
