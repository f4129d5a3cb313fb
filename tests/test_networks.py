"""Modules by their invariants: RSSM, heads, world model, distributions, LaProp, policy imagination."""

from __future__ import annotations

import copy

import pytest
import torch as th
from gymnasium import spaces
from torch import distributions as D

from sb3_dreamer.distributions import BoundedNormal, OneHotCategorical, gumbel_noise, sample_onehot, straight_through
from sb3_dreamer.functional import twohot
from sb3_dreamer.networks.actor_critic import Actor, Critic, critic_loss, update_return_percentiles
from sb3_dreamer.networks.encoders import vector_size, vector_values
from sb3_dreamer.networks.layers import BlockLinear, NormLinear
from sb3_dreamer.optimizers import LaProp
from sb3_dreamer.policies import DreamerPolicy

from .helpers import TINY_POLICY_KWARGS, TINY_RSSM_KWARGS, assert_state_dicts_equal, fixed_batch, make_rssm, make_world_model

B, T, E, A = 2, 6, 5, 2
DETER, STOCH_DIM = TINY_RSSM_KWARGS["deter"], TINY_RSSM_KWARGS["stoch"] * TINY_RSSM_KWARGS["classes"]


def random_sequence(seed: int = 0, reset_at: int | None = None):
    """Embeddings [B, T, E], previous actions [B, T, A] and is_first [B, T] (1 at t=0 and t=reset_at)."""
    gen = th.Generator().manual_seed(seed)
    embed = th.randn(B, T, E, generator=gen)
    prev_action = th.randn(B, T, A, generator=gen)
    is_first = th.zeros(B, T)
    is_first[:, 0] = 1.0
    if reset_at is not None:
        is_first[:, reset_at] = 1.0
    return embed, prev_action, is_first


def obs_step_loop(rssm, embed, prev_action, is_first, deterministic: bool, noise=None, initial=None):
    """observe() written out as a loop of obs_step from the zero state, or from ``initial`` (deter,
    stoch) where given (``noise`` [B, T, S, K] or None)."""
    deter, stoch = rssm.initial(embed.shape[0], embed.device) if initial is None else initial
    deters, stochs, logits = [], [], []
    for t in range(embed.shape[1]):
        proj = rssm.embed_projection(embed[:, t])
        noise_t = None if noise is None else noise[:, t]
        deter, stoch, logit = rssm.obs_step(deter, stoch, prev_action[:, t], proj, is_first[:, t], deterministic, noise_t)
        deters.append(deter)
        stochs.append(stoch)
        logits.append(logit)
    return th.stack(deters, 1), th.stack(stochs, 1), th.stack(logits, 1)


# ------------------------------------------------------------------------------------ RSSM
def test_rssm_observe_shapes_and_one_hot_stoch():
    rssm = make_rssm(E, A)
    deter, stoch, logits = rssm.observe(*random_sequence())
    assert deter.shape == (B, T, DETER)
    assert stoch.shape == (B, T, STOCH_DIM)
    assert logits.shape == (B, T, TINY_RSSM_KWARGS["stoch"], TINY_RSSM_KWARGS["classes"])
    assert rssm.feat_dim == DETER + STOCH_DIM
    groups = stoch.detach().unflatten(-1, (TINY_RSSM_KWARGS["stoch"], TINY_RSSM_KWARGS["classes"]))
    th.testing.assert_close(groups.sum(-1), th.ones(B, T, TINY_RSSM_KWARGS["stoch"]))
    th.testing.assert_close(groups, groups.round(), rtol=0, atol=1e-6)  # one-hot up to straight-through rounding
    th.testing.assert_close(logits.exp().sum(-1), th.ones(B, T, TINY_RSSM_KWARGS["stoch"]))


def test_rssm_observe_equals_obs_step_loop():
    rssm = make_rssm(E, A)
    sequence = random_sequence(reset_at=3)
    noise = rssm.noise(B, T)  # the same Gumbel noise for both: the same samples
    expected = rssm.observe(*sequence, noise=noise)
    got = obs_step_loop(rssm, *sequence, deterministic=False, noise=noise)
    for x, y in zip(got, expected):
        th.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    # The noise decides the samples: other noise, other latents.
    other = rssm.observe(*sequence, noise=rssm.noise(B, T))[1]
    assert not th.equal(other, expected[1])


