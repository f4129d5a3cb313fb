"""The losses of the recipe against hand-computed values: the world model's continue target and KL
stop-gradients, the actor's REINFORCE and dynamics objectives, the critic's imagined and replayed
value losses, and what one ``Dreamer.train`` update passes to them and does to the slow critic.

The heads a loss reads (``wm.reward``, ``wm.cont``, ``critic.value``, the critics' logits) are
patched to known tensors on a tiny policy, so each expected number below is written out by hand
(or by an independent formula in the test), never by calling the function under test.
"""

from __future__ import annotations

import math

import torch as th
from gymnasium import spaces
from stable_baselines3.common.vec_env import DummyVecEnv
from torch import nn

from sb3_dreamer.policies import DreamerPolicy
from sb3_dreamer.type_aliases import ActorLosses, Trajectory

from .helpers import TINY_POLICY_KWARGS, TINY_RSSM_KWARGS, counting_env, fixed_batch, make_model, make_world_model

S, K = TINY_RSSM_KWARGS["stoch"], TINY_RSSM_KWARGS["classes"]
DETER = TINY_RSSM_KWARGS["deter"]


class FixedOutput(nn.Module):
    """A head that ignores its input and returns the given tensor (a leaf, to read its gradient)."""

    def __init__(self, out: th.Tensor) -> None:
        super().__init__()
        self.out = out

    def forward(self, feat: th.Tensor) -> th.Tensor:
        return self.out


def tiny_policy(action_space: spaces.Space | None = None) -> DreamerPolicy:
    space = spaces.Box(-1.0, 1.0, shape=(3,))
    return DreamerPolicy(space, action_space or spaces.Discrete(2), lambda _: 1e-3, **TINY_POLICY_KWARGS)


def hand_twohot(x: float, bins: th.Tensor) -> th.Tensor:
    """Two-hot of a value inside the bins, written out: weight on the two neighbours, linear in x."""
    b = bins.double()
    k = int((b <= x).nonzero().max())
    out = th.zeros_like(b)
    if b[k] == x:
        out[k] = 1.0
        return out
    w = (x - b[k]) / (b[k + 1] - b[k])
    out[k], out[k + 1] = 1.0 - w, w
    return out


def cross_entropy(logits: th.Tensor, target: th.Tensor) -> th.Tensor:
    """-target . log_softmax(logits) over the last axis, in float64."""
    return -(target * th.log_softmax(logits.double(), -1)).sum(-1)


def one_hot_logits(index: int, num_bins: int, *lead: int) -> th.Tensor:
    """Logits whose softmax is exactly one-hot at ``index`` (exp(-1e4) underflows to 0)."""
    logits = th.full((*lead, num_bins), -1e4)
    logits[..., index] = 0.0
    return logits


# ------------------------------------------------------------------------------------ world model
def test_continue_target_is_not_terminal_times_gamma():
    """The continue head's target is ``(1 - is_terminal) * gamma`` (the discount learned into it),
    read exactly from the gradient of the BCE (``sigmoid(logit) - target``) and from its value."""
    wm = make_world_model()
    obs, prev_action, reward, is_first, is_terminal = fixed_batch(steps=5, terminals=((0, 2), (1, 4)), seed=1)
    logits = th.linspace(-2.0, 2.0, 10).view(2, 5, 1).requires_grad_()
    wm.cont_head = FixedOutput(logits)
    gamma = 0.9
    out = wm.loss(obs, prev_action, reward, is_first, is_terminal, gamma=gamma)
    out.loss.sum().backward()
    # By hand: 0.9 everywhere but the two terminal rows, where the target is 0.
    target = th.full((2, 5), 0.9)
    target[0, 2] = target[1, 4] = 0.0
    implied_target = th.sigmoid(logits.detach()).squeeze(-1) - logits.grad.squeeze(-1)
    th.testing.assert_close(implied_target, target, rtol=0, atol=1e-6)
    p = th.sigmoid(logits.detach().squeeze(-1).double())
    bce = -(target * th.log(p) + (1 - target) * th.log(1 - p))
    th.testing.assert_close(out.metrics["cont_loss"].double(), bce.mean(), rtol=1e-6, atol=1e-6)


