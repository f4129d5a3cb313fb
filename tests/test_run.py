"""Smoke runs and SB3 algorithm checks (mirrors sb3-contrib's test_run and SB3's tensorboard/determinism tests)."""

from __future__ import annotations

import re

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from gymnasium import spaces
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.envs import (
    FakeImageEnv,
    SimpleMultiObsEnv,
)
from stable_baselines3.common.vec_env import SubprocVecEnv, VecNormalize

from sb3_dreamer import Dreamer

from .helpers import TINY_KWARGS, TINY_POLICY_KWARGS, SpaceEnv, make_model, time_limited

VECTOR_OBS = spaces.Box(-1.0, 1.0, shape=(3,), dtype=np.float32)


@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1"])
def test_smoke_learn(env_id):
    model = make_model(env_id, seed=0)
    model.learn(100)
    assert model.num_timesteps == 100
    assert model._n_updates > 0
    # train_ratio / (batch_size * sequence_length) = 4 / (2 * 8) updates per env step after learning_starts (50).
    assert (model.train_ratio, model.batch_size, model.sequence_length, model.learning_starts) == (4, 2, 8, 50)
    assert abs(model._n_updates - 50 * 4 / 16) <= 1


@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1"])
@pytest.mark.parametrize("actor_gradient", ["reinforce", "dynamics"])
@pytest.mark.parametrize("imagination_starts", [None, 5])
def test_actor_gradient_and_imagination_starts(env_id, actor_gradient, imagination_starts):
    model = make_model(env_id, seed=0, actor_gradient=actor_gradient, imagination_starts=imagination_starts)
    actor_before = [p.detach().clone() for p in model.policy.actor.parameters()]
    n_starts = []  # the start states each imagination is given
    for name in ("imagine", "dynamics_loss"):
        original = getattr(model.policy, name)
        setattr(model.policy, name, lambda deter, *a, _f=original, **k: n_starts.append(len(deter)) or _f(deter, *a, **k))
    model.learn(100)
    assert n_starts and set(n_starts) == {imagination_starts or model.batch_size * model.sequence_length}
    assert model.backprop_actor == (actor_gradient == "dynamics")
    assert all(np.isfinite(p.detach().numpy()).all() for p in model.policy.parameters())
    assert any(not th.equal(a, b) for a, b in zip(actor_before, model.policy.actor.parameters()))


def test_actor_gradient_auto_follows_the_action_space():
    assert make_model("Pendulum-v1").backprop_actor
    assert not make_model("CartPole-v1").backprop_actor
    with pytest.raises(ValueError, match="actor_gradient"):
        make_model("CartPole-v1", actor_gradient="backprop")


def test_smoke_learn_matrix_spaces():
    # A 2-D observation and a 2x2 action box with asymmetric bounds: both are flattened for the world model.
    action_space = spaces.Box(np.array([[0, -5], [1, 2]], np.float32), np.array([[1, 5], [3, 4]], np.float32))
    env = SpaceEnv(spaces.Box(-1.0, 1.0, shape=(2, 3), dtype=np.float64), action_space)
    model = make_model(env, learning_starts=20)
    model.learn(40)
    assert model._n_updates > 0 and model.replay_buffer.actions.shape[-1] == 4
    action, _ = model.predict(env.observation_space.sample())
    assert action.shape == (2, 2) and action_space.contains(action)


@pytest.mark.parametrize(
    "action_space",
    [spaces.Discrete(3, start=-1), spaces.MultiDiscrete([2, 3]), spaces.MultiDiscrete([4, 4, 4]), spaces.MultiBinary(3)],
    ids=["discrete-start", "multidiscrete", "multidiscrete-equal", "multibinary"],
)
def test_smoke_learn_discrete_action_kinds(action_space):
    env = SpaceEnv(VECTOR_OBS, action_space)
    model = make_model(env, learning_starts=20, seed=0)
    model.learn(50)
    assert model._n_updates > 0 and not model.backprop_actor
    assert model.replay_buffer.actions.shape[-1] == model.policy.action_dim
    for deterministic in (False, True):
        action, _ = model.predict(VECTOR_OBS.sample(), deterministic=deterministic)
        assert action_space.contains(action), (action, action_space)
    actions, _ = model.predict(np.stack([VECTOR_OBS.sample() for _ in range(4)]))
    assert all(action_space.contains(a) for a in actions)