def test_rssm_observe_carries_the_initial_state_into_step_zero():
    """Replay context: a window not starting an episode (is_first 0 at step 0) continues from the
    given latent, and a window that does start one ignores it."""
    rssm = make_rssm(E, A)
    embed, prev_action, is_first = random_sequence()
    is_first[0, 0] = 0.0  # sequence 0 continues from its context, sequence 1 starts an episode
    gen = th.Generator().manual_seed(5)
    groups = th.randint(TINY_RSSM_KWARGS["classes"], (B, TINY_RSSM_KWARGS["stoch"]), generator=gen)
    initial = (th.randn(B, DETER, generator=gen), th.nn.functional.one_hot(groups).float().flatten(1))
    noise = rssm.noise(B, T)
    got = rssm.observe(embed, prev_action, is_first, initial=initial, noise=noise)
    expected = obs_step_loop(rssm, embed, prev_action, is_first, deterministic=False, noise=noise, initial=initial)
    for x, y in zip(got, expected):
        th.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    from_zeros = rssm.observe(embed, prev_action, is_first, noise=noise)
    assert not th.allclose(got[0][0, 0], from_zeros[0][0, 0], atol=1e-4)  # the context mattered
    th.testing.assert_close(got[0][1], from_zeros[0][1])  # reset at the episode's start


@pytest.mark.parametrize("chunk", [2, 3, T])
def test_rssm_observe_in_chunks_gives_the_same_values_and_gradients(chunk):
    """observe_chunk (steps per posterior_steps call, raised by compile_steps) changes no value,
    including a last chunk shorter than the others and the gradients through the carried state."""
    rssm = make_rssm(E, A)
    embed, prev_action, is_first = random_sequence(reset_at=4)  # not at a chunk boundary of 2 or 3
    embed.requires_grad_()
    noise = rssm.noise(B, T)
    results = []
    for observe_chunk in (1, chunk):
        rssm.observe_chunk = observe_chunk
        rssm.zero_grad()
        embed.grad = None
        deter, stoch, logits = rssm.observe(embed, prev_action, is_first, noise=noise)
        (deter.square().sum() + (stoch * logits.flatten(-2)).sum()).backward()
        results.append([deter, stoch, logits, embed.grad, rssm.gru_hidden.weight.grad])
    for x, y in zip(*results):
        th.testing.assert_close(x, y, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["observe_chunk", "imagine_chunk"])
def test_compile_steps_rejects_an_empty_chunk(name):
    policy = DreamerPolicy(spaces.Box(-1, 1, (3,)), spaces.Discrete(2), lambda _: 1e-3, **TINY_POLICY_KWARGS)
    with pytest.raises(ValueError, match=f"{name} must be a positive"):
        policy.compile_steps(**{name: 0})


def test_rssm_reset_at_is_first_equals_fresh_start():
    rssm = make_rssm(E, A)
    k = 3
    embed, prev_action, is_first = random_sequence(reset_at=k)
    # The deterministic state at the reset does not depend on sampling at all.
    full_deter = rssm.observe(embed, prev_action, is_first)[0]
    fresh_deter = rssm.observe(embed[:, k:], prev_action[:, k:], is_first[:, k:])[0]
    th.testing.assert_close(full_deter[:, k], fresh_deter[:, 0], rtol=0, atol=1e-6)
    # With deterministic (argmax) latents the whole rest of the sequence matches.
    full = obs_step_loop(rssm, embed, prev_action, is_first, deterministic=True)
    fresh = obs_step_loop(rssm, embed[:, k:], prev_action[:, k:], is_first[:, k:], deterministic=True)
    for x, y in zip(full, fresh):
        th.testing.assert_close(x[:, k:], y, rtol=1e-5, atol=1e-6)
    # Without the reset the history leaks into step k (so the comparison above can fail).
    is_first[:, k] = 0.0
    leaked = obs_step_loop(rssm, embed, prev_action, is_first, deterministic=True)[0]
    assert not th.allclose(leaked[:, k], fresh[0][:, 0], atol=1e-4)


def test_rssm_is_first_masks_previous_action():
    rssm = make_rssm(E, A)
    deter, stoch = th.randn(B, DETER), th.randn(B, STOCH_DIM)
    proj = rssm.embed_projection(th.randn(B, E))
    ones = th.ones(B)
    got = rssm.obs_step(deter, stoch, th.randn(B, A), proj, ones, deterministic=True)
    zero_deter, zero_stoch = rssm.initial(B, th.device("cpu"))
    fresh = rssm.obs_step(zero_deter, zero_stoch, th.zeros(B, A), proj, ones, deterministic=True)
    for x, y in zip(got, fresh):
        th.testing.assert_close(x, y)