def test_kl_stop_gradients_dynamics_into_the_prior_and_representation_into_the_posterior():
    """With free_bits 0: the dynamics KL ``KL(sg(post) || prior)`` trains only the prior and the
    representation KL ``KL(post || sg(prior))`` only the posterior, each with its own scale:
    d/d log q = -dyn_scale * p and d/d log p = rep_scale * p * (log p - log q + 1)."""
    wm = make_world_model(free_bits=0.0, dyn_scale=1.0, rep_scale=0.1)
    gen = th.Generator().manual_seed(2)
    obs, _, reward, _, is_terminal = fixed_batch(steps=5, terminals=((0, 2), (1, 4)), seed=1)
    post = th.log_softmax(th.randn(2, 5, S, K, generator=gen), -1).requires_grad_()
    prior = th.log_softmax(th.randn(2, 5, S, K, generator=gen), -1).requires_grad_()
    wm.rssm.prior_logits = lambda deter: prior  # the prior's log-probs as a leaf
    deter, stoch = th.randn(2, 5, DETER, generator=gen), th.randn(2, 5, S * K, generator=gen)
    loss, _ = wm.head_losses(deter, stoch, post, wm.encoder.prepare(obs), reward, is_terminal, 0.99)
    loss.sum().backward()
    p, log_p, log_q = post.detach().exp(), post.detach(), prior.detach()
    th.testing.assert_close(prior.grad, -1.0 * p, msg="the dynamics KL alone (scale 1.0) reaches the prior")
    th.testing.assert_close(
        post.grad, 0.1 * p * (log_p - log_q + 1.0), msg="the representation KL alone (scale 0.1) reaches the posterior"
    )


def collected_model(**kwargs):
    """A tiny Dreamer on CountingEnv truncated by a TimeLimit every 3 steps (is_last without
    is_terminal), 40 env steps collected and no update yet."""
    model = make_model(counting_env(max_episode_steps=3), learning_starts=1_000, seed=0, **kwargs)
    model.learn(40)
    assert model._n_updates == 0
    return model


def spy(obj, name: str, calls: list):
    """Wrap the method ``name`` of ``obj`` so that each call's arguments are appended to ``calls``."""
    method = getattr(obj, name)

    def wrapper(*args, **kwargs):
        calls.append((args, kwargs))
        return method(*args, **kwargs)

    setattr(obj, name, wrapper)


def test_train_passes_is_terminal_not_is_last_to_the_world_model():
    """A truncated episode (TimeLimit) ends with is_last but not is_terminal: the world model's
    continue target must see is_terminal, and the replay value loss both columns. One env
    terminates every 2 steps, the other is truncated every 3, so the batch holds both kinds of end."""
    env = DummyVecEnv([lambda: counting_env(terminate_at=2), lambda: counting_env(max_episode_steps=3)])
    model = make_model(env, learning_starts=1_000, seed=0, batch_size=8)
    model.learn(40)
    samples, wm_calls, replay_calls = [], [], []
    sample = model.replay_buffer.sample

    def recorded_sample(*args, **kwargs):
        samples.append(sample(*args, **kwargs))
        return samples[-1]

    model.replay_buffer.sample = recorded_sample
    spy(model.policy.world_model, "loss", wm_calls)
    spy(model.policy, "replay_value_loss", replay_calls)
    model.train(1)
    data = samples[-1]
    truncated = data.is_last.bool() & ~data.is_terminal.bool()
    assert data.is_terminal.sum() > 0 and truncated.sum() > 0  # both kinds of episode end
    ((args, kwargs),) = wm_calls
    is_terminal = kwargs.get("is_terminal", args[4] if len(args) > 4 else None)
    assert th.equal(is_terminal, data.is_terminal), "the world model must be trained on is_terminal, not is_last"
    ((args, kwargs),) = replay_calls
    assert th.equal(args[3], data.is_terminal) and th.equal(args[4], data.is_last)