@pytest.mark.parametrize(
    "observation_space",
    [
        spaces.Discrete(4, start=1),
        spaces.MultiDiscrete([2, 3]),
        spaces.MultiBinary(3),
        spaces.Dict({"v": VECTOR_OBS, "cell": spaces.Discrete(4), "bits": spaces.MultiBinary(2)}),
    ],
    ids=["discrete", "multidiscrete", "multibinary", "dict-mixed"],
)
def test_smoke_learn_discrete_observation_kinds(observation_space):
    # As SB3's algorithms take them (FrozenLake, Taxi, the identity envs): one-hots and bits for the model.
    env = SpaceEnv(observation_space, spaces.Discrete(2))
    policy = "MultiInputLatentPolicy" if isinstance(observation_space, spaces.Dict) else "MlpLatentPolicy"
    model = Dreamer(policy, env, policy_kwargs=TINY_POLICY_KWARGS, **{**TINY_KWARGS, "learning_starts": 20, "seed": 0})
    model.learn(50)
    assert model._n_updates > 0
    observation_space.seed(0)
    obs = [observation_space.sample() for _ in range(6)]
    action, state = model.predict(obs[0], deterministic=True)
    assert env.action_space.contains(int(action))
    stacked = {k: np.stack([o[k] for o in obs]) for k in obs[0]} if isinstance(obs[0], dict) else np.stack(obs)
    dream = model.policy.dream(stacked, np.zeros((6, model.policy.action_dim), np.float32), context=2)
    for key, space in (observation_space.spaces.items() if isinstance(obs[0], dict) else [(None, observation_space)]):
        predicted = dream.observations[key] if key is not None else dream.observations
        assert predicted.shape == (1, 4, *space.shape)
        assert all(space.contains(p.astype(space.dtype)) for p in predicted[0]), (key, predicted)


def test_smoke_learn_progress_bar():
    model = make_model("Pendulum-v1", learning_starts=20).learn(40, progress_bar=True)
    assert model.num_timesteps == 40 and model._n_updates > 0


def test_actions_are_uniformly_random_before_learning_starts():
    """The first learning_starts env steps act with random_action, as SB3's off-policy algorithms
    sample the action space; after them, the actor acts."""
    model = make_model(make_vec_env("CartPole-v1", n_envs=2, seed=0), learning_starts=300, seed=0)
    calls, random_action = [], model.policy.random_action
    model.policy.random_action = lambda n: calls.append(model.num_timesteps) or random_action(n)
    model.learn(320)
    assert calls == list(range(0, 300, 2))  # one call per step of the 2 envs, until 300 env steps
    actions = model.replay_buffer.actions[:150].reshape(-1, 2)  # one-hot rows, final-observation rows all zeros
    taken = actions[actions.sum(-1) == 1].argmax(-1)
    assert 0.4 < taken.mean() < 0.6  # both actions, about equally often


def test_multi_env_dummy_vec_env():
    env = make_vec_env(time_limited("CartPole-v1", 20), n_envs=2, seed=0)
    model = make_model(env, seed=0)
    model.learn(150)
    assert model.num_timesteps == 150 and model._n_updates > 0
    assert model.replay_buffer.n_envs == 2
    # Columns advance independently: each holds its env's steps plus its final-observation rows.
    assert (model.replay_buffer.count >= 75).all()


def test_multi_env_subproc_vec_env():
    env = make_vec_env("Pendulum-v1", n_envs=2, vec_env_cls=SubprocVecEnv)
    try:
        model = make_model(env, learning_starts=20).learn(60)
    finally:
        env.close()
    assert model.num_timesteps == 60 and model._n_updates > 0
    assert model.replay_buffer.count.tolist() == [30, 30]  # 30 steps per env, no episode ended (200-step limit)