def test_rssm_img_step_shapes():
    rssm = make_rssm(E, A)
    deter, stoch = rssm.img_step(th.randn(7, DETER), th.randn(7, STOCH_DIM), th.randn(7, A))
    assert deter.shape == (7, DETER) and stoch.shape == (7, STOCH_DIM)


def test_block_gru_core_equals_the_gru_written_per_block():
    """core() splits the block weights for speed; compare with DreamerV3's GRU written out block by block."""
    rssm = make_rssm(E, A)
    for p in rssm.parameters():
        th.nn.init.normal_(p, std=0.3)  # non-zero biases and norm scales too
    gen = th.Generator().manual_seed(3)
    deter, stoch = th.randn(5, DETER, generator=gen), th.randn(5, STOCH_DIM, generator=gen)
    action = 3 * th.randn(5, A, generator=gen)
    g, size = rssm.blocks, DETER // rssm.blocks
    a = action / action.abs().clamp(min=1.0)
    x = th.cat([rssm.in_deter(deter), rssm.in_stoch(stoch), rssm.in_action(a)], -1)
    hidden = th.cat(
        [th.cat([deter[:, i * size : (i + 1) * size], x], -1) @ rssm.gru_hidden.weight[i] for i in range(g)], -1
    ) + rssm.gru_hidden.bias
    hidden = th.nn.functional.silu(rssm.gru_norm(hidden))
    gates = th.cat([hidden[:, i * size : (i + 1) * size] @ rssm.gru_gates.weight[i] for i in range(g)], -1) + rssm.gru_gates.bias
    reset, cand, update = gates.view(5, g, 3, size).unbind(2)
    reset, cand, update = (y.reshape(5, DETER) for y in (reset, cand, update))
    cand = th.tanh(th.sigmoid(reset) * cand)
    update = th.sigmoid(update - 1.0)
    expected = update * cand + (1.0 - update) * deter
    th.testing.assert_close(rssm.core(deter, stoch, action), expected, rtol=1e-5, atol=1e-5)


def test_norm_linear_sees_the_scale_of_its_input():
    """Without a bias, Linear -> RMSNorm maps x and 2x to the same output (a 1-d Box action or
    observation would be seen by its sign only); with it, they differ, and the sign still matters."""
    th.manual_seed(0)
    layer = NormLinear(1, 16)
    half, one, minus = layer(th.tensor([[0.5], [1.0], [-1.0]]))
    assert (half - one).abs().max() > 0.05
    assert (one - minus).abs().max() > 0.05


def test_rssm_rejects_indivisible_blocks():
    with pytest.raises(ValueError, match="divisible"):
        make_rssm(E, A, deter=10, blocks=4)
    with pytest.raises(ValueError, match="divisible"):
        BlockLinear(10, 8, blocks=4)


# ------------------------------------------------------------------------------------ heads, world model
def test_reward_head_and_critic_predict_exactly_zero_at_init():
    wm = make_world_model()
    critic = Critic(wm.rssm.feat_dim, units=8, layers=1)
    feat = th.randn(4, wm.rssm.feat_dim)
    assert th.count_nonzero(wm.reward(feat)) == 0
    assert th.count_nonzero(critic.value(critic(feat))) == 0


def test_world_model_loss_shapes_and_metrics():
    wm = make_world_model()
    out = wm.loss(*fixed_batch(), gamma=0.99)
    assert out.loss.shape == (2, 8)
    assert out.deter.shape == (2, 8, DETER) and out.stoch.shape == (2, 8, STOCH_DIM)
    assert {"rec_loss", "reward_loss", "cont_loss", "dyn_kl", "rep_kl"} <= out.metrics.keys()
    assert th.isfinite(out.loss).all()
    # Each step's KL terms are clipped below at free_bits, so beyond the heads' losses the loss holds at
    # least (dyn_scale + rep_scale) * free_bits (here the tiny model's KLs are below free_bits).
    m = out.metrics
    assert m["dyn_kl"] < wm.free_bits
    heads = m["rec_loss"] + m["reward_loss"] + m["cont_loss"]
    assert out.loss.mean() - heads >= wm.free_bits * (wm.dyn_scale + wm.rep_scale) - 1e-5