def test_one_update_moves_the_slow_critic_by_critic_ema_rate():
    """After one update: slow = slow_before + rate * (critic_after - slow_before), every parameter."""
    model = collected_model(critic_ema_rate=0.25)
    policy = model.policy
    slow_before = [p.detach().clone() for p in policy.critic_slow.parameters()]
    critic_before = [p.detach().clone() for p in policy.critic.parameters()]
    for s, c in zip(slow_before, critic_before):
        assert th.equal(s, c)  # a copy at construction
    model.train(1)
    critic_after = [p.detach() for p in policy.critic.parameters()]
    assert any(not th.equal(a, b) for a, b in zip(critic_after, critic_before)), "the critic did not move"
    for s0, c1, s1 in zip(slow_before, critic_after, policy.critic_slow.parameters()):
        th.testing.assert_close(s1.detach(), s0 + 0.25 * (c1 - s0), rtol=0, atol=1e-7)


# ------------------------------------------------------------------------------------ actor
# Two imagined trajectories of H = 2 steps (index 0 is the start state), lambda 0.5.
LAM = 0.5
REWARD = th.tensor([[0.0, 1.0, 2.0], [0.0, -3.0, 5.0]])
CONT = th.tensor([[1.0, 0.5, 0.8], [0.9, 1.0, 0.0]])
VALUE = th.tensor([[0.5, 2.0, 4.0], [1.0, -1.0, 6.0]])
# R_t = r_{t+1} + c_{t+1} * ((1 - lam) * v_{t+1} + lam * R_{t+1}), R_H = v_H:
#   row 0: R_1 = 2 + 0.8 * 4 = 5.2;   R_0 = 1 + 0.5 * (0.5 * 2 + 0.5 * 5.2) = 2.8
#   row 1: R_1 = 5 + 0 * 6 = 5;       R_0 = -3 + 1.0 * (0.5 * -1 + 0.5 * 5) = -1
RETURNS = th.tensor([[2.8, 5.2], [-1.0, 5.0]])
# cumprod(cont) without its last entry: the probability of still being in the episode.
WEIGHT = th.tensor([[1.0, 0.5], [0.9, 0.9]])
# Returns sorted [-1, 2.8, 5, 5.2]: P5 = -1 + 0.15 * 3.8 = -0.43, P95 = 5 + 0.85 * 0.2 = 5.17. From
# low = -10, high = 10 the EMA (decay 0.99) gives high - low = 19.8 + 0.01 * 5.6 = 19.856.
SCALE = 19.856


def patched_policy(action_space: spaces.Space | None = None) -> DreamerPolicy:
    """A tiny policy whose reward, continue and value heads return REWARD, CONT and VALUE, and whose
    return percentiles start at -10 and 10 (so the scale max(1, P95 - P5) is far from 1)."""
    policy = tiny_policy(action_space)
    policy.world_model.reward = lambda feat: REWARD.clone()
    policy.world_model.cont = lambda feat: CONT.clone()
    policy.critic.value = lambda logits: VALUE.clone()
    policy.return_low.fill_(-10.0)
    policy.return_high.fill_(10.0)
    return policy


def test_return_scale_constants_match_torch_quantile():
    """The hand-computed percentiles behind SCALE, checked with torch.quantile."""
    q = th.quantile(RETURNS.flatten(), th.tensor([0.05, 0.95]))
    th.testing.assert_close(q, th.tensor([-0.43, 5.17]))
    assert math.isclose((0.99 * 10.0 + 0.01 * float(q[1])) - (-0.99 * 10.0 + 0.01 * float(q[0])), SCALE, rel_tol=1e-6)