@pytest.mark.parametrize("stats_window_size", [1, 42])
def test_stats_window_size(stats_window_size):
    model = make_model("CartPole-v1", stats_window_size=stats_window_size, learning_starts=10_000)
    model.learn(10)
    assert model.ep_info_buffer.maxlen == stats_window_size
    assert model.ep_success_buffer.maxlen == stats_window_size


def test_learn_continues_num_timesteps():
    model = make_model("CartPole-v1", learning_starts=10_000)
    model.learn(30)
    model.learn(20, reset_num_timesteps=False)
    assert model.num_timesteps == 50
    model.learn(10)
    assert model.num_timesteps == 10


def test_logged_replay_ratio_is_that_of_the_learn_call():
    """train/replay_ratio is the realised ratio of the current learn(), also when num_timesteps restarts
    at 0 on a model that has already updated (the zoo's -i, a second learn())."""
    model = make_model("CartPole-v1", learning_starts=20, train_ratio=16, seed=0)  # one update per env step
    logged = []
    for _ in range(2):
        model.learn(60, log_interval=None)  # no dump: the logger keeps the last recorded values
        logged.append(model.logger.name_to_value.get("train/replay_ratio"))
    assert model._n_updates == 82  # 41 per learn(): at env steps 20 (learning_starts) to 60
    assert logged == [pytest.approx(16.0), pytest.approx(16.0)]  # updates x B x T / the 41 env steps that earned them


def test_train_takes_sacs_batch_size(monkeypatch):
    """SAC's train(gradient_steps, batch_size): extra updates on other batches (e.g. a loaded replay), counted
    in train/replay_ratio as the steps they replayed."""
    model = make_model("CartPole-v1", learning_starts=20, train_ratio=16, seed=0)
    model.learn(40, log_interval=None)
    sampled = []
    sample = model.replay_buffer.sample
    monkeypatch.setattr(model.replay_buffer, "sample", lambda n, *args, **kwargs: (sampled.append(n), sample(n, *args, **kwargs))[1])
    updates, credited = model._n_updates, model._credited_env_steps
    model.train(gradient_steps=2, batch_size=5)
    model.train(gradient_steps=1)
    assert sampled == [5, 5, model.batch_size] and model._n_updates == updates + 3
    replayed = updates * model.batch_size * model.sequence_length + (2 * 5 + model.batch_size) * model.sequence_length
    assert model.logger.name_to_value["train/replay_ratio"] == pytest.approx(replayed / credited)


@pytest.mark.parametrize("n_envs, learning_starts", [(4, 0), (3, 12)])
def test_logged_replay_ratio_is_train_ratio(n_envs, learning_starts):
    """Counted over the env steps that earned updates: not those before a batch could be sampled (sequence_length
    steps of each column after learning_starts), which made it read 10.4 for 16 with 16 envs."""
    model = make_model(make_vec_env("CartPole-v1", n_envs=n_envs, seed=0), learning_starts=learning_starts, train_ratio=16)
    model.learn(120, log_interval=None)
    assert model.logger.name_to_value["train/replay_ratio"] == pytest.approx(16.0)


def test_logged_losses_are_the_mean_of_the_calls_updates(monkeypatch):
    """As SAC logs its gradient steps' mean; the metrics train_step returns may be overwritten by the next update
    (a CUDA graph's static outputs), so they are summed from a copy."""
    model = make_model("CartPole-v1", learning_starts=10_000)
    model.learn(40, log_interval=None)
    static = {"model_loss": th.zeros(())}
    count = iter(range(1, 10))

    def train_step(data):
        static["model_loss"].fill_(next(count))  # in place, as a graph replay writes its outputs
        return static

    monkeypatch.setattr(model, "train_step", train_step)
    model.train(3)
    assert model.logger.name_to_value["train/model_loss"] == pytest.approx(2.0)  # (1 + 2 + 3) / 3


