"""Actor and critic trained in imagination, and their losses (DreamerV3).

Actor: REINFORCE on ``adv = (R - v) / max(1, P95 - P5)`` with an entropy bonus, every term weighted
by the cumulative product of predicted continues. Critic: two-hot cross-entropy towards the
lambda-returns plus a regulariser towards a slow (EMA) copy of itself.
"""

from __future__ import annotations

import torch as th
from torch import nn

from sb3_dreamer.distributions import BoundedNormal, OneHotCategorical
from sb3_dreamer.functional import quantiles, twohot, twohot_bins, twohot_loss, twohot_mean
from sb3_dreamer.networks.layers import MLP


class Actor(nn.Module):
    """Policy head: feat [..., F] -> action distribution over [..., A].

    :param classes: class counts of the categorical components (one-hot actions), or None for a
        bounded normal over A continuous dimensions
    """

    def __init__(self, feat_dim: int, action_dim: int, classes: list[int] | None, units: int = 64, layers: int = 3) -> None:
        super().__init__()
        self.classes = classes
        self.action_dim = action_dim
        self.net = MLP(feat_dim, units, layers, action_dim if classes is not None else 2 * action_dim, outscale=0.01)

    def forward(self, feat: th.Tensor) -> OneHotCategorical | BoundedNormal:
        return self.distribution(self.net(feat))

    def distribution(self, raw: th.Tensor) -> OneHotCategorical | BoundedNormal:
        """The action distribution from the network's output ``raw`` = ``net(feat)``."""
        raw = raw.float()  # distributions in float32 under bfloat16 autocast
        return OneHotCategorical(raw, self.classes) if self.classes is not None else BoundedNormal(raw)

    def noise(self, *shape: int, device: th.device | None = None) -> th.Tensor:
        """The noise of ``sample`` for actions of ``shape`` (e.g. H, N): [*shape, A], Gumbel for
        one-hot actions, standard normal for continuous ones; drawn in one call for a loop."""
        dist = OneHotCategorical if self.classes is not None else BoundedNormal
        return dist.draw_noise((*shape, self.action_dim), device)


class Critic(nn.Module):
    """Value head with a two-hot output over symexp-spaced bins, zero-initialised (predicts 0 at start)."""

    def __init__(self, feat_dim: int, units: int = 64, layers: int = 3, num_bins: int = 255) -> None:
        super().__init__()
        self.net = MLP(feat_dim, units, layers, num_bins, outscale=0.0)
        self.register_buffer("bins", twohot_bins(num_bins), persistent=False)

    def forward(self, feat: th.Tensor) -> th.Tensor:
        """Logits [..., N]."""
        return self.net(feat)

    def value(self, logits: th.Tensor) -> th.Tensor:
        return twohot_mean(logits, self.bins)

    def loss(self, logits: th.Tensor, target: th.Tensor) -> th.Tensor:
        return twohot_loss(logits, target, self.bins)


def update_return_percentiles(
    returns: th.Tensor, low: th.Tensor, high: th.Tensor, decay: float = 0.99, qs: tuple[float, float] = (0.05, 0.95)
) -> th.Tensor:
    """Track the 5th/95th return percentiles by EMA (in place on ``low``/``high``, 0-d tensors).

    :return: the return scale ``max(1, high - low)`` (0-d)
    """
    q = quantiles(returns.detach().float(), qs)
    low.mul_(decay).add_((1.0 - decay) * q[0])
    high.mul_(decay).add_((1.0 - decay) * q[1])
    return th.clamp(high - low, min=1.0)


def actor_loss(
    log_prob: th.Tensor, entropy: th.Tensor, advantage: th.Tensor, weight: th.Tensor, entropy_coef: float = 3e-4
) -> th.Tensor:
    """REINFORCE loss per imagined step: ``-weight * (logpi(a) * sg(adv) + entropy_coef * H)``, all [N, H] -> [N, H]."""
    return -weight.detach() * (log_prob * advantage.detach() + entropy_coef * entropy)


def critic_loss(
    critic: Critic, logits: th.Tensor, target: th.Tensor, slow_value: th.Tensor, slow_reg: float = 1.0
) -> th.Tensor:
    """Two-hot CE towards the return ``target`` plus ``slow_reg`` x CE towards the slow critic: [...].

    Both cross-entropies share one normaliser (the encodings sum to 1, as in
    :func:`~sb3_dreamer.functional.twohot_loss`):
    ``-(twohot(target) + slow_reg * twohot(slow)) . log_softmax(logits)``
    ``= (1 + slow_reg) * logsumexp(logits) - (twohot(target) + slow_reg * twohot(slow)) . logits``.
    """
    bins = critic.bins
    logits = logits.to(bins.dtype)
    targets = twohot(th.stack([target, slow_value]).detach().to(bins.dtype), bins)
    return (1.0 + slow_reg) * th.logsumexp(logits, -1) - ((targets[0] + slow_reg * targets[1]) * logits).sum(-1)
