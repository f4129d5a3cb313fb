"""Pure functions of sb3_dreamer.functional against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch as th

from sb3_dreamer.functional import (
    categorical_kl,
    kl_free_bits,
    lambda_return,
    quantiles,
    symexp,
    symlog,
    twohot,
    twohot_bins,
    twohot_hat,
    twohot_loss,
    twohot_mean,
    unimix_logits,
)

# Small symmetric bins, easy to compute with by hand.
BINS = th.tensor([-2.0, -1.0, 0.0, 1.0, 2.0])


# ------------------------------------------------------------------------------------ symlog
def test_symlog_known_values():
    e = math.e
    x = th.tensor([0.0, e - 1.0, -(e - 1.0), e**2 - 1.0])
    th.testing.assert_close(symlog(x), th.tensor([0.0, 1.0, -1.0, 2.0]))
    th.testing.assert_close(symexp(th.tensor([0.0, 1.0, -1.0, 2.0])), x)


def test_symlog_round_trip():
    x = th.tensor([-1e6, -123.4, -1.0, -1e-3, 0.0, 1e-3, 0.5, 7.0, 1e4], dtype=th.float64)
    th.testing.assert_close(symexp(symlog(x)), x)
    th.testing.assert_close(symlog(symexp(x.clamp(-30, 30))), x.clamp(-30, 30))


def test_symlog_is_odd_and_monotonic():
    x = th.linspace(-50, 50, 101)
    th.testing.assert_close(symlog(-x), -symlog(x))
    assert (symlog(x).diff() > 0).all()


# ------------------------------------------------------------------------------------ twohot
def test_twohot_between_two_bins():
    th.testing.assert_close(twohot(th.tensor(0.25), BINS), th.tensor([0.0, 0.0, 0.75, 0.25, 0.0]))
    th.testing.assert_close(twohot(th.tensor(-1.9), BINS), th.tensor([0.9, 0.1, 0.0, 0.0, 0.0]))


def test_twohot_on_a_bin():
    for i, value in enumerate(BINS):
        expected = th.zeros(5)
        expected[i] = 1.0
        th.testing.assert_close(twohot(value, BINS), expected)


def test_twohot_outside_the_range():
    th.testing.assert_close(twohot(th.tensor(7.0), BINS), th.tensor([0.0, 0.0, 0.0, 0.0, 1.0]))
    th.testing.assert_close(twohot(th.tensor(-7.0), BINS), th.tensor([1.0, 0.0, 0.0, 0.0, 0.0]))


def test_twohot_batched_and_expectation():
    bins = twohot_bins(255)
    x = th.tensor([[-1000.0, -3.3, 0.0], [0.01, 42.0, 1e5]])
    encoded = twohot(x, bins)
    assert encoded.shape == (2, 3, 255)
    th.testing.assert_close(encoded.sum(-1), th.ones(2, 3))
    assert ((encoded > 0).sum(-1) <= 2).all()
    th.testing.assert_close((encoded * bins).sum(-1), x, rtol=1e-5, atol=1e-5)


def test_twohot_bins_are_symexp_spaced():
    bins = twohot_bins(255, 20.0)
    assert bins.shape == (255,)
    assert (bins.diff() > 0).all()
    th.testing.assert_close(symlog(bins[[0, -1]]), th.tensor([-20.0, 20.0]))


def test_twohot_bins_centre_is_exactly_zero():
    bins = twohot_bins(255)
    assert bins[127].item() == 0.0
    assert th.equal(bins, -bins.flip(0))


def test_twohot_mean_uniform_logits_is_exactly_zero():
    assert twohot_mean(th.zeros(4, 255), twohot_bins(255)).abs().max().item() == 0.0
    assert twohot_mean(th.zeros(5), BINS).item() == 0.0


def test_twohot_mean_inverts_twohot():
    bins = twohot_bins(255)
    x = th.tensor([-523.0, -3.7, -0.2, 0.0, 0.3, 1.0, 12.5, 1000.0])
    th.testing.assert_close(twohot_mean(th.log(twohot(x, bins)), bins), x, rtol=1e-5, atol=1e-6)


def test_twohot_mean_matches_plain_expectation():
    th.manual_seed(0)
    bins = twohot_bins(255)
    logits = th.randn(3, 255)
    expected = (th.softmax(logits.double(), -1) * bins.double()).sum(-1).float()
    th.testing.assert_close(twohot_mean(logits, bins), expected, rtol=1e-4, atol=1e-4)


def test_even_number_of_bins_is_refused():
    with pytest.raises(ValueError, match="odd"):
        twohot_bins(4)
    with pytest.raises(ValueError, match="odd"):
        twohot_mean(th.zeros(4), th.tensor([-2.0, -1.0, 1.0, 2.0]))


def test_twohot_loss_is_cross_entropy_of_the_encoding():
    logits = th.tensor([[0.1, 0.2, 0.3, -0.5, 1.0]])
    target = th.tensor([0.25])
    expected = -(0.75 * th.log_softmax(logits, -1)[0, 2] + 0.25 * th.log_softmax(logits, -1)[0, 3])
    th.testing.assert_close(twohot_loss(logits, target, BINS), expected.unsqueeze(0))


def test_twohot_hat_equals_the_scatter_encoding():
    # twohot() uses the hat form under torch.compile: the two must agree (to rounding) everywhere.
    bins = twohot_bins(255)
    x = th.cat([th.randn(500) * 50, bins, bins[:-1] + bins.diff() / 3, th.tensor([1e10, -1e10, 0.0])])
    th.testing.assert_close(twohot_hat(x, bins), twohot(x, bins), rtol=0, atol=1e-6)
    th.testing.assert_close(twohot_hat(th.tensor(0.25), BINS), th.tensor([0.0, 0.0, 0.75, 0.25, 0.0]))
    th.testing.assert_close(twohot_hat(th.tensor(-7.0), BINS), th.tensor([1.0, 0.0, 0.0, 0.0, 0.0]))


def test_twohot_loss_gradient_is_softmax_minus_encoding():
    bins = twohot_bins(255)
    logits = th.randn(6, 7, 255, requires_grad=True)
    target = th.randn(6, 7) * 50
    loss = twohot_loss(logits, target, bins)
    th.testing.assert_close(loss, -(twohot(target, bins) * th.log_softmax(logits, -1)).sum(-1))
    (grad,) = th.autograd.grad(loss.sum(), logits)
    th.testing.assert_close(grad, th.softmax(logits, -1) - twohot(target, bins))


# ------------------------------------------------------------------------------------ lambda-returns
# reward[t] led to step t, discount[t] discounts what follows step t-1, bootstrap[t] = v_t.
REWARD = th.tensor([[0.0, 1.0, 2.0]])
DISCOUNT = th.tensor([[1.0, 0.9, 0.8]])
VALUE = th.tensor([[10.0, 20.0, 30.0]])


@pytest.mark.parametrize(
    "lam, expected",
    [
        # R_1 = r_2 + d_2 v_2 = 2 + 0.8 * 30 = 26 for every lambda;
        (1.0, [1.0 + 0.9 * 26.0, 26.0]),  # R_0 = r_1 + d_1 R_1 = 24.4
        (0.0, [1.0 + 0.9 * 20.0, 26.0]),  # R_0 = r_1 + d_1 v_1 = 19
        (0.5, [1.0 + 0.9 * (0.5 * 20.0 + 0.5 * 26.0), 26.0]),  # 21.7
    ],
)
def test_lambda_return_hand_computed(lam, expected):
    th.testing.assert_close(lambda_return(REWARD, DISCOUNT, VALUE, lam), th.tensor([expected]))


def test_lambda_return_last_cuts_the_recursion():
    # last at step 1: R_0 bootstraps from v_1 even with lambda = 1.
    last = th.tensor([[0.0, 1.0, 0.0]])
    th.testing.assert_close(lambda_return(REWARD, DISCOUNT, VALUE, 1.0, last=last), th.tensor([[19.0, 26.0]]))
    # last on step 0 only has no effect (it would only stop a recursion into step 0).
    last = th.tensor([[1.0, 0.0, 0.0]])
    th.testing.assert_close(lambda_return(REWARD, DISCOUNT, VALUE, 1.0, last=last), th.tensor([[24.4, 26.0]]))


def test_lambda_return_terminal_discount():
    discount = th.tensor([[1.0, 0.0, 0.8]])  # step 1 is terminal: nothing after it counts
    th.testing.assert_close(lambda_return(REWARD, discount, VALUE, 0.7), th.tensor([[1.0, 26.0]]))


def test_lambda_return_batched_against_a_loop():
    th.manual_seed(0)
    reward, discount, value = th.randn(4, 6), th.rand(4, 6), th.randn(4, 6)
    lam = 0.95
    expected = th.zeros(4, 5)
    ret = value[:, -1]
    for t in reversed(range(5)):
        ret = reward[:, t + 1] + discount[:, t + 1] * ((1 - lam) * value[:, t + 1] + lam * ret)
        expected[:, t] = ret
    th.testing.assert_close(lambda_return(reward, discount, value, lam), expected)


# ------------------------------------------------------------------------------------ KL
def test_categorical_kl_identical_is_zero():
    logits = th.log_softmax(th.randn(3, 4, 5), -1)
    th.testing.assert_close(categorical_kl(logits, logits), th.zeros(3))


def test_categorical_kl_hand_computed():
    p = th.log(th.tensor([[0.5, 0.5], [0.9, 0.1]]))
    q = th.log(th.tensor([[0.25, 0.75], [0.5, 0.5]]))
    expected = 0.5 * math.log(2.0) + 0.5 * math.log(2.0 / 3.0) + 0.9 * math.log(1.8) + 0.1 * math.log(0.2)
    th.testing.assert_close(categorical_kl(p, q), th.tensor(expected))
    assert categorical_kl(q, p).item() != pytest.approx(expected)  # not symmetric


def test_kl_free_bits_clips_below_and_blocks_gradient():
    kl = th.tensor([0.2, 1.0, 3.5], requires_grad=True)
    clipped = kl_free_bits(kl, free_bits=1.0)
    th.testing.assert_close(clipped, th.tensor([1.0, 1.0, 3.5]))
    clipped.sum().backward()
    assert kl.grad is not None and kl.grad[0].item() == 0.0 and kl.grad[2].item() == 1.0


# ------------------------------------------------------------------------------------ unimix
@pytest.mark.parametrize("unimix", [0.01, 0.1])
def test_unimix_logits(unimix):
    logits = th.tensor([[100.0, -100.0, -100.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    probs = unimix_logits(logits, unimix).exp()
    th.testing.assert_close(probs.sum(-1), th.ones(2))
    assert probs.min().item() >= unimix / 4 * (1 - 1e-5)
    th.testing.assert_close(probs[1], th.full((4,), 0.25))


def test_unimix_zero_is_log_softmax():
    logits = th.randn(3, 5)
    th.testing.assert_close(unimix_logits(logits, 0.0), th.log_softmax(logits, -1))


def test_quantiles_by_hand_and_against_torch():
    # 0..10: the 5th percentile sits at position 0.5 (between 0 and 1), the 95th at 9.5.
    th.testing.assert_close(quantiles(th.arange(11.0), (0.05, 0.95)), th.tensor([0.5, 9.5]))
    th.testing.assert_close(quantiles(th.tensor([3.0]), (0.0, 0.5, 1.0)), th.tensor([3.0, 3.0, 3.0]))
    x = th.randn(7, 13, generator=th.Generator().manual_seed(0))
    qs = (0.0, 0.05, 0.5, 0.95, 1.0)
    th.testing.assert_close(quantiles(x, qs), th.quantile(x.flatten(), th.tensor(qs)))
    with pytest.raises(ValueError, match="quantiles"):
        quantiles(x, (1.5,))