def test_a_step_that_stops_training_keeps_its_updates_owed():
    """The stopping step is stored (its rows, the latent carried), so its updates are paid by the next learn()."""
    from stable_baselines3.common.callbacks import BaseCallback

    class StopEvery(BaseCallback):
        def _on_step(self) -> bool:
            return self.n_calls % 10 != 0

    whole = make_model("CartPole-v1", learning_starts=20, train_ratio=16, seed=0)
    whole.learn(200, log_interval=None)
    stopped = make_model("CartPole-v1", learning_starts=20, train_ratio=16, seed=0)
    while stopped.num_timesteps < 200:
        stopped.learn(200 - stopped.num_timesteps, callback=StopEvery(), reset_num_timesteps=False, log_interval=None)
    assert stopped._n_updates + int(stopped._update_credit) == whole._n_updates + int(whole._update_credit)


def test_owed_updates_wait_until_a_batch_can_be_sampled(tmp_path):
    """A model stopped with an update owed, loaded without its replay: it trains once the new replay holds a batch."""
    from stable_baselines3.common.callbacks import BaseCallback

    class StopAt60(BaseCallback):
        def _on_step(self) -> bool:
            return self.n_calls < 60

    model = make_model("CartPole-v1", learning_starts=20, train_ratio=16, seed=0)
    model.learn(100, callback=StopAt60())
    assert model._update_credit >= 1.0
    model.save(tmp_path / "model.zip")
    loaded = Dreamer.load(tmp_path / "model.zip", env=model.get_env())
    loaded.learn(30, reset_num_timesteps=False)
    assert loaded._n_updates > model._n_updates


def test_learning_rate_schedule():
    model = make_model("CartPole-v1", learning_rate=lambda progress: 1e-3 * progress, learning_starts=30)
    assert type(model.lr_schedule(1.0)) is float
    model.learn(80)
    lr = model.policy.optimizer.param_groups[0]["lr"]
    assert 0.0 < lr < 1e-3  # updated from the schedule, not left at its initial value


@pytest.mark.parametrize(
    "env, space_name",
    [
        (SpaceEnv(spaces.Tuple([spaces.Discrete(2), VECTOR_OBS]), spaces.Discrete(2)), "supports Box .* observation spaces, got Tuple"),
        (SpaceEnv(spaces.Dict({"v": VECTOR_OBS, "t": spaces.Text(5)}), spaces.Discrete(2)), "supports Dict observation spaces whose .* got .*Text"),
        (SpaceEnv(VECTOR_OBS, spaces.Tuple([spaces.Discrete(2), spaces.Discrete(3)])), "supports Box .* action spaces, got Tuple"),
        (SpaceEnv(VECTOR_OBS, spaces.Box(-np.inf, np.inf, shape=(2,), dtype=np.float32)), "finite bounds"),
        (SimpleMultiObsEnv(), "use MultiInputLatentPolicy"),
        (FakeImageEnv(screen_height=40, screen_width=40, n_channels=2), "CnnLatentPolicy"),
        (SpaceEnv(spaces.MultiDiscrete([[2, 3], [2, 2]]), spaces.Discrete(2)), "one-dimensional MultiDiscrete.*flatten"),
        (SpaceEnv(spaces.Dict({"v": VECTOR_OBS, "m": spaces.MultiDiscrete([[2], [3]])}), spaces.Discrete(2)), "for key 'm'"),
    ],
    ids=["tuple-obs", "dict-obs-with-text", "tuple-action", "unbounded-box-action", "dict-obs", "image-obs", "2d-multidiscrete-obs",
         "2d-multidiscrete-in-dict"],  # fmt: skip
)
def test_unsupported_spaces_raise(env, space_name):  # space_name: the space, or the fix the message names
    with pytest.raises(ValueError, match=space_name):
        make_model(env)


@pytest.mark.parametrize(
    "kwargs",
    [dict(batch_size=0), dict(sequence_length=1), dict(imagination_horizon=0), dict(train_ratio=-1.0),
     dict(imagination_starts=0), dict(gamma=1.5), dict(gamma=-0.1), dict(return_lambda=1.5), dict(critic_ema_rate=0.0),
     dict(critic_ema_rate=2.0), dict(learning_starts=-1), dict(entropy_coef=-1e-4), dict(replay_value_scale=-0.3),
     dict(batch_size=2.5), dict(sequence_length=32.0), dict(buffer_size=1e4), dict(imagination_starts=8.5),
     dict(entropy_coef="auto"), dict(gamma=float("nan")), dict(actor_gradient="sac"), dict(train_ratio=True)],
)  # fmt: skip
def test_invalid_hyperparameters_raise(kwargs):
    (name, value), = kwargs.items()
    with pytest.raises(ValueError, match=rf"{name}\b.*got\b.*(?<![\d.]){re.escape(repr(value))}(?![\d.])"):
        make_model("CartPole-v1", **kwargs)