def test_reinforce_loss_against_hand_computed_values():
    """REINFORCE: ``-cumprod(cont) * (logpi * (R - v) / max(1, P95 - P5) + eta * H)``, averaged; the
    advantage is returns minus values (not the reverse) and is divided by the EMA return scale."""
    policy = patched_policy()
    # The heads' outputs as leaves: REINFORCE's returns, advantage and weight are constants, so none gets a gradient.
    heads = {name: t.clone().requires_grad_() for name, t in (("reward", REWARD), ("cont", CONT), ("value", VALUE))}
    policy.world_model.reward = lambda feat: heads["reward"] * 1.0
    policy.world_model.cont = lambda feat: heads["cont"] * 1.0
    policy.critic.value = lambda logits: heads["value"] * 1.0
    feat = th.randn(2, 3, policy.world_model.rssm.feat_dim)
    log_prob = th.tensor([[-0.2, -1.5, -0.7], [-2.0, -0.1, -0.4]], requires_grad=True)
    entropy = th.tensor([[0.6, 0.3, 0.2], [0.5, 0.4, 0.1]], requires_grad=True)
    traj = Trajectory(feat, th.zeros(2, 3, 2), log_prob, entropy)
    eta = 0.01
    out = policy.reinforce_loss(traj, LAM, eta)
    th.testing.assert_close(out.returns, RETURNS)
    th.testing.assert_close(out.weight, WEIGHT)
    th.testing.assert_close(out.scale, th.tensor(SCALE))
    th.testing.assert_close(policy.return_low, th.tensor(-9.9043))
    th.testing.assert_close(policy.return_high, th.tensor(9.9517))
    advantage = th.tensor([[2.8 - 0.5, 5.2 - 2.0], [-1.0 - 1.0, 5.0 + 1.0]]) / SCALE  # R - v, scaled
    expected = -(WEIGHT * (log_prob.detach()[:, :-1] * advantage + eta * entropy.detach()[:, :-1])).mean()
    th.testing.assert_close(out.policy_loss, expected)
    out.policy_loss.backward()
    expected_grad = th.zeros(2, 3)
    expected_grad[:, :-1] = -WEIGHT * advantage / 4
    th.testing.assert_close(log_prob.grad, expected_grad, msg="advantage (R - v) / scale, weighted by cumprod(cont)")
    expected_grad[:, :-1] = -WEIGHT * eta / 4
    th.testing.assert_close(entropy.grad, expected_grad)
    assert all(h.grad is None for h in heads.values()), "sg(R - v) and sg(cumprod(cont)): no gradient into the heads"


def test_dynamics_objective_against_hand_computed_values():
    """Through the dynamics: ``-cumprod(cont) * (R / scale + eta * H)``, averaged, its gradient
    reaching the rewards through the lambda-returns: dR_0/dr_1 = 1, dR_0/dr_2 = lam * c_1, dR_1/dr_2 = 1."""
    policy = patched_policy(spaces.Box(-1.0, 1.0, shape=(2,)))
    reward = REWARD.clone().requires_grad_()
    policy.world_model.reward = lambda feat: reward
    entropy = th.tensor([[0.6, 0.3, 0.2], [0.5, 0.4, 0.1]])
    traj = Trajectory(th.randn(2, 3, policy.world_model.rssm.feat_dim), th.zeros(2, 3, 2), th.zeros(2, 3), entropy)
    eta = 0.01
    out = policy.dynamics_objective(traj, LAM, eta)
    th.testing.assert_close(out.returns, RETURNS)
    th.testing.assert_close(out.weight, WEIGHT)
    th.testing.assert_close(out.scale, th.tensor(SCALE))
    expected = -(WEIGHT * (RETURNS / SCALE + eta * entropy[:, :-1])).mean()
    th.testing.assert_close(out.policy_loss, expected)
    out.policy_loss.backward()
    w, c = WEIGHT, CONT
    expected_grad = th.stack([th.zeros(2), -w[:, 0] / (4 * SCALE), -(w[:, 0] * LAM * c[:, 1] + w[:, 1]) / (4 * SCALE)], 1)
    th.testing.assert_close(reward.grad, expected_grad)


def test_dynamics_objective_takes_no_gradient_through_the_continue_head():
    """The continue probabilities discount the returns as constants: a gradient through them pushed the actor
    away from episode ends wherever the (untrained) values past an imagined end were positive."""
    policy = patched_policy(spaces.Box(-1.0, 1.0, shape=(2,)))
    cont = CONT.clone().requires_grad_()
    reward = REWARD.clone().requires_grad_()
    policy.world_model.cont, policy.world_model.reward = (lambda feat: cont), (lambda feat: reward)
    traj = Trajectory(th.randn(2, 3, policy.world_model.rssm.feat_dim), th.zeros(2, 3, 2), th.zeros(2, 3), th.zeros(2, 3))
    out = policy.dynamics_objective(traj, LAM, 0.01)
    out.policy_loss.backward()
    assert cont.grad is None and reward.grad is not None
    th.testing.assert_close(out.returns, RETURNS)  # the same returns as before