def test_world_model_kl_terms_are_clipped_at_free_bits():
    # Free bits far above any KL of the tiny model: both KL terms are the constant free_bits.
    wm = make_world_model(free_bits=100.0)
    out = wm.loss(*fixed_batch(), gamma=0.99)
    assert out.metrics["dyn_kl"] < 100.0 and out.metrics["rep_kl"] < 100.0
    heads = out.metrics["rec_loss"] + out.metrics["reward_loss"] + out.metrics["cont_loss"]
    th.testing.assert_close(out.loss.mean(), heads + 100.0 * (wm.dyn_scale + wm.rep_scale))


def test_world_model_overfits_a_fixed_batch():
    th.manual_seed(0)
    wm = make_world_model()
    batch = fixed_batch()
    optimizer = LaProp(wm.parameters(), lr=3e-3, warmup=0)

    def loss_value(seed: int = 0) -> float:
        th.manual_seed(seed)
        with th.no_grad():
            return wm.loss(*batch, gamma=0.99).loss.mean().item()

    initial = loss_value()
    for _ in range(50):
        optimizer.zero_grad()
        wm.loss(*batch, gamma=0.99).loss.mean().backward()
        optimizer.step()
    final = loss_value()
    assert final < 0.7 * initial, (initial, final)


# ------------------------------------------------------------------------------------ distributions
def test_one_hot_categorical_matches_torch():
    th.manual_seed(0)
    logits = th.randn(4, 3, 5)
    ours, ref = OneHotCategorical(logits), D.OneHotCategorical(logits=logits)
    action = ref.sample()
    th.testing.assert_close(ours.log_prob(action), ref.log_prob(action))
    th.testing.assert_close(ours.entropy(), ref.entropy())
    th.testing.assert_close(ours.mode(), th.nn.functional.one_hot(logits.argmax(-1), 5).float())
    sample = ours.sample()
    assert sample.shape == (4, 3, 5)
    th.testing.assert_close(sample.sum(-1), th.ones(4, 3))


def test_one_hot_categorical_sampling_frequencies():
    th.manual_seed(0)
    probs = th.tensor([0.1, 0.6, 0.3])
    samples = OneHotCategorical(th.log(probs).expand(20_000, 3)).sample()
    th.testing.assert_close(samples.mean(0), probs, atol=0.02, rtol=0)


@pytest.mark.parametrize("classes", [[2, 3], [4, 4, 4]])
def test_multi_group_categorical_is_a_product_of_independent_categoricals(classes):
    th.manual_seed(0)
    logits = th.randn(6, sum(classes), requires_grad=True)
    ours = OneHotCategorical(logits, classes)
    parts = [D.OneHotCategorical(logits=x) for x in logits.split(classes, -1)]
    action = th.cat([d.sample() for d in parts], -1)
    th.testing.assert_close(ours.log_prob(action), sum(d.log_prob(a) for d, a in zip(parts, action.split(classes, -1))))
    th.testing.assert_close(ours.entropy(), sum(d.entropy() for d in parts))
    mode = th.cat([th.nn.functional.one_hot(x.argmax(-1), x.shape[-1]).float() for x in logits.split(classes, -1)], -1)
    th.testing.assert_close(ours.mode(), mode)
    sample = ours.sample()
    for group in sample.split(classes, -1):  # one one-hot per group
        th.testing.assert_close(group.detach().sum(-1), th.ones(6))
        assert set(group.detach().round().unique().tolist()) <= {0.0, 1.0}
        assert (group.detach() - group.detach().round()).abs().max() < 1e-6
    sample.sum().backward()  # straight-through: the gradient of the probabilities
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_straight_through_is_the_sample_forward_and_the_probabilities_backward():
    th.manual_seed(0)
    log_probs = th.randn(5, 3).log_softmax(-1).requires_grad_()
    onehot = th.nn.functional.one_hot(th.tensor([0, 2, 1, 1, 0]), 3).float()
    out = straight_through(onehot, log_probs)
    th.testing.assert_close(out.detach(), onehot, rtol=0, atol=1e-6)  # up to the rounding of (1 + p) - p
    weights = th.randn(5, 3)
    (out * weights).sum().backward()
    # d/dlogp of sum(w * exp(logp)) is w * p.
    th.testing.assert_close(log_probs.grad, weights * log_probs.detach().exp())
    assert straight_through(onehot, log_probs.detach()) is onehot  # no gradient: the sample itself


