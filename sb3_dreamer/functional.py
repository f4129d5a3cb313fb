"""Pure tensor functions of the DreamerV3 recipe, each tested against hand-computed values.

Shape letters: B batch, T time, H imagination horizon, S stochastic variables, K classes,
N bins of a two-hot distribution.
"""

from __future__ import annotations

import torch as th
import torch.nn.functional as F


def symlog(x: th.Tensor) -> th.Tensor:
    """``sign(x) * log(1 + |x|)``: compresses large magnitudes, identity-like near zero."""
    return th.sign(x) * th.log1p(x.abs())


def symexp(x: th.Tensor) -> th.Tensor:
    """Inverse of :func:`symlog`: ``sign(x) * (exp(|x|) - 1)``."""
    return th.sign(x) * th.expm1(x.abs())


def twohot_bins(num_bins: int = 255, limit: float = 20.0) -> th.Tensor:
    """Bins evenly spaced in symlog space, ``symexp(linspace(-limit, limit, num_bins))``: shape [N].

    Built as one half mirrored, so the bins are exactly symmetric with an exact 0 in the middle
    (``linspace`` in float32 puts the centre at 7e-8). ``num_bins`` must be odd.
    """
    if num_bins < 3 or num_bins % 2 == 0:
        raise ValueError(f"num_bins must be odd and at least 3 (symmetric bins around 0), got {num_bins}")
    half = symexp(th.linspace(0.0, limit, (num_bins + 1) // 2, dtype=th.float64))
    return th.cat([-half.flip(0)[:-1], half]).float()


def twohot(x: th.Tensor, bins: th.Tensor) -> th.Tensor:
    """Two-hot encoding of ``x`` [...] over increasing ``bins`` [N]: [..., N].

    The weight is split between the two neighbouring bins in proportion to closeness (linear in
    raw space), so ``(twohot(x, bins) * bins).sum(-1) == x`` for ``x`` inside the bin range.
    Values outside the range put all weight on the outermost bin.

    Eager: two scatters into zeros (the fewest passes over [..., N]). Under ``torch.compile``: the
    same weights as hat functions (:func:`twohot_hat`), which fuse with the loss into one vectorised
    pass; inductor's CPU scatter kernel is not vectorised.
    """
    if th.compiler.is_compiling():
        return twohot_hat(x, bins)
    num_bins = bins.shape[0]
    above = th.bucketize(x.contiguous(), bins).clamp(0, num_bins - 1)  # first bin >= x
    below = (above - 1).clamp(0, num_bins - 1)
    below = th.where(bins[above] <= x, above, below)  # x on a bin, or beyond the last one
    dist_below = (x - bins[below]).abs()
    dist_above = (bins[above] - x).abs()
    total = dist_below + dist_above
    same = below == above
    weight_below = th.where(same, th.ones_like(x), dist_above / th.where(same, th.ones_like(total), total))
    weight_above = 1.0 - weight_below
    out = th.zeros(*x.shape, num_bins, dtype=x.dtype, device=x.device)
    out.scatter_add_(-1, below.unsqueeze(-1), weight_below.unsqueeze(-1))
    out.scatter_add_(-1, above.unsqueeze(-1), weight_above.unsqueeze(-1))
    return out


def twohot_hat(x: th.Tensor, bins: th.Tensor) -> th.Tensor:
    """:func:`twohot` as a pointwise formula: bin j's weight is the hat function
    ``max(0, 1 - |x - b_j| / gap)``, with ``gap`` the distance from b_j to its neighbour on x's side
    (infinite beyond the outermost bins, so they keep all the weight of values outside the range).
    Equal to the scatter form up to rounding; x [...] -> [..., N]."""
    gaps = bins[1:] - bins[:-1]
    inf = bins.new_full((1,), float("inf"))
    left, right = th.cat([inf, gaps]), th.cat([gaps, inf])
    diff = x.unsqueeze(-1) - bins
    return th.clamp(1.0 - th.where(diff >= 0, diff / right, -diff / left), min=0.0)


def twohot_mean(logits: th.Tensor, bins: th.Tensor) -> th.Tensor:
    """Expected value of a two-hot head, logits [..., N] -> [...].

    ``bins`` must be symmetric around an exact 0, as :func:`twohot_bins` builds them. The mirrored
    probabilities are subtracted before the product, so uniform probabilities give exactly 0 (a
    left-to-right sum accumulates rounding error and would not). Computed in the bins' dtype.
    """
    if bins.shape[0] % 2 == 0:
        raise ValueError(f"twohot_mean needs an odd number of symmetric bins, got {bins.shape[0]}")
    if logits.dtype != bins.dtype:
        logits = logits.to(bins.dtype)
    probs = F.softmax(logits, dim=-1)
    mid = (bins.shape[0] - 1) // 2
    # sum_i p_i b_i = sum_{i>mid} (p_i - p_{mirror(i)}) b_i, since b_mirror(i) = -b_i and b_mid = 0;
    # one matrix-vector product instead of two products, a flip and a sum.
    return (probs[..., mid + 1 :] - probs[..., :mid].flip(-1)) @ bins[mid + 1 :]


def twohot_loss(logits: th.Tensor, target: th.Tensor, bins: th.Tensor) -> th.Tensor:
    """Cross-entropy of logits [..., N] against the two-hot encoding of target [...]: [...].

    ``-twohot(target) . log_softmax(logits) = logsumexp(logits) - twohot(target) . logits``, since
    the encoding sums to 1; computed in the bins' dtype, the target treated as a constant.
    """
    logits = logits.to(bins.dtype)
    return th.logsumexp(logits, -1) - (twohot(target.detach().to(bins.dtype), bins) * logits).sum(-1)


def unimix_logits(logits: th.Tensor, unimix: float = 0.01) -> th.Tensor:
    """Mix ``unimix`` of the uniform distribution into softmax(logits) [..., K]; return log-probs."""
    if unimix <= 0.0:
        return F.log_softmax(logits, dim=-1)
    # softmax written out: ATen's softmax over a last dimension of a few classes is ~3x slower on CPU.
    exp = (logits - logits.detach().amax(-1, keepdim=True)).exp()
    probs = exp / exp.sum(-1, keepdim=True)
    probs = (1.0 - unimix) * probs + unimix / logits.shape[-1]
    return th.log(probs)


def categorical_kl(logits_p: th.Tensor, logits_q: th.Tensor) -> th.Tensor:
    """KL(p || q) between categoricals given as log-probs [..., S, K], summed over S and K: [...]."""
    return (logits_p.exp() * (logits_p - logits_q)).sum((-2, -1))


def kl_free_bits(kl: th.Tensor, free_bits: float = 1.0) -> th.Tensor:
    """Clip a KL term below at ``free_bits`` nats: no gradient once the KL is small enough."""
    return th.clamp(kl, min=free_bits)


def quantiles(x: th.Tensor, qs: tuple[float, ...]) -> th.Tensor:
    """Quantiles of all elements of ``x``, linearly interpolated as ``torch.quantile``: [len(qs)].

    Sorts once and reads fixed positions, so unlike ``torch.quantile`` with a tensor of
    quantiles it never synchronises with the host (it can be captured in a CUDA graph).
    """
    flat = x.flatten().sort().values
    n = flat.shape[0]
    out = []
    for q in qs:
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantiles must lie in [0, 1], got {q}")
        pos = q * (n - 1)
        low = min(int(pos), n - 1)
        high = min(low + 1, n - 1)
        out.append(flat[low] + (pos - low) * (flat[high] - flat[low]))
    return th.stack(out)


def lambda_return(
    reward: th.Tensor,
    discount: th.Tensor,
    bootstrap: th.Tensor,
    lam: float,
    last: th.Tensor | None = None,
) -> th.Tensor:
    """TD(lambda) returns over a sequence.

    ``R_t = r_{t+1} + d_{t+1} * ((1 - l_{t+1}) * v_{t+1} + l_{t+1} * R_{t+1})`` with ``R_T = v_T``,
    where ``l_t = lam * (1 - last_t)``: the recursion stops at ``last`` (the end of a replayed
    episode) and bootstraps from the value there.

    :param reward: [B, T+1], ``reward[:, t]`` is the reward that led to step t
    :param discount: [B, T+1], ``discount[:, t]`` discounts what follows step t-1 (0 after a terminal)
    :param bootstrap: [B, T+1] value estimates
    :param lam: lambda in [0, 1]
    :param last: optional [B, T+1] float, 1 where a sequence ends
    :return: [B, T] returns for steps 0..T-1
    """
    lam_t = th.full_like(reward[:, 1:], lam) if last is None else lam * (1.0 - last[:, 1:])
    interm = reward[:, 1:] + (1.0 - lam_t) * discount[:, 1:] * bootstrap[:, 1:]
    ret = bootstrap[:, -1]
    returns = []
    for t in reversed(range(reward.shape[1] - 1)):
        ret = interm[:, t] + discount[:, t + 1] * lam_t[:, t] * ret
        returns.append(ret)
    return th.stack(returns[::-1], dim=1)
