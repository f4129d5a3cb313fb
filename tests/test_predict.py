"""predict(): shapes, spaces, the carried latent state (mirrors SB3's test_predict and RecurrentPPO's state checks)."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from gymnasium import spaces
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.evaluation import evaluate_policy

from .helpers import TINY_POLICY_KWARGS, SpaceEnv, make_model, time_limited

ENV_IDS = ["CartPole-v1", "Pendulum-v1"]


@pytest.fixture(scope="module", params=ENV_IDS)
def env_id(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def model(env_id):
    """An untrained tiny model per env (predict never changes it)."""
    return make_model(env_id, seed=0)


def test_predict_single_observation(model, env_id):
    env = gym.make(env_id)
    obs, _ = env.reset(seed=0)
    for deterministic in (True, False):
        action, state = model.predict(obs, deterministic=deterministic)
        assert action.shape == env.action_space.shape
        assert env.action_space.contains(action)
        env.step(action)
    deter, stoch, last_action = state
    assert deter.shape == (1, TINY_POLICY_KWARGS["deter"])
    assert stoch.shape == (1, TINY_POLICY_KWARGS["stoch"] * TINY_POLICY_KWARGS["classes"])
    assert last_action.shape == (1, model.policy.action_dim)
    assert all(x.dtype == np.float32 for x in state)


def test_predict_batch(model, env_id):
    env = make_vec_env(env_id, n_envs=2)
    obs = env.reset()
    action, state = model.predict(obs)
    assert action.shape[0] == 2
    assert all(x.shape[0] == 2 for x in state)
    env.step(action)


def test_predict_wrong_observation_shape_raises(model):
    with pytest.raises(ValueError, match="Unexpected observation shape"):
        model.predict(np.zeros((5, 7), dtype=np.float32))


def test_predict_gym_reset_tuple_message(model, env_id):
    env = gym.make(env_id)
    with pytest.raises(ValueError, match="mixing Gym API"):
        model.predict(env.reset())


def test_predict_wrong_state_raises(model):
    obs = model.observation_space.sample()[None]
    _, state = model.predict(obs)
    with pytest.raises(ValueError, match="deter, stoch, last_action"):
        model.predict(np.concatenate([obs, obs]), state=state)  # state for 1 env, 2 observations
    with pytest.raises(ValueError, match="deter, stoch, last_action"):
        model.predict(obs, state=state[:2])
    with pytest.raises(ValueError, match="episode_start"):
        model.predict(obs, state=state, episode_start=np.array([True, False]))


def test_state_none_equals_zero_state(model):
    obs = model.observation_space.sample()[None]
    zeros = tuple(np.zeros_like(x) for x in model.predict(obs)[1])
    action_none, state_none = model.predict(obs, state=None, deterministic=True)
    action_zero, state_zero = model.predict(obs, state=zeros, deterministic=True)
    np.testing.assert_array_equal(action_none, action_zero)
    for x, y in zip(state_none, state_zero):
        np.testing.assert_array_equal(x, y)


def test_state_is_carried(model):
    obs = model.observation_space.sample()[None]
    _, fresh = model.predict(obs, deterministic=True)
    _, carried = model.predict(obs, state=fresh, deterministic=True)
    assert not np.allclose(carried[0], fresh[0])  # the history changes the deterministic state
    # The state's last entry is the (normalised) executed action.
    action, state = model.predict(obs, state=fresh, deterministic=True)
    np.testing.assert_array_equal(action, model.policy.to_env_action(state[2]))  # obs is batched: so is action


def test_predict_steps_the_latent_with_the_previous_action(model):
    """Deterministic predict along a sequence is the RSSM's posterior step fed the previous step's
    action (zeros at the episode's start), then the actor's mode: checked against that loop."""
    rng = np.random.default_rng(0)
    observations = [model.observation_space.sample()[None] * rng.uniform(0.5, 1.0) for _ in range(4)]
    state, executed = None, []
    for i, obs in enumerate(observations):
        _, state = model.predict(obs.astype(np.float32), state=state, episode_start=np.array([i == 0]), deterministic=True)
        executed.append(state[2])
    policy = model.policy
    rssm, actor = policy.world_model.rssm, policy.actor
    with th.no_grad():
        deter, stoch = rssm.initial(1, policy.device)
        prev_action = th.zeros(1, policy.action_dim)
        for i, obs in enumerate(observations):
            embed = rssm.embed_projection(policy.world_model.embed(policy.obs_to_tensor(obs.astype(np.float32))[0]))
            deter, stoch, _ = rssm.obs_step(deter, stoch, prev_action, embed, th.tensor([float(i == 0)]), deterministic=True)
            prev_action = actor(th.cat([deter, stoch], -1)).mode()
            np.testing.assert_allclose(prev_action.numpy(), executed[i], atol=1e-6)
    np.testing.assert_allclose(deter.numpy(), state[0], atol=1e-5)
    np.testing.assert_array_equal(stoch.numpy(), state[1])


def test_episode_start_equals_fresh_state(model):
    obs = model.observation_space.sample()[None]
    _, state = model.predict(obs)
    _, state = model.predict(obs, state=state)  # some history
    action_reset, state_reset = model.predict(obs, state=state, episode_start=np.array([True]), deterministic=True)
    action_fresh, state_fresh = model.predict(obs, deterministic=True)
    np.testing.assert_array_equal(action_reset, action_fresh)
    for x, y in zip(state_reset, state_fresh):
        np.testing.assert_array_equal(x, y)
    # One unbatched observation takes a plain bool, as RecurrentPPO's predict does.
    action_bool, state_bool = model.predict(obs[0], state=state, episode_start=True, deterministic=True)
    np.testing.assert_array_equal(action_bool, action_fresh[0])
    for x, y in zip(state_bool, state_fresh):
        np.testing.assert_array_equal(x, y)


def test_episode_start_resets_per_env(model):
    obs = np.stack([model.observation_space.sample()] * 2)
    _, state = model.predict(obs)
    _, state = model.predict(obs, state=state)
    _, state = model.predict(obs, state=state, episode_start=np.array([True, False]), deterministic=True)
    _, fresh = model.predict(obs[:1], deterministic=True)
    # equal up to float rounding: a batch of two and a batch of one may take different matmul kernels
    np.testing.assert_allclose(state[0][0], fresh[0][0], rtol=1e-5, atol=1e-6)
    assert not np.allclose(state[0][1], fresh[0][0])


def test_deterministic_predict_is_deterministic(model):
    obs = model.observation_space.sample()[None]
    _, state = model.predict(obs)
    first = model.predict(obs, state=state, deterministic=True)
    second = model.predict(obs, state=state, deterministic=True)
    np.testing.assert_array_equal(first[0], second[0])
    for x, y in zip(first[1], second[1]):
        np.testing.assert_array_equal(x, y)


def test_evaluate_policy(model, env_id):
    env = make_vec_env(time_limited(env_id, 30), n_envs=2)
    mean_reward, std_reward = evaluate_policy(model, env, n_eval_episodes=2, warn=False)
    assert np.isfinite(mean_reward) and np.isfinite(std_reward)
    rewards, lengths = evaluate_policy(model, env, n_eval_episodes=2, warn=False, return_episode_rewards=True)
    assert len(rewards) == len(lengths) == 2 and all(0 < length <= 30 for length in lengths)


def test_to_env_action_maps_the_normalised_range_onto_the_bounds():
    action_space = spaces.Box(np.array([0.0, -5.0], np.float32), np.array([1.0, 3.0], np.float32))
    model = make_model(SpaceEnv(spaces.Box(-1.0, 1.0, shape=(3,)), action_space))
    normalised = np.array([[-1.0, -1.0], [1.0, 1.0], [0.0, 0.0], [7.0, -7.0]], np.float32)
    expected = np.array([[0.0, -5.0], [1.0, 3.0], [0.5, -1.0], [1.0, -5.0]], np.float32)  # out of range: clipped
    np.testing.assert_allclose(model.policy.to_env_action(normalised), expected)


def test_to_env_action_rounds_onto_an_integer_box():
    """An integer Box takes the nearest integer of the scaled action (a cast would truncate)."""
    action_space = spaces.Box(0, 3, shape=(1,), dtype=np.int64)
    model = make_model(SpaceEnv(spaces.Box(-1.0, 1.0, shape=(3,)), action_space))
    normalised = np.array([[-1.0], [-0.4], [0.3], [0.9], [1.0]], np.float32)  # scaled: 0, 0.9, 1.95, 2.85, 3
    got = model.policy.to_env_action(normalised)
    np.testing.assert_array_equal(got, [[0], [1], [2], [3], [3]])
    assert got.dtype == np.int64


def test_to_env_action_stays_inside_bounds_float32_rounds_past():
    """low + (high - low) rounds one float32 step past high for some bounds (2.3077025 here): clipped back,
    since the env refuses an action outside its space."""
    action_space = spaces.Box(np.float32(-2.326449), np.float32(2.3077023), shape=(1,), dtype=np.float32)
    model = make_model(SpaceEnv(spaces.Box(-1.0, 1.0, shape=(3,)), action_space))
    got = model.policy.to_env_action(np.array([[-1.0], [1.0], [1.2009691]], np.float32))
    assert all(action_space.contains(action) for action in got), got
    np.testing.assert_array_equal(got[1:], [[np.float32(2.3077023)]] * 2)


def test_policy_refuses_an_unbounded_box_action_space():
    """Built without Dreamer (which checks the spaces first), the policy checks its action space itself."""
    from sb3_dreamer.policies import MlpLatentPolicy

    box = spaces.Box(-np.inf, np.inf, shape=(2,), dtype=np.float32)
    with pytest.raises(ValueError, match="finite bounds"):
        MlpLatentPolicy(spaces.Box(-1.0, 1.0, shape=(3,)), box, lambda _: 1e-4, **TINY_POLICY_KWARGS)


def test_to_env_action_discrete_is_argmax():
    model = make_model("CartPole-v1")
    np.testing.assert_array_equal(model.policy.to_env_action(np.array([[1.0, 0.0], [0.0, 1.0]])), [0, 1])


def test_set_training_mode_reaches_every_submodule(model):
    """predict switches every submodule to eval mode, and set_training_mode(True) (which train()
    calls) switches them all back (the switch is skipped only when the policy is already in that mode)."""
    policy = model.policy
    obs = model.get_env().reset()
    policy.set_training_mode(True)
    policy.predict(obs)
    assert not any(m.training for m in policy.modules())
    policy.set_training_mode(True)
    assert all(m.training for m in policy.modules())