def test_bounded_normal_matches_torch():
    th.manual_seed(0)
    raw = th.randn(4, 6) * 3
    ours = BoundedNormal(raw, min_std=0.1, max_std=1.0)
    mean, std_raw = raw.chunk(2, -1)
    std = 0.9 * th.sigmoid(std_raw + 2.0) + 0.1
    ref = D.Independent(D.Normal(th.tanh(mean), std), 1)
    th.testing.assert_close(ours.mean, th.tanh(mean))
    assert (ours.std >= 0.1).all() and (ours.std <= 1.0).all()
    action = ref.sample()
    th.testing.assert_close(ours.log_prob(action), ref.log_prob(action))
    th.testing.assert_close(ours.entropy(), ref.entropy())
    th.testing.assert_close(ours.mode(), th.tanh(mean))
    assert ours.sample().shape == (4, 3)


@pytest.mark.parametrize("classes", [None, [3], [2, 3]])
def test_actor_samples_with_its_drawn_noise(classes):
    """``Actor.noise`` draws the noise of one sample per action [*shape, A]; ``sample(noise)`` is
    then exact: the Gumbel-max one-hot per group, or ``mean + std * noise`` for continuous actions,
    with the distributions' own gradients."""
    th.manual_seed(0)
    action_dim = 2 if classes is None else sum(classes)
    actor = Actor(8, action_dim, classes, units=16, layers=1)
    noise = actor.noise(3, 5)
    assert noise.shape == (3, 5, action_dim)
    raw = th.randn(5, action_dim * (2 if classes is None else 1), requires_grad=True)
    dist = actor.distribution(raw)
    sample = dist.sample(noise[0])
    if classes is None:
        th.testing.assert_close(sample, dist.mean + dist.std * noise[0])
        assert actor.noise(100_000).std().item() == pytest.approx(1.0, abs=0.01)  # standard normal
    else:
        perturbed = (dist.log_probs + noise[0]).detach().split(classes, -1)
        onehot = th.cat([th.nn.functional.one_hot(x.argmax(-1), x.shape[-1]).float() for x in perturbed], -1)
        th.testing.assert_close(sample.detach(), onehot, rtol=0, atol=1e-6)
        assert actor.noise(100_000).mean().item() == pytest.approx(0.5772, abs=0.01)  # standard Gumbel
    sample.sum().backward()
    assert raw.grad is not None and raw.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------ LaProp
def quadratic_problem():
    param = th.nn.Parameter(th.tensor([5.0, -3.0, 0.5]))
    target = th.tensor([1.0, 2.0, -1.0])
    return param, lambda: ((param - target) ** 2).sum()


def test_laprop_first_step_is_sign_of_gradient():
    # m_1 / (1 - beta1) = g / sqrt(g^2) = sign(g): the first update is lr * warm-up factor * sign(g).
    param, loss_fn = quadratic_problem()
    optimizer = LaProp([param], lr=0.1, warmup=4, agc=0.0)
    start = param.detach().clone()
    loss_fn().backward()
    grad_sign = param.grad.sign()
    optimizer.step()
    th.testing.assert_close(param.detach(), start - 0.1 * (1 / 4) * grad_sign)


def test_laprop_decreases_a_quadratic():
    param, loss_fn = quadratic_problem()
    optimizer = LaProp([param], lr=0.05, warmup=10)
    initial = loss_fn().item()
    for _ in range(200):
        optimizer.zero_grad()
        loss_fn().backward()
        optimizer.step()
    assert loss_fn().item() < 0.05 * initial


def test_laprop_state_dict_round_trip():
    param, loss_fn = quadratic_problem()
    optimizer = LaProp([param], lr=0.05, warmup=10)
    for _ in range(3):
        optimizer.zero_grad()
        loss_fn().backward()
        optimizer.step()
    state = optimizer.state_dict()
    assert all(isinstance(v, th.Tensor) and v.is_floating_point() for v in state["state"][0].values())

    clone, clone_loss_fn = quadratic_problem()
    with th.no_grad():
        clone.copy_(param)
    restored = LaProp([clone], lr=0.05, warmup=10)
    restored.load_state_dict(copy.deepcopy(state))  # as if through a file: no tensor shared with `optimizer`
    for _, opt, fn in ((param, optimizer, loss_fn), (clone, restored, clone_loss_fn)):
        opt.zero_grad()
        fn().backward()
        opt.step()
    th.testing.assert_close(clone, param, rtol=0, atol=0)
    assert_state_dicts_equal(restored.state_dict(), optimizer.state_dict())