# ------------------------------------------------------------------------------------ critic
def test_critic_value_loss_against_hand_computed_values():
    """Imagined critic loss: ``cumprod(cont) * (CE(logits, twohot(R)) + CE(logits, twohot(slow value)))``,
    averaged, the slow critic's value at the same features."""
    policy = tiny_policy()
    bins = policy.critic.bins
    slow_index = 140
    policy.critic_slow.forward = lambda feat: one_hot_logits(slow_index, bins.shape[0], 2, 3)  # value bins[140]
    gen = th.Generator().manual_seed(3)
    value_logits = th.randn(2, 3, bins.shape[0], generator=gen)
    actor = ActorLosses(
        th.zeros(()), th.randn(2, 3, policy.world_model.rssm.feat_dim), value_logits, RETURNS, WEIGHT,
        th.tensor(1.0), REWARD, CONT, th.zeros(2, 3),
    )  # fmt: skip
    loss = policy.critic_value_loss(actor)
    slow = th.zeros(bins.shape[0], dtype=th.float64)
    slow[slow_index] = 1.0
    per_step = th.stack(
        [
            th.stack([cross_entropy(value_logits[n, t], hand_twohot(float(RETURNS[n, t]), bins) + slow) for t in range(2)])
            for n in range(2)
        ]
    )
    th.testing.assert_close(loss.double(), (WEIGHT.double() * per_step).mean(), rtol=1e-5, atol=1e-5)


def test_replay_value_loss_discounts_at_terminals_and_cuts_lambda_at_last():
    """Replay value loss: lambda-returns of the replayed rewards with discount ``(1 - is_terminal) * gamma``,
    the lambda recursion cut at is_last (bootstrapping from the value there), bootstrapped by the
    imagined returns; steps that end an episode (is_last) get no loss."""
    policy = tiny_policy()
    bins = policy.critic.bins
    gen = th.Generator().manual_seed(4)
    logits = th.randn(2, 5, bins.shape[0], generator=gen)
    policy.critic.forward = lambda feat: logits
    slow_index = 120
    policy.critic_slow.forward = lambda feat: one_hot_logits(slow_index, bins.shape[0], 2, 5)
    gamma, lam = 0.9, 0.5
    rewards = th.tensor([[0.0, 1.0, 2.0, 0.0, 3.0]] * 2)
    # Row 0: truncated (TimeLimit) at t=2; row 1: terminated at t=2. A new episode starts at t=3.
    is_last = th.tensor([[0.0, 0.0, 1.0, 0.0, 0.0]] * 2)
    is_terminal = th.tensor([[0.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0, 0.0]])
    boot = th.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]] * 2)  # the imagined returns at each start state
    actor = ActorLosses(
        th.zeros(()), th.zeros(10, 2, 1), None, th.stack([boot.flatten(), th.zeros(10)], 1), th.ones(10, 1),  # type: ignore[arg-type]
        th.tensor(1.0), th.zeros(10, 2), th.ones(10, 2), th.zeros(10, 2),
    )  # fmt: skip
    loss = policy.replay_value_loss(actor, th.zeros(2, 5, 1), rewards, is_terminal, is_last, None, gamma, lam)
    # R_t = r_{t+1} + d_{t+1} * ((1 - l_{t+1}) * v_{t+1} + l_{t+1} * R_{t+1}), d = (1 - terminal) * gamma,
    # l = lam * (1 - last), R_4 = v_4 = 5:
    #   R_3 = 3 + 0.9 * 5 = 7.5;   R_2 = 0 + 0.9 * (0.5 * 4 + 0.5 * 7.5) = 5.175
    #   R_1 = 2 + d_2 * v_2: row 0 (truncated) 2 + 0.9 * 3 = 4.7, row 1 (terminal) 2 + 0 = 2
    #   R_0 = 1 + 0.9 * (0.5 * 2 + 0.5 * R_1): row 0 4.015, row 1 2.8
    returns = [[4.015, 4.7, 5.175, 7.5], [2.8, 2.0, 5.175, 7.5]]
    keep = [1.0, 1.0, 0.0, 1.0]  # no loss at the last step of an episode (its target would cross it)
    slow = th.zeros(bins.shape[0], dtype=th.float64)
    slow[slow_index] = 1.0
    total = sum(
        keep[t] * cross_entropy(logits[n, t], hand_twohot(returns[n][t], bins) + slow) for n in range(2) for t in range(4)
    )
    th.testing.assert_close(loss.double(), total / 8, rtol=1e-5, atol=1e-5)