def test_every_invalid_hyperparameter_is_named_at_once():
    with pytest.raises(ValueError, match=r"batch_size must be an integer >= 1, got 0; gamma must be a number in \[0, 1\], got 2"):
        make_model("CartPole-v1", batch_size=0, gamma=2)


def test_learning_starts_may_be_a_float():  # compared with env steps only, as SB3's off-policy algorithms use it
    assert make_model("CartPole-v1", learning_starts=1e3).learning_starts == 1000


@pytest.mark.parametrize(
    "policy_kwargs",
    [dict(unimix=2.0), dict(unimix=1.0), dict(classes=1), dict(stoch=0), dict(deter=0), dict(units=-1), dict(free_bits=-1.0),
     dict(blocks=0), dict(actor_layers=-1), dict(rep_scale=float("nan")), dict(hidden=8.5)],
)  # fmt: skip
def test_invalid_architecture_raises(policy_kwargs):
    (name, value), = policy_kwargs.items()
    with pytest.raises(ValueError, match=rf"policy_kwargs: {name} must be .*got {re.escape(repr(value))}"):
        make_model("CartPole-v1", policy_kwargs=policy_kwargs)


def test_another_algorithms_policy_raises():
    from stable_baselines3.sac.policies import SACPolicy

    with pytest.raises(ValueError, match="Dreamer needs one of its own policies .* got .*SACPolicy"):
        Dreamer(SACPolicy, "Pendulum-v1")


class NonFiniteEnv(gym.Env):
    """A 3-d Box env whose step ``bad_step`` gives a NaN reward, or an observation (or final observation) with inf."""

    observation_space = spaces.Box(-1.0, 1.0, (3,), np.float32)
    action_space = spaces.Box(-1.0, 1.0, (1,), np.float32)

    def __init__(self, what: str, bad_step: int = 7):
        self.what, self.bad_step, self.t = what, bad_step, 0

    def reset(self, seed=None, options=None):
        self.t = 0
        return np.zeros(3, np.float32), {}

    def step(self, action):
        self.t += 1
        bad = self.t == self.bad_step
        obs = np.zeros(3, np.float32)
        if bad and self.what in ("observation", "final observation"):
            obs[1] = np.inf
        reward = float("nan") if bad and self.what == "reward" else 0.0
        return obs, reward, bad and self.what == "final observation", False, {}


@pytest.mark.parametrize("what", ["reward", "observation", "final observation"])
def test_non_finite_env_data_raises_before_it_is_stored(what):
    model = make_model(NonFiniteEnv(what), learning_starts=3)
    with pytest.raises(ValueError, match=rf"The env gave (reward nan|an? {what} with NaN or inf) in env 0 at env step 7"):
        model.learn(30)
    assert model.replay_buffer.size() == 6  # the rows before it; nothing non-finite reached the model
    assert all(th.isfinite(p).all() for p in model.policy.parameters())


@pytest.mark.parametrize("what", ["reward", "observation"])
def test_non_finite_env_data_is_found_behind_vec_normalize(what):
    """VecNormalize with frozen statistics clips an infinite observation to a finite one, but replay stores
    the original: checked there. (While its statistics train, they turn into NaN, which the check sees too.)"""
    env = VecNormalize(make_vec_env(lambda: NonFiniteEnv(what)), training=False)
    model = make_model(env, learning_starts=3)
    with pytest.raises(ValueError, match=rf"The env gave (reward nan|an? {what} with NaN or inf) in env 0 at env step 7"):
        model.learn(30)
    assert model.replay_buffer.size() == 6