@pytest.mark.parametrize("name", ["lr", "eps", "agc", "warmup"])
def test_laprop_rejects_negative_hyperparameters(name):
    with pytest.raises(ValueError, match="non-negative"):
        LaProp([th.nn.Parameter(th.zeros(1))], **{name: -1})


# ------------------------------------------------------------------------------------ policy pieces
@pytest.mark.parametrize("action_space", [spaces.Discrete(3), spaces.Box(-2.0, 2.0, shape=(2,))])
def test_policy_imagine_shapes(action_space):
    obs_space = spaces.Box(-1.0, 1.0, shape=(4,))
    policy = DreamerPolicy(obs_space, action_space, lambda _: 1e-3, **TINY_POLICY_KWARGS)
    deter, stoch = th.randn(5, DETER), th.zeros(5, STOCH_DIM)
    traj = policy.imagine(deter, stoch, horizon=3)
    action_dim = policy.action_dim
    assert traj.feat.shape == (5, 4, DETER + STOCH_DIM)
    assert traj.actions.shape == (5, 4, action_dim)
    assert traj.log_prob.shape == traj.entropy.shape == (5, 4)
    assert traj.log_prob.requires_grad and not traj.feat.requires_grad


@pytest.mark.parametrize("action_space", [spaces.Discrete(3), spaces.Box(-2.0, 2.0, shape=(2,))])
@pytest.mark.parametrize("chunk", [2, 5])
def test_policy_imagine_in_chunks_gives_the_same_trajectory(action_space, chunk):
    """imagine_chunk (imagination steps per imagine_steps call, raised by compile_steps) changes no
    value, including a last chunk shorter than the others (horizon 5 in chunks of 2)."""
    policy = DreamerPolicy(spaces.Box(-1.0, 1.0, shape=(4,)), action_space, lambda _: 1e-3, **TINY_POLICY_KWARGS)
    deter, stoch = th.randn(6, DETER), th.zeros(6, STOCH_DIM)
    trajectories = []
    for imagine_chunk in (1, chunk):
        policy.imagine_chunk = imagine_chunk
        th.manual_seed(0)
        trajectories.append(policy.imagine(deter, stoch, horizon=5))
    for x, y in zip(*trajectories):
        th.testing.assert_close(x, y, rtol=0, atol=0)


def test_dynamics_loss_gradients_reach_the_actor_and_the_critics_logits_only():
    # The actor's loss goes through the frozen dynamics and heads into the actor; the critic's logits
    # (for its own loss) are computed outside frozen(), so they carry the critic's gradient.
    policy = DreamerPolicy(spaces.Box(-1.0, 1.0, shape=(4,)), spaces.Box(-2.0, 2.0, shape=(2,)), lambda _: 1e-3, **TINY_POLICY_KWARGS)
    actor = policy.dynamics_loss(th.randn(5, DETER), th.zeros(5, STOCH_DIM), horizon=3, lam=0.95, entropy_coef=3e-4)
    actor.policy_loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.actor.parameters())
    assert all(p.grad is None for p in [*policy.world_model.parameters(), *policy.critic.parameters()])
    assert actor.value_logits.shape == (5, 4, policy.critic.bins.shape[0]) and not actor.feat.requires_grad
    actor.value_logits.sum().backward()
    assert all(p.grad is not None for p in policy.critic.parameters())


def test_critic_loss_is_the_sum_of_both_cross_entropies():
    critic = Critic(6, units=8, layers=1, num_bins=15)
    logits = th.randn(4, 3, 15)
    target, slow = th.randn(4, 3) * 5, th.randn(4, 3) * 5
    expected = critic.loss(logits, target) + 0.5 * critic.loss(logits, slow)
    th.testing.assert_close(critic_loss(critic, logits, target, slow, slow_reg=0.5), expected)
    log_p = th.log_softmax(logits, -1)
    dense = -((twohot(target, critic.bins) + 0.5 * twohot(slow, critic.bins)) * log_p).sum(-1)
    th.testing.assert_close(critic_loss(critic, logits, target, slow, slow_reg=0.5), dense)


