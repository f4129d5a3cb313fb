"""Callbacks during Dreamer.learn (mirrors SB3's test_callbacks)."""

from __future__ import annotations

import numpy as np
from stable_baselines3.common.callbacks import (
    BaseCallback,
    CallbackList,
    CheckpointCallback,
    EvalCallback,
    EveryNTimesteps,
    StopTrainingOnRewardThreshold,
)
from stable_baselines3.common.env_util import make_vec_env

from .helpers import assert_state_dicts_equal, make_model, time_limited


class CountingCallback(BaseCallback):
    """Counts on_step calls; returns ``keep_going``."""

    def __init__(self, keep_going: bool = True) -> None:
        super().__init__()
        self.keep_going = keep_going
        self.rollout_starts = 0

    def _on_rollout_start(self) -> None:
        self.rollout_starts += 1

    def _on_step(self) -> bool:
        return self.keep_going


def eval_env():
    return make_vec_env(time_limited("CartPole-v1", 20), n_envs=1, seed=1)


def test_eval_callback_stops_training_on_reward_threshold(tmp_path):
    stop = StopTrainingOnRewardThreshold(reward_threshold=-1e9, verbose=0)
    eval_callback = EvalCallback(
        eval_env(), callback_on_new_best=stop, eval_freq=20, n_eval_episodes=2, log_path=str(tmp_path), warn=False
    )
    model = make_model("CartPole-v1", learning_starts=10)
    model.learn(300, callback=eval_callback)
    assert model.num_timesteps == 20  # stopped at the first evaluation
    assert eval_callback.n_calls == 20
    evaluations = np.load(tmp_path / "evaluations.npz")
    assert evaluations["timesteps"].tolist() == [20]
    assert evaluations["results"].shape == (1, 2)


def test_eval_callback_does_not_disturb_training(tmp_path):
    # EvalCallback calls model.predict (deterministic: no random numbers drawn) in the middle of a rollout.
    # The rollout latent lives on the algorithm, so training is exactly the same with or without it.
    def train(callback=None):
        model = make_model("CartPole-v1", learning_starts=30, seed=0)
        model.learn(60, callback=callback)
        return model

    eval_callback = EvalCallback(eval_env(), eval_freq=15, n_eval_episodes=1, log_path=str(tmp_path), warn=False, verbose=0)
    with_eval, without_eval = train(eval_callback), train()
    assert eval_callback.n_calls == 60 and len(eval_callback.evaluations_results) == 4
    assert with_eval._n_updates == without_eval._n_updates > 0
    np.testing.assert_array_equal(with_eval.replay_buffer.observations, without_eval.replay_buffer.observations)
    np.testing.assert_array_equal(with_eval.replay_buffer.actions, without_eval.replay_buffer.actions)
    assert_state_dicts_equal(with_eval.policy.state_dict(), without_eval.policy.state_dict())


def test_checkpoint_callback_with_replay_buffer(tmp_path):
    checkpoint = CheckpointCallback(save_freq=25, save_path=str(tmp_path), name_prefix="dreamer", save_replay_buffer=True)
    make_model("CartPole-v1", learning_starts=10_000).learn(60, callback=checkpoint)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "dreamer_25_steps.zip",
        "dreamer_50_steps.zip",
        "dreamer_replay_buffer_25_steps.pkl",
        "dreamer_replay_buffer_50_steps.pkl",
    ]


def test_checkpoint_replay_buffer_holds_the_step_it_was_saved_at(tmp_path):
    """A callback runs once the step's rows are stored: a replay buffer saved at step k holds k rows
    (plus one final-observation row per episode end), the ending step's terminal flag included (SB3's
    off-policy loop saves it before storing the step)."""
    from stable_baselines3.common.save_util import load_from_pkl

    from .helpers import counting_env

    checkpoint = CheckpointCallback(save_freq=5, save_path=str(tmp_path), name_prefix="d", save_replay_buffer=True)
    make_model(counting_env(max_episode_steps=100, terminate_at=5), learning_starts=10_000).learn(10, callback=checkpoint)
    at_5 = load_from_pkl(tmp_path / "d_replay_buffer_5_steps.pkl")
    assert at_5.size() == 6  # rows of obs 0-4, then the final observation 5 of the episode that terminated at step 5
    assert at_5.is_terminal[5, 0] and at_5.is_last[5, 0] and at_5.observations[5, 0, 0] == 5
    at_10 = load_from_pkl(tmp_path / "d_replay_buffer_10_steps.pkl")
    assert at_10.size() == 12 and at_10.is_terminal[11, 0]  # the second episode ended at step 10 too


def test_callback_list_every_n_timesteps_and_locals(tmp_path):
    callback = CountingCallback()
    on_event = CountingCallback()
    event_callback = EveryNTimesteps(n_steps=10, callback=on_event)
    checkpoint = CheckpointCallback(save_freq=1000, save_path=str(tmp_path))
    model = make_model("CartPole-v1", learning_starts=20)
    model.learn(50, callback=CallbackList([callback, event_callback, checkpoint]), progress_bar=True)
    # Each callback saw each env step, with the rollout's local variables.
    assert callback.n_calls == event_callback.n_calls == checkpoint.n_calls == model.num_timesteps == 50
    assert event_callback.num_timesteps == model.num_timesteps
    assert on_event.n_calls == 5
    assert isinstance(callback.locals["new_obs"], np.ndarray)
    assert model.observation_space.contains(callback.locals["new_obs"][0])
    assert event_callback.locals["new_obs"] is callback.locals["new_obs"]
    assert callback.rollout_starts > 0


def test_callback_list_as_plain_list():
    callbacks = [CountingCallback(), CountingCallback()]
    make_model("CartPole-v1", learning_starts=10_000).learn(12, callback=callbacks)
    assert [c.n_calls for c in callbacks] == [12, 12]


def test_callback_returning_false_stops_training():
    callback = CountingCallback(keep_going=False)
    model = make_model("CartPole-v1")
    model.learn(100, callback=callback)
    assert callback.n_calls == 1
    assert model.num_timesteps == 1


def test_callback_returning_false_in_multi_env():
    callback = CountingCallback(keep_going=False)
    model = make_model(make_vec_env("CartPole-v1", n_envs=2))
    model.learn(100, callback=callback)
    assert callback.n_calls == 1 and model.num_timesteps == 2
