"""Action distributions of the actor, in the normalised action space the world model sees.

- :class:`OneHotCategorical` for ``Discrete``, ``MultiDiscrete`` and ``MultiBinary`` actions: actions
  are (concatenated) one-hot vectors [..., A].
- :class:`BoundedNormal` for ``Box`` actions: mean ``tanh(x)``, std ``(1 - min_std) * sigmoid(x + 2) + min_std``;
  actions live in [-1, 1] (samples beyond are clipped by the env wrapper and squashed the same way by
  the RSSM's ``a / max(1, |a|)``).

Both expose ``sample()``, ``mode()``, ``log_prob(action) -> [...]`` and ``entropy() -> [...]``.
"""

from __future__ import annotations

import math

import torch as th
import torch.nn.functional as F


class OneHotCategorical:
    """Independent categoricals over the groups of ``classes`` [K1, K2, ...] from logits [..., sum K].

    A single group is a ``Discrete`` action; several are ``MultiDiscrete`` (or ``MultiBinary``, two
    classes per bit). Actions are the groups' one-hot vectors concatenated; ``log_prob`` and
    ``entropy`` are sums over the groups (the components are independent).
    """

    def __init__(self, logits: th.Tensor, classes: list[int] | None = None) -> None:
        self.classes = [logits.shape[-1]] if classes is None else list(classes)
        if len(self.classes) == 1:
            self.log_probs = F.log_softmax(logits, dim=-1)
        elif len(set(self.classes)) == 1:  # equal groups: one reshaped softmax
            self.log_probs = F.log_softmax(logits.unflatten(-1, (len(self.classes), self.classes[0])), -1).flatten(-2)
        else:
            self.log_probs = th.cat([F.log_softmax(x, -1) for x in logits.split(self.classes, -1)], -1)

    def _onehot_max(self, scores: th.Tensor) -> th.Tensor:
        """One-hot of each group's maximum of ``scores`` [..., sum K] (ties broken by argmax)."""
        parts = [F.one_hot(x.argmax(-1), x.shape[-1]) for x in scores.split(self.classes, -1)]
        return th.cat(parts, -1).to(self.log_probs.dtype)

    def sample(self) -> th.Tensor:
        """One-hot sample per group with a straight-through gradient (that of the probabilities)."""
        uniform = th.rand_like(self.log_probs).clamp_(1e-20, 1.0)
        perturbed = self.log_probs.detach() - th.log(-th.log(uniform))  # Gumbel-max
        if len(self.classes) == 1:  # "equals the maximum": 3x cheaper than argmax + one_hot on CPU
            onehot = (perturbed == perturbed.amax(-1, keepdim=True)).to(self.log_probs.dtype)
        else:
            onehot = self._onehot_max(perturbed)
        if not self.log_probs.requires_grad:
            return onehot
        probs = self.log_probs.exp()
        return onehot + probs - probs.detach()

    def mode(self) -> th.Tensor:
        return self._onehot_max(self.log_probs)

    def log_prob(self, action: th.Tensor) -> th.Tensor:
        return (action * self.log_probs).sum(-1)

    def entropy(self) -> th.Tensor:
        return -(self.log_probs.exp() * self.log_probs).sum(-1)


class BoundedNormal:
    """Diagonal normal from raw outputs [..., 2A] (mean part, std part), mean in [-1, 1]."""

    def __init__(self, raw: th.Tensor, min_std: float = 0.1, max_std: float = 1.0) -> None:
        mean, std = raw.chunk(2, -1)
        self.mean = th.tanh(mean)
        self.std = (max_std - min_std) * th.sigmoid(std + 2.0) + min_std

    def sample(self) -> th.Tensor:
        """Reparameterised sample: differentiable with respect to mean and std."""
        return self.mean + self.std * th.randn_like(self.mean)

    def mode(self) -> th.Tensor:
        return self.mean

    def log_prob(self, action: th.Tensor) -> th.Tensor:
        z = (action - self.mean) / self.std
        return (-0.5 * z**2 - th.log(self.std) - 0.5 * math.log(2 * math.pi)).sum(-1)

    def entropy(self) -> th.Tensor:
        return (0.5 + 0.5 * math.log(2 * math.pi) + th.log(self.std)).sum(-1)