def test_return_percentiles_ema():
    low, high = th.zeros(()), th.zeros(())
    returns = th.linspace(0.0, 100.0, 101)
    scale = update_return_percentiles(returns, low, high, decay=0.5)
    th.testing.assert_close(low, th.tensor(2.5))
    th.testing.assert_close(high, th.tensor(47.5))
    th.testing.assert_close(scale, th.tensor(45.0))
    # A narrow spread gives a scale of at least 1.
    low.zero_(), high.zero_()
    assert update_return_percentiles(th.zeros(10), low, high).item() == 1.0


def test_frozen_passes_gradients_through_but_not_into_the_modules():
    from sb3_dreamer.policies import frozen

    model, other = th.nn.Linear(3, 2), th.nn.Linear(3, 3)
    x = th.randn(4, 3, requires_grad=True)
    with frozen(model):
        y = model(other(x)).sum()
    assert all(p.requires_grad for p in model.parameters())  # restored on exit
    y.backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is not None for p in other.parameters())
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_sample_onehot_with_given_noise_is_gumbel_max():
    """With the noise given, the sample is exactly the one-hot of argmax(log p + noise), its gradient
    that of the probabilities; drawn noise is standard Gumbel (mean = Euler's constant)."""
    log_probs = th.log_softmax(th.randn(64, 5), -1).requires_grad_()
    noise = gumbel_noise((64, 5))
    sample = sample_onehot(log_probs, noise=noise)
    th.testing.assert_close(sample.detach(), th.nn.functional.one_hot((log_probs + noise).argmax(-1), 5).float())
    (sample * th.arange(5.0)).sum().backward()
    th.testing.assert_close(log_probs.grad, (log_probs.exp() * th.arange(5.0)).detach())  # d exp(log p) / d log p
    assert gumbel_noise((200_000,)).mean().item() == pytest.approx(0.5772, abs=0.01)


def test_discrete_observations_become_one_hots_and_bits():
    # [B=2, T=1] as replay stores them (float32); classes counted from the space's start.
    discrete = spaces.Discrete(3, start=-1)
    assert vector_size(discrete) == 3
    assert th.equal(vector_values(th.tensor([[-1.0], [1.0]]), discrete), th.tensor([[[1.0, 0, 0]], [[0, 0, 1.0]]]))
    multi = spaces.MultiDiscrete([2, 3], start=[0, 5])
    assert vector_size(multi) == 5
    assert th.equal(vector_values(th.tensor([[[1.0, 5.0]], [[0.0, 7.0]]]), multi),
                    th.tensor([[[0, 1.0, 1.0, 0, 0]], [[1.0, 0, 0, 0, 1.0]]]))  # fmt: skip
    bits = spaces.MultiBinary([2, 2])
    assert vector_size(bits) == 4
    assert th.equal(vector_values(th.tensor([[[[1.0, 0], [0, 1.0]]]]), bits), th.tensor([[[1.0, 0, 0, 1.0]]]))
    box = spaces.Box(-1, 1, (2, 3))
    assert vector_size(box) == 6 and vector_values(th.ones(4, 5, 2, 3), box).shape == (4, 5, 6)


# ------------------------------------------------------------------------------------ LaProp, beyond the first step
def test_laprop_second_step_by_hand():
    """Two steps with distinct gradients, written out: RMS scaling first, then momentum on the scaled
    update (LaProp), bias corrections of both averages and the linear warm-up (Adam's order, momentum
    on the raw gradient divided by the RMS after, gives other numbers here)."""
    import math

    lr, beta1, beta2, warmup = 0.1, 0.9, 0.999, 4
    start, g1, g2 = [1.0, -2.0, 0.5], [0.3, -4.0, 1.0], [-1.2, 0.5, 2.0]
    param = th.nn.Parameter(th.tensor(start))
    optimizer = LaProp([param], lr=lr, betas=(beta1, beta2), warmup=warmup, agc=0.0)
    for g in (g1, g2):
        param.grad = th.tensor(g)
        optimizer.step()
    expected = []
    for p, a, b in zip(start, g1, g2):
        v1 = (1 - beta2) * a * a
        u1 = a / math.sqrt(v1 / (1 - beta2))  # sign(a)
        m1 = (1 - beta1) * u1
        p -= lr * (1 / warmup) * m1 / (1 - beta1)
        v2 = beta2 * v1 + (1 - beta2) * b * b
        u2 = b / math.sqrt(v2 / (1 - beta2**2))
        m2 = beta1 * m1 + (1 - beta1) * u2
        p -= lr * (2 / warmup) * m2 / (1 - beta1**2)
        expected.append(p)
    th.testing.assert_close(param.detach(), th.tensor(expected), rtol=1e-6, atol=1e-6)