@pytest.mark.parametrize("what", ["observation", "final observation"])
def test_non_finite_env_data_names_the_env_of_several(what):
    """Two envs, the second one bad at its 4th step: that env is named, at the env step counted over both."""
    env = make_vec_env(lambda: NonFiniteEnv("none"), n_envs=2)
    env.envs[1].unwrapped.what, env.envs[1].unwrapped.bad_step = what, 4
    model = make_model(env, learning_starts=3)
    with pytest.raises(ValueError, match=rf"an? {what} with NaN or inf in env 1 at env step 8"):
        model.learn(30)


def test_unknown_size_preset_raises():
    with pytest.raises(ValueError, match="size1m"):
        make_model("CartPole-v1", policy_kwargs=dict(size="huge"))


def test_default_buffer_is_not_allocated_before_learning():
    model = make_model("CartPole-v1", buffer_size=1_000_000)
    assert model.replay_buffer.size() == 0 and not hasattr(model.replay_buffer, "observations")


def rollout(model: Dreamer, n_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Stochastic actions and rewards of ``n_steps`` on the model's env, carrying the latent state."""
    env = model.get_env()
    assert env is not None
    env.seed(0)
    obs = env.reset()
    state, episode_start = None, np.ones(env.num_envs, dtype=bool)
    actions, rewards = [], []
    for _ in range(n_steps):
        action, state = model.predict(obs, state=state, episode_start=episode_start, deterministic=False)
        obs, reward, episode_start, _ = env.step(action)
        actions.append(action)
        rewards.append(reward)
    return np.array(actions), np.array(rewards)


@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1"])
def test_deterministic_with_seed(env_id):
    results = []
    for _ in range(2):
        model = make_model(env_id, seed=1, learning_starts=40)
        model.learn(60)
        results.append(rollout(model, 50))
    (actions_a, rewards_a), (actions_b, rewards_b) = results
    np.testing.assert_array_equal(actions_a, actions_b)
    np.testing.assert_array_equal(rewards_a, rewards_b)


def test_different_seeds_differ():
    # The determinism test above can fail: other seeds give other actions.
    rollouts = [rollout(make_model("Pendulum-v1", seed=seed), 20)[0] for seed in (1, 2)]
    assert not np.array_equal(*rollouts)


def test_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    env = make_vec_env(time_limited("CartPole-v1", 20), n_envs=1, seed=0)
    model = make_model(env, tensorboard_log=str(tmp_path), learning_starts=30)
    model.learn(80, log_interval=1)
    run_dir = tmp_path / "Dreamer_1"
    assert run_dir.is_dir()
    events = list(run_dir.glob("events.out.tfevents.*"))
    assert events
    accumulator = EventAccumulator(str(run_dir))
    accumulator.Reload()
    tags = accumulator.Tags()["scalars"]
    assert any(tag.startswith("train/") for tag in tags), tags
    assert "rollout/ep_rew_mean" in tags
    model.learn(20, reset_num_timesteps=False, log_interval=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Dreamer_1"]
    model.learn(20, tb_log_name="Dreamer", log_interval=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Dreamer_1", "Dreamer_2"]


def test_gym_env_is_wrapped():
    model = make_model(gym.make("CartPole-v1"), learning_starts=10_000)
    model.learn(5)
    assert model.get_env().num_envs == 1


def test_a_vec_env_without_final_observations_is_refused_with_the_fix():
    """Dreamer stores each episode's final observation: a VecEnv that does not give it (SB3's put it in
    infos[i]["terminal_observation"]) is refused when an episode ends, not a bare KeyError."""
    from stable_baselines3.common.vec_env import VecEnvWrapper

    class DropFinalObservation(VecEnvWrapper):
        def reset(self):
            return self.venv.reset()

        def step_wait(self):
            obs, rewards, dones, infos = self.venv.step_wait()
            return obs, rewards, dones, [{k: v for k, v in info.items() if k != "terminal_observation"} for info in infos]

    model = make_model(DropFinalObservation(make_vec_env("CartPole-v1", n_envs=2, seed=0)), learning_starts=1000)
    with pytest.raises(ValueError, match=r"no infos\[i\]\['terminal_observation'\] for the episode that ended in env\(s\) \[\d"):
        model.learn(300)