def agc_run(agc: float, grads: list[list[th.Tensor]]) -> list[th.Tensor]:
    """Parameters (one non-zero tensor, one all-zero) after LaProp steps with the given gradients."""
    params = [th.nn.Parameter(th.tensor([[3.0, -4.0], [0.0, 12.0]])), th.nn.Parameter(th.zeros(3))]
    optimizer = LaProp(params, lr=0.1, warmup=0, agc=agc, agc_pmin=1e-3)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        optimizer.step()
    return [p.detach() for p in params]


def test_laprop_adaptive_gradient_clipping():
    """AGC rescales each tensor's gradient to at most ``agc * max(|p|, pmin)`` in norm, the norms over
    the whole tensor (Frobenius), per tensor: a huge gradient steps as that gradient scaled to
    0.3 |p| does without clipping; a small one is left alone; and without AGC the steps differ."""
    huge = [th.tensor([[1e4, 2e4], [-3e4, 5e3]]), th.tensor([1e3, -2e3, 4e3])]
    small = [th.tensor([[1e-3, -2e-3], [3e-3, 1e-3]]), th.tensor([1e-5, 2e-5, -1e-5])]  # below 0.3 |p| after step 1
    # |p| = sqrt(9 + 16 + 0 + 144) = 13 for the first tensor, pmin = 1e-3 for the zero one.
    clipped = [g * (0.3 * n / g.norm()) for g, n in zip(huge, (13.0, 1e-3))]
    with_agc = agc_run(0.3, [huge, small])
    for x, y in zip(with_agc, agc_run(0.0, [clipped, small])):
        th.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)
    without = agc_run(0.0, [huge, small])
    assert not th.allclose(with_agc[0], without[0], rtol=0, atol=1e-4), "AGC changed nothing"


# ------------------------------------------------------------------------------------ symlog of vector observations
def test_vector_observations_are_symlog_scaled_for_the_encoder_and_the_decoder_target():
    """A Box key's prepared input (what the encoder sees) is ``sign(x) * log(1 + |x|)``, for a plain
    Box and for a Box key of a Dict, and the decoder's reconstruction target is that same symlog(obs)."""
    import math

    from sb3_dreamer.buffers import OBS_KEY
    from sb3_dreamer.networks.encoders import MultiEncoder

    values = [-1000.0, -2.0, -0.5, 0.0, 0.25, 3.0, 1e5]
    symlog = th.tensor([math.copysign(math.log1p(abs(x)), x) for x in values])
    obs = th.tensor(values).view(1, 1, 7)
    wm = make_world_model(obs_dim=7)
    th.testing.assert_close(wm.encoder.prepare(obs)[OBS_KEY], symlog.view(1, 1, 7))
    th.testing.assert_close(wm.embed(obs), wm.encoder({OBS_KEY: symlog.view(1, 1, 7)}))
    dict_space = spaces.Dict({"vec": spaces.Box(-th.inf, th.inf, (7,)), "other": spaces.Box(-1, 1, (2,))})
    encoder = MultiEncoder(dict_space, units=8, layers=1)
    th.testing.assert_close(encoder.prepare({"vec": obs, "other": th.zeros(1, 1, 2)})["vec"], symlog.view(1, 1, 7))
    # The decoder's target: rec_loss = sum over values of (prediction - symlog(obs))^2, averaged over steps.
    obs = th.tensor(values).repeat(2, 3, 1)
    out = wm.loss(obs, th.zeros(2, 3, 2), th.zeros(2, 3), th.tensor([[1.0, 0, 0]] * 2), th.zeros(2, 3), gamma=0.99)
    prediction = wm.decoder(th.cat([out.deter, out.stoch], -1))[OBS_KEY]
    th.testing.assert_close(out.metrics["rec_loss"], ((prediction - symlog) ** 2).sum(-1).mean())
