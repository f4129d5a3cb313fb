"""SequenceReplayBuffer on its own, and the rows Dreamer writes into it (time alignment)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch as th
from gymnasium import spaces
from stable_baselines3.common.callbacks import StopTrainingOnMaxEpisodes
from stable_baselines3.common.save_util import load_from_pkl, save_to_pkl
from stable_baselines3.common.vec_env import DummyVecEnv, VecFrameStack, VecMonitor, VecNormalize

from sb3_dreamer.buffers import SequenceReplayBuffer, saved_device
from sb3_dreamer.type_aliases import SequenceSamples

from .helpers import counting_env, make_model, time_limited

OBS_SPACE = spaces.Box(-np.inf, np.inf, shape=(1,), dtype=np.float32)
ACTION_SPACE = spaces.Discrete(2)


def make_buffer(buffer_size: int, n_envs: int = 1) -> SequenceReplayBuffer:
    return SequenceReplayBuffer(buffer_size, OBS_SPACE, ACTION_SPACE, device="cpu", n_envs=n_envs)


def add_rows(buffer: SequenceReplayBuffer, values, env_indices=None) -> None:
    """Add one row per column in ``env_indices`` (all by default) per entry of ``values``; obs = reward = value."""
    for value in values:
        n = buffer.n_envs if env_indices is None else len(env_indices)
        value = np.broadcast_to(np.asarray(value, dtype=np.float32), (n,))
        false = np.zeros(n, dtype=bool)
        action = np.tile([1.0, 0.0], (n, 1))
        buffer.add(value[:, None], action, value, false, false, false, env_indices=env_indices)


def assert_consecutive(windows: th.Tensor) -> None:
    """Every sampled window [B, T] of row ids must be consecutive rows of one column."""
    assert (windows.diff(dim=1) == 1).all(), windows


# ------------------------------------------------------------------------------------ storage
def test_allocates_lazily():
    buffer = SequenceReplayBuffer(1_000_000, OBS_SPACE, ACTION_SPACE, device="cpu")
    assert buffer.size() == 0 and not hasattr(buffer, "observations")
    assert buffer.nbytes > 0
    add_rows(buffer, [0.0])
    assert buffer.observations.shape == (1_000_000, 1, 1)
    assert buffer.actions.shape == (1_000_000, 1, 2)


def test_rejects_fewer_rows_than_envs():
    with pytest.raises(ValueError, match="n_envs"):
        make_buffer(buffer_size=1, n_envs=2)


def test_add_refuses_observations_of_another_shape():
    """A reshape would take a [n, 4, 6, 3] image into [n, 3, 4, 6] rows scrambled (a wrapper that transposes
    observations but not infos' terminal_observation)."""
    image = spaces.Box(0, 255, (3, 4, 6), np.uint8)
    buffer = SequenceReplayBuffer(16, image, ACTION_SPACE, device="cpu")
    false = np.zeros(1, dtype=bool)
    with pytest.raises(ValueError, match=r"shape \(1, 3, 4, 6\).*got \(1, 4, 6, 3\).*terminal_observation"):
        buffer.add(np.zeros((1, 4, 6, 3), np.uint8), np.array([[1.0, 0.0]]), np.zeros(1), false, false, false)
    assert buffer.size() == 0


def test_add_rounds_float_observations_into_uint8_storage():
    """VecNormalize's unnormalised final observation is a float a hair below the integer the env gave."""
    space = spaces.Box(0, 50, (3,), np.uint8)
    buffer = SequenceReplayBuffer(16, space, ACTION_SPACE, device="cpu")
    false = np.zeros(1, dtype=bool)
    buffer.add(np.array([[3.9999998, 11.0000005, 20.6]], np.float32), np.array([[1.0, 0.0]]), np.zeros(1), false, false, false)
    np.testing.assert_array_equal(buffer.observations[0, 0], [4, 11, 21])


def test_ring_wrap_around():
    buffer = make_buffer(buffer_size=5)
    add_rows(buffer, range(8))
    np.testing.assert_array_equal(buffer.observations[:, 0, 0], [5, 6, 7, 3, 4])
    assert buffer.pos[0] == 3 and buffer.size() == 5


def test_windows_never_cross_the_write_position():
    np.random.seed(0)
    buffer = make_buffer(buffer_size=5)
    add_rows(buffer, range(8))  # holds 3..7, oldest at row 3
    samples = buffer.sample(batch_size=200, sequence_length=3)
    windows = samples.observations[..., 0]
    assert_consecutive(windows)
    assert set(windows[:, 0].tolist()) == {3.0, 4.0, 5.0}
    th.testing.assert_close(samples.rewards, windows)  # rows are sampled whole


def test_window_covering_whole_buffer():
    np.random.seed(0)
    buffer = make_buffer(buffer_size=4)
    add_rows(buffer, range(6))
    windows = buffer.sample(batch_size=10, sequence_length=4).observations[..., 0]
    assert (windows == th.tensor([2.0, 3.0, 4.0, 5.0])).all()


def test_sample_shapes_dtypes_and_forced_is_first():
    np.random.seed(0)
    buffer = make_buffer(buffer_size=50)
    add_rows(buffer, range(20))
    samples = buffer.sample(batch_size=3, sequence_length=6)
    assert samples.observations.shape == (3, 6, 1)
    assert samples.actions.shape == (3, 6, 2)
    for x in (samples.rewards, samples.is_first, samples.is_last, samples.is_terminal):
        assert x.shape == (3, 6) and x.dtype == th.float32
    # No row was written with is_first, yet every window starts from a fresh state.
    assert (samples.is_first[:, 0] == 1).all() and (samples.is_first[:, 1:] == 0).all()
    assert not buffer.is_first.any()  # forcing is done on the sample, not the storage
    # prev_actions: zero at t=0, the previous row's action after.
    assert (samples.prev_actions[:, 0] == 0).all()
    th.testing.assert_close(samples.prev_actions[:, 1:], samples.actions[:, :-1])


def test_columns_advance_independently():
    np.random.seed(0)
    buffer = make_buffer(buffer_size=20, n_envs=2)  # 10 rows per column
    add_rows(buffer, [0.0, 1.0], env_indices=[0])
    add_rows(buffer, [100.0, 101.0, 102.0], env_indices=[1])
    add_rows(buffer, [[2.0, 103.0]])  # both columns at once
    assert buffer.pos.tolist() == [3, 4] and buffer.size() == 7
    np.testing.assert_array_equal(buffer.observations[:3, 0, 0], [0, 1, 2])
    np.testing.assert_array_equal(buffer.observations[:4, 1, 0], [100, 101, 102, 103])
    windows = buffer.sample(batch_size=300, sequence_length=3).observations[..., 0]
    assert_consecutive(windows)
    # Column 0 has one window (0..2), column 1 two (100.., 101..): all three get sampled.
    assert set(windows[:, 0].tolist()) == {0.0, 100.0, 101.0}


def test_short_column_is_never_sampled():
    np.random.seed(0)
    buffer = make_buffer(buffer_size=20, n_envs=2)
    add_rows(buffer, range(6), env_indices=[0])
    add_rows(buffer, [100.0, 101.0], env_indices=[1])
    windows = buffer.sample(batch_size=100, sequence_length=4).observations[..., 0]
    assert (windows < 100).all()


def test_sample_too_short_raises():
    buffer = make_buffer(buffer_size=20)
    assert not buffer.can_sample(2)
    with pytest.raises(ValueError, match="sequence_length"):
        buffer.sample(batch_size=2, sequence_length=2)  # empty
    add_rows(buffer, range(3))
    assert buffer.can_sample(3) and not buffer.can_sample(4)
    with pytest.raises(ValueError, match="Cannot sample windows of 4 steps"):
        buffer.sample(batch_size=2, sequence_length=4)


def test_truncate_last_trajectories():
    buffer = make_buffer(buffer_size=20, n_envs=2)
    buffer.truncate_last_trajectories()  # unallocated: nothing to do
    add_rows(buffer, range(3), env_indices=[0])
    buffer.truncate_last_trajectories()
    assert buffer.is_last[:, 0].tolist() == [False, False, True] + [False] * 7
    assert not buffer.is_last[:, 1].any()  # empty column untouched


# ------------------------------------------------------------------------------------ Dreamer's rows
def collect(env, steps: int, **kwargs):
    """Run Dreamer for ``steps`` env steps without any update and return its replay buffer."""
    model = make_model(env, learning_starts=10_000, buffer_size=1_000, seed=0, **kwargs)
    model.learn(steps)
    return model.replay_buffer


def column(buffer: SequenceReplayBuffer, col: int = 0) -> dict[str, np.ndarray]:
    n = buffer.pos[col]
    assert buffer.count[col] == n, "this helper expects a column that has not wrapped"
    return {
        name: getattr(buffer, name)[:n, col]
        for name in ("observations", "actions", "rewards", "is_first", "is_last", "is_terminal")
    }


def expected_flags(episode_length: int, episodes: int, terminal: bool) -> dict[str, list[bool]]:
    """Flags of ``episodes`` full episodes: rows obs_0..obs_L (L+1 rows, the final observation included)."""
    rows = episode_length + 1
    first = ([True] + [False] * episode_length) * episodes
    last = ([False] * episode_length + [True]) * episodes
    return {"is_first": first, "is_last": last, "is_terminal": last if terminal else [False] * (rows * episodes)}


@pytest.mark.parametrize("terminal", [True, False], ids=["terminated", "truncated"])
def test_dreamer_rows_time_alignment(terminal):
    length = 3
    env = counting_env(terminate_at=length) if terminal else counting_env(max_episode_steps=length)
    rows = column(collect(env, steps=3 * length))  # exactly three episodes
    # Observation t of each episode: 0, 1, 2, 3 (final observation), then a fresh reset.
    np.testing.assert_array_equal(rows["observations"][:, 0], [0, 1, 2, 3] * 3)
    # The reward that led to obs_t is t, and 0 on reset rows.
    np.testing.assert_array_equal(rows["rewards"], rows["observations"][:, 0])
    for flag, expected in expected_flags(length, 3, terminal).items():
        assert rows[flag].tolist() == expected, flag
    # actions[t] is the action taken at obs_t: the env echoes it in obs_{t+1}[1]; final rows store zeros.
    taken = rows["actions"].argmax(-1)
    not_final = ~rows["is_last"]
    np.testing.assert_array_equal(taken[:-1][not_final[:-1]], rows["observations"][1:, 1][not_final[:-1]])
    assert (rows["actions"][rows["is_last"]] == 0).all()
    assert (rows["actions"][not_final].sum(-1) == 1).all()  # one-hot


def test_dreamer_rows_with_two_envs():
    # Column 0 ends episodes every 2 steps, column 1 every 4: the columns drift apart.
    vec_env = DummyVecEnv([lambda: counting_env(terminate_at=2), lambda: counting_env(max_episode_steps=4)])
    buffer = collect(vec_env, steps=16)  # 8 steps per env
    first, second = column(buffer, 0), column(buffer, 1)
    assert buffer.pos.tolist() == [12, 10]  # 8 rows + 4 (resp. 2) final-observation rows
    np.testing.assert_array_equal(first["observations"][:, 0], [0, 1, 2] * 4)
    np.testing.assert_array_equal(second["observations"][:, 0], [0, 1, 2, 3, 4] * 2)
    for rows, length, episodes, terminal in ((first, 2, 4, True), (second, 4, 2, False)):
        np.testing.assert_array_equal(rows["rewards"], rows["observations"][:, 0])
        for flag, expected in expected_flags(length, episodes, terminal).items():
            assert rows[flag].tolist() == expected, flag


def test_vec_normalize_rows_hold_original_values_normalised_when_sampled():
    """As SB3's off-policy algorithms: rows store what the env gave before VecNormalize, and a sample
    is normalised with the statistics of the moment (the agent acts on normalised observations)."""
    env = VecNormalize(DummyVecEnv([lambda: counting_env(terminate_at=2), lambda: counting_env(max_episode_steps=4)]))
    model = make_model(env, learning_starts=10_000, buffer_size=1_000, seed=0)
    model.learn(16)
    buffer = model.replay_buffer
    first, second = column(buffer, 0), column(buffer, 1)
    np.testing.assert_array_equal(first["observations"][:, 0], [0, 1, 2] * 4)  # the final observations too
    np.testing.assert_array_equal(second["observations"][:, 0], [0, 1, 2, 3, 4] * 2)
    for rows in (first, second):
        np.testing.assert_array_equal(rows["rewards"], rows["observations"][:, 0])
    samples = buffer.sample(batch_size=8, sequence_length=3, env=env)
    rows, cols = samples.indices
    stored_obs, stored_rewards = buffer.observations[rows, cols], buffer.rewards[rows, cols]
    np.testing.assert_allclose(samples.observations.numpy(), env.normalize_obs(stored_obs), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(samples.rewards.numpy(), env.normalize_reward(stored_rewards), rtol=1e-5, atol=1e-6)
    raw = buffer.sample(batch_size=8, sequence_length=3)
    np.testing.assert_array_equal(raw.observations.numpy(), buffer.observations[raw.indices])
    # A wrapper that keeps the observation space (VecMonitor) on top: the same.
    monitored = VecMonitor(VecNormalize(DummyVecEnv([lambda: counting_env(terminate_at=2)])))
    model = make_model(monitored, learning_starts=10_000, buffer_size=1_000, seed=0)
    assert model._replay_normalizer is monitored.venv
    model.learn(6)
    np.testing.assert_array_equal(column(model.replay_buffer)["observations"][:, 0], [0, 1, 2] * 3)
    # Under a VecFrameStack the agent's observations have another shape: rows hold those it acted on.
    stacked = VecFrameStack(VecNormalize(DummyVecEnv([lambda: counting_env(terminate_at=2)])), n_stack=2)
    model = make_model(stacked, learning_starts=10_000, buffer_size=1_000, seed=0)
    assert model._replay_normalizer is None
    model.learn(6)
    assert not np.isin(column(model.replay_buffer)["observations"][:, 2], [0.0, 1.0, 2.0]).all()  # normalised


def test_a_callback_that_stops_training_loses_no_row():
    """StopTrainingOnMaxEpisodes stops on an episode's last step: that step's rows are still stored,
    so a learn(reset_num_timesteps=False) continues with the next episode, no transition invented."""
    model = make_model(counting_env(terminate_at=3), learning_starts=10_000, buffer_size=1_000, seed=0)
    model.learn(100, callback=StopTrainingOnMaxEpisodes(max_episodes=2))
    assert model.num_timesteps == 6
    model.learn(4, reset_num_timesteps=False)
    rows = column(model.replay_buffer)
    np.testing.assert_array_equal(rows["observations"][:, 0], [0, 1, 2, 3] * 2 + [0, 1, 2, 3, 0])
    np.testing.assert_array_equal(rows["rewards"], rows["observations"][:, 0])
    for flag, expected in expected_flags(3, 3, terminal=True).items():
        assert rows[flag].tolist() == expected + [flag == "is_first"], flag


def test_replay_columns_shorter_than_a_sequence_are_refused():
    from stable_baselines3.common.env_util import make_vec_env

    with pytest.raises(ValueError, match="each env's replay column 25 rows, fewer than sequence_length=32.*buffer_size >= 128"):
        make_model(make_vec_env("CartPole-v1", n_envs=4), buffer_size=100, sequence_length=32)


def test_updates_are_owed_only_once_a_batch_can_be_sampled():
    """8 envs, learning_starts=16 and sequences of 8 rows: the columns hold 8 rows only at env step 64.
    The first train() then runs that step's updates, not those of the steps before it."""
    from stable_baselines3.common.env_util import make_vec_env

    model = make_model(make_vec_env("CartPole-v1", n_envs=8), learning_starts=16, train_ratio=16, seed=0)
    calls = []
    model.train = lambda gradient_steps: calls.append((model.num_timesteps, gradient_steps))  # type: ignore[method-assign]
    model.learn(80)
    assert model.updates_per_step == 1.0  # one update per env step: 8 per step of the 8 envs
    assert calls == [(64, 8), (72, 8), (80, 8)], calls


def test_dreamer_rows_on_cartpole():
    # Random CartPole episodes under a 20-step limit: some terminate, some are truncated.
    vec_env = DummyVecEnv([time_limited("CartPole-v1", 20)])
    rows = column(collect(vec_env, steps=200))
    is_first, is_last, is_terminal = rows["is_first"], rows["is_last"], rows["is_terminal"]
    assert is_first[0] and (rows["rewards"][is_first] == 0).all()
    assert (rows["rewards"][~is_first] == 1).all()
    assert not (is_terminal & ~is_last).any()
    # Every ending row is followed by a reset row, and every reset row (but the first) follows an ending.
    np.testing.assert_array_equal(is_first[1:], is_last[:-1])
    # Episode lengths (rows between resets, final observation excluded): fewer than 20 means
    # terminated; 20 means truncated, unless the pole also fell at that very step (then terminal).
    starts = np.flatnonzero(is_first)
    lengths = np.diff(starts) - 1
    ended_terminal = is_terminal[starts[1:] - 1]
    assert lengths.max() <= 20
    assert ended_terminal[lengths < 20].all() and ended_terminal.any()
    assert not ended_terminal[lengths == 20].all()  # a time limit is not a termination


def test_forced_reset_marks_the_interrupted_episode_last():
    model = make_model(counting_env(max_episode_steps=5), learning_starts=10_000, buffer_size=100)
    model.learn(13)  # two full episodes (12 rows), then obs 0, 1, 2 of a third
    model.learn(3)  # resets the env: the third episode never ends
    rows = column(model.replay_buffer)
    np.testing.assert_array_equal(rows["observations"][12:, 0], [0, 1, 2, 0, 1, 2])
    assert rows["is_first"][15]
    assert rows["is_last"][14] and not rows["is_terminal"][14]


# ------------------------------------------------------------------------------------ save / load
@pytest.mark.parametrize("truncate_last_traj", [True, False])
def test_replay_buffer_save_load_round_trip(tmp_path, truncate_last_traj):
    model = make_model(counting_env(max_episode_steps=5), learning_starts=10_000, buffer_size=100)
    model.learn(13)  # ends mid-episode: the newest row is not an ending
    path = tmp_path / "replay.pkl"
    model.save_replay_buffer(path)
    original = model.replay_buffer

    other = make_model(counting_env(max_episode_steps=5))
    other.load_replay_buffer(path, truncate_last_traj=truncate_last_traj)
    loaded = other.replay_buffer
    assert loaded.size() == original.size() == 15 and loaded.pos.tolist() == original.pos.tolist()
    newest = original.pos[0] - 1
    assert not original.is_last[newest, 0]
    for name in ("observations", "actions", "rewards", "is_first", "is_terminal"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(original, name))
    expected_last = original.is_last.copy()
    expected_last[newest, 0] = truncate_last_traj
    np.testing.assert_array_equal(loaded.is_last, expected_last)
    other.learn(60, reset_num_timesteps=False)  # and it keeps being usable for training
    assert other._n_updates > 0


def test_saved_replay_buffer_holds_only_the_rows_written(tmp_path):
    """A buffer far from full is saved without its empty capacity (a 1M-row buffer of 64 x 64 frames
    would otherwise write 12 GB for a few rows) and loads back at full capacity."""
    model = make_model("CartPole-v1", learning_starts=10_000, buffer_size=1_000_000, seed=0)
    model.learn(20)  # seeded: an episode ends within them, so there is a final-observation row
    path = tmp_path / "replay.pkl"
    model.save_replay_buffer(path)
    assert path.stat().st_size < 50_000  # 1M empty rows of CartPole would be ~30 MB
    other = make_model("CartPole-v1", buffer_size=1_000_000)
    other.load_replay_buffer(path)
    loaded, original = other.replay_buffer, model.replay_buffer
    assert loaded.size() == original.size() > 20 and loaded.observations.shape == original.observations.shape
    np.testing.assert_array_equal(loaded.observations, original.observations)
    np.testing.assert_array_equal(loaded.is_first, original.is_first)


def test_load_replay_buffer_errors(tmp_path):
    model = make_model("CartPole-v1", learning_starts=10_000)
    model.learn(5)
    model.save_replay_buffer(tmp_path / "replay.pkl")
    two_envs = make_model(DummyVecEnv([lambda: counting_env(5)] * 2))
    with pytest.raises(ValueError, match="n_envs"):
        two_envs.load_replay_buffer(tmp_path / "replay.pkl")
    pendulum = make_model("Pendulum-v1")
    with pytest.raises(ValueError, match=r"observations of Box\(.*\(4,\), float32\) but this model's observation space is Box"):
        pendulum.load_replay_buffer(tmp_path / "replay.pkl")
    small = make_model("CartPole-v1", learning_starts=10_000, buffer_size=20)
    small.learn(5)
    small.save_replay_buffer(tmp_path / "small.pkl")
    with pytest.raises(ValueError, match="holds 20 rows per env column, fewer than sequence_length=32: no sequence could be"):
        make_model("CartPole-v1", sequence_length=32).load_replay_buffer(tmp_path / "small.pkl")
    save_to_pkl(tmp_path / "not_a_buffer.pkl", {"a": 1})
    with pytest.raises(TypeError, match="SequenceReplayBuffer"):
        model.load_replay_buffer(tmp_path / "not_a_buffer.pkl")


def test_load_replay_buffer_starts_a_new_sequence_where_the_env_is_mid_episode(tmp_path):
    """Loaded (and truncated) while the model's env is mid-episode, as in a run that goes on after a
    reload: the next row collected is the first of a sequence (reward 0), not a continuation of the
    buffer's newest row, which belongs to another stretch of the env's history."""
    model = make_model(counting_env(max_episode_steps=50), learning_starts=10_000, buffer_size=100)
    model.learn(6)
    model.save_replay_buffer(tmp_path / "replay.pkl")
    model.learn(4, reset_num_timesteps=False)  # the env goes on: its episode is now 10 steps in
    model.load_replay_buffer(tmp_path / "replay.pkl")
    model.learn(3, reset_num_timesteps=False)
    buffer = model.replay_buffer
    assert buffer.size() == 9 and buffer.is_last[5, 0]  # 6 rows loaded, 3 collected
    assert buffer.is_first[6, 0] and buffer.rewards[6, 0] == 0.0 and buffer.observations[6, 0, 0] == 10
    assert not buffer.is_first[7:9, 0].any() and buffer.rewards[7, 0] == 11


@pytest.mark.parametrize("saved_context", [True, False])
def test_load_replay_buffer_adapts_replay_context_latents(tmp_path, saved_context):
    """A buffer saved with (without) replay-context latents loads into a model without (with) replay
    context: the rows are kept, the latents dropped (zeros: the latent of a row not yet replayed), with a warning."""
    model = make_model("CartPole-v1", learning_starts=10_000, replay_context=saved_context)
    model.learn(40)
    model.save_replay_buffer(tmp_path / "replay.pkl")
    other = make_model("CartPole-v1", replay_context=not saved_context, learning_starts=0, train_ratio=32)
    with pytest.warns(UserWarning, match="replay-context latents"):
        other.load_replay_buffer(tmp_path / "replay.pkl")
    loaded = other.replay_buffer
    np.testing.assert_array_equal(loaded.observations, model.replay_buffer.observations)
    samples = loaded.sample(4, 8)
    if saved_context:
        assert loaded.latent_dims is None and not hasattr(loaded, "deter") and samples.context_deter is None
    else:
        rssm = other.policy.world_model.rssm
        assert loaded.latent_dims == (rssm.deter_dim, rssm.stoch_dim) and loaded.deter.shape[1:] == (1, rssm.deter_dim)
        assert not loaded.deter.any() and not samples.context_deter.any()
        assert samples.is_first[:, 0].all() and not samples.context_action.any()  # from the reset state, as without context
    other.learn(20, reset_num_timesteps=False)
    assert other._n_updates > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same sizes: no warning
        make_model("CartPole-v1", replay_context=saved_context).load_replay_buffer(tmp_path / "replay.pkl")


# ------------------------------------------------------------------------------------ replay context
def test_replay_context_starts_windows_from_the_stored_latent_of_the_row_before():
    np.random.seed(0)
    buffer = SequenceReplayBuffer(10, OBS_SPACE, ACTION_SPACE, device="cpu", latent_dims=(2, 3))
    false = np.zeros(1, dtype=bool)
    for value in range(6):  # row r holds obs r, latent (r + 1) / (r + 1, ...), action one-hot of r % 2; row 2 no latent
        action = np.eye(2, dtype=np.float32)[[value % 2]]
        latent = 0 if value == 2 else value + 1
        buffer.add([[value]], action, [value], false, false, false, deter=np.full((1, 2), latent), stoch=np.full((1, 3), latent))
    samples = buffer.sample(batch_size=64, sequence_length=3)
    first = samples.observations[:, 0, 0]
    has_context = (first > 0) & (first != 3)
    # The row before a window: its latent and action become the window's starting carry.
    th.testing.assert_close(samples.context_deter[:, 0], th.where(has_context, first, th.zeros_like(first)))
    th.testing.assert_close(samples.context_stoch[:, 2], th.where(has_context, first, th.zeros_like(first)))
    expected_action = th.nn.functional.one_hot(((first - 1) % 2).long(), 2).float() * has_context[:, None]
    th.testing.assert_close(samples.context_action, expected_action)
    th.testing.assert_close(samples.prev_actions[:, 0], expected_action)
    # is_first is forced where the window starts at the column's oldest row, or after a row without a
    # latent (zeros: set_latent_dims gave the row none), so the window starts from the reset state.
    th.testing.assert_close(samples.is_first[:, 0], (~has_context).float())
    assert has_context.any() and (first == 0).any() and (first == 3).any()


def test_replay_context_update_latents_writes_back():
    """Step t of a sampled window gets the posterior latent of step t, in that window's row t; no other row changes."""
    np.random.seed(0)
    buffer = SequenceReplayBuffer(10, OBS_SPACE, ACTION_SPACE, device="cpu", latent_dims=(2, 3))
    add_rows(buffer, range(8))
    samples = buffer.sample(batch_size=1, sequence_length=3)
    deter = th.arange(1.0, 4.0)[None, :, None].expand(1, 3, 2)  # step t -> t + 1
    stoch = -th.arange(1.0, 4.0)[None, :, None].expand(1, 3, 3)
    buffer.update_latents(samples.indices, deter, stoch)
    rows, cols = samples.indices  # [1, 3] each
    np.testing.assert_array_equal(buffer.deter[rows[0], cols[0]], [[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
    np.testing.assert_array_equal(buffer.stoch[rows[0], cols[0]], -np.array([[1.0] * 3, [2.0] * 3, [3.0] * 3]))
    untouched = np.setdiff1d(np.arange(8), rows[0])
    assert len(untouched) == 5 and (buffer.deter[untouched] == 0.0).all() and (buffer.stoch[untouched] == 0.0).all()


def test_dreamer_with_replay_context_stores_and_uses_latents():
    model = make_model("CartPole-v1", seed=0, replay_context=True)
    model.learn(100)
    buffer = model.replay_buffer
    assert buffer.latent_dims == (model.policy.world_model.rssm.deter_dim, model.policy.world_model.rssm.stoch_dim)
    rows = buffer.count[0]
    written, acted = np.asarray(buffer.deter[:rows, 0], np.float32), ~np.asarray(buffer.is_last[:rows, 0], bool)
    assert acted.sum() > 50 and (np.abs(written[acted]).sum(-1) > 0).all()  # each acting step's latent is stored
    samples = buffer.sample(model.batch_size, model.sequence_length)
    assert samples.context_deter is not None and samples.context_deter.shape == (model.batch_size, buffer.latent_dims[0])
    # A window that does not start at the column's oldest row starts from the stored latent of the row before it.
    starts_inside = samples.indices[0][:, 0] > 0
    assert starts_inside.any() and (samples.context_deter[th.as_tensor(starts_inside)].abs().sum(-1) > 0).all()
    # The update starts the world model's sequences from the batch's context latents.
    sampled, given = [], []
    sample, loss = buffer.sample, model.policy.world_model.loss
    buffer.sample = lambda *args, **kwargs: sampled.append(sample(*args, **kwargs)) or sampled[-1]
    model.policy.world_model.loss = lambda *args: given.append(args[-1]) or loss(*args)
    model.train(1)  # replayed rows get the training posterior's latents
    del buffer.sample, model.policy.world_model.loss
    assert len(sampled) == len(given) == 1 and given[0] is not None
    th.testing.assert_close(given[0][0], sampled[0].context_deter)
    th.testing.assert_close(given[0][1], sampled[0].context_stoch)
    assert not np.array_equal(np.asarray(buffer.deter[:rows, 0], np.float32), written)
    assert make_model("CartPole-v1").replay_buffer.latent_dims is None


def test_warns_when_the_full_buffer_would_not_fit_in_memory():
    psutil = pytest.importorskip("psutil")
    obs = spaces.Box(-1.0, 1.0, shape=(4,), dtype=np.float32)
    rows = int(2 * psutil.virtual_memory().available / (4 * (4 + 2 + 1) + 3)) + 1
    with pytest.warns(UserWarning, match="lower buffer_size"):
        SequenceReplayBuffer(rows, obs, spaces.Discrete(2), device="cpu")  # allocated lazily: nothing is used yet
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SequenceReplayBuffer(1_000, obs, spaces.Discrete(2), device="cpu")


# ------------------------------------------------------------------------------------ storage on the device
def fill_both(storage: str, **kwargs) -> SequenceReplayBuffer:
    """A buffer with two columns of 12 rows (ring wrapped, episode ends, latents) in the given storage."""
    buffer = SequenceReplayBuffer(16, OBS_SPACE, ACTION_SPACE, device="cpu", n_envs=2, storage=storage, **kwargs)
    latents = buffer.latent_dims is not None
    for value in range(12):
        n = 2
        obs = np.full((n, 1), value, dtype=np.float32) + np.arange(n)[:, None] / 10
        ends = np.array([value % 5 == 4, value % 7 == 6])
        extra = dict(deter=np.full((n, 2), value), stoch=np.full((n, 3), -value)) if latents else {}
        buffer.add(obs, np.eye(2, dtype=np.float32)[[value % 2] * n], obs[:, 0], ends & (value % 2 == 0), ends, ends, **extra)
    return buffer


@pytest.mark.parametrize("latent_dims", [None, (2, 3)])
def test_device_storage_samples_what_host_storage_samples(latent_dims):
    host, device = fill_both("host", latent_dims=latent_dims), fill_both("device", latent_dims=latent_dims)
    assert isinstance(device.observations, th.Tensor) and isinstance(host.observations, np.ndarray)
    assert device.is_first.dtype == th.bool and device.nbytes == host.nbytes
    for buffer in (host, device):
        buffer.truncate_last_trajectories()
    np.random.seed(3)
    a = host.sample(batch_size=8, sequence_length=4)
    np.random.seed(3)
    b = device.sample(batch_size=8, sequence_length=4)
    for name in SequenceSamples._fields:
        x, y = getattr(a, name), getattr(b, name)
        if isinstance(x, th.Tensor):
            assert x.dtype == y.dtype, name
            th.testing.assert_close(x, y, msg=name)
    if latent_dims is not None:
        for buffer in (host, device):
            buffer.update_latents(a.indices, th.full((8, 4, 2), 5.0), th.full((8, 4, 3), 6.0))
        np.testing.assert_array_equal(host.deter, device.deter.numpy())
        np.testing.assert_array_equal(host.stoch, device.stoch.numpy())


def test_device_storage_pickles_as_numpy_and_loads_back_on_the_device(tmp_path):
    buffer = fill_both("device", latent_dims=(2, 3))
    save_to_pkl(tmp_path / "replay.pkl", buffer)
    state = buffer.__getstate__()
    assert all(isinstance(state[key], np.ndarray) for key in ("observations", "actions", "is_first", "deter"))
    loaded = load_from_pkl(tmp_path / "replay.pkl")
    assert loaded.storage == "device" and isinstance(loaded.observations, th.Tensor)
    th.testing.assert_close(loaded.observations, buffer.observations)
    th.testing.assert_close(loaded.stoch, buffer.stoch)


@pytest.mark.skipif(not th.cuda.is_available(), reason="needs a CUDA device")
def test_device_storage_loads_onto_the_models_device(tmp_path):
    """A buffer with storage="device" saved by a CPU model and loaded into a CUDA one (or back): its
    rows move to the loading model's device."""
    cpu = make_model("CartPole-v1", learning_starts=10_000, replay_buffer_kwargs=dict(storage="device"), device="cpu")
    cpu.learn(40)
    cpu.save_replay_buffer(tmp_path / "replay.pkl")
    cuda = make_model("CartPole-v1", replay_buffer_kwargs=dict(storage="device"), device="cuda")
    cuda.load_replay_buffer(tmp_path / "replay.pkl")
    assert cuda.replay_buffer.observations.device.type == "cuda"
    assert cuda.replay_buffer.sample(4, 8).observations.device.type == "cuda"
    cuda.save_replay_buffer(tmp_path / "replay_cuda.pkl")
    cpu.load_replay_buffer(tmp_path / "replay_cuda.pkl")
    assert cpu.replay_buffer.observations.device.type == "cpu"


def test_buffer_to_moves_device_storage():
    buffer = fill_both("device", latent_dims=(2, 3))
    buffer.to("cpu")
    assert buffer.device == th.device("cpu") and buffer.observations.device.type == "cpu"
    assert buffer.sample(2, 3).observations.device.type == "cpu"


def test_dreamer_trains_with_replay_on_the_device():
    model = make_model("CartPole-v1", replay_buffer_kwargs=dict(storage="device"))
    model.learn(100)
    assert isinstance(model.replay_buffer.observations, th.Tensor) and model._n_updates > 0


@pytest.mark.parametrize("saved, wanted", [("host", "device"), ("device", "host")])
def test_load_replay_buffer_keeps_rows_where_the_model_asks(tmp_path, saved, wanted):
    """The loading model's storage decides where the rows live, not the file's."""
    model = make_model("CartPole-v1", learning_starts=10_000, replay_buffer_kwargs=dict(storage=saved))
    model.learn(40)
    model.save_replay_buffer(tmp_path / "replay.pkl")
    other = make_model("CartPole-v1", replay_buffer_kwargs=dict(storage=wanted))
    other.load_replay_buffer(tmp_path / "replay.pkl", truncate_last_traj=False)
    loaded = other.replay_buffer
    assert loaded.storage == wanted
    assert isinstance(loaded.observations, th.Tensor if wanted == "device" else np.ndarray)
    assert isinstance(loaded.is_last, th.Tensor if wanted == "device" else np.ndarray)
    rows = model.replay_buffer.size()
    saved_rows, loaded_rows = (b.observations[:rows] for b in (model.replay_buffer, loaded))
    as_numpy = [x.cpu().numpy() if isinstance(x, th.Tensor) else x for x in (saved_rows, loaded_rows)]
    np.testing.assert_array_equal(*as_numpy)
    other.learn(60)  # and it trains from it
    assert other._n_updates > 0


def test_rejects_unknown_storage():
    with pytest.raises(ValueError, match="storage must be one of"):
        SequenceReplayBuffer(16, OBS_SPACE, ACTION_SPACE, device="cpu", storage="disk")


def test_saved_device_maps_a_missing_gpu_to_one_that_is_here(monkeypatch):
    # A buffer kept on "cuda:1" (storage="device") and loaded on a machine with one GPU: its rows go to the
    # current GPU instead of failing in unpickling with an invalid device ordinal; without CUDA, to the CPU.
    assert saved_device("cpu") == th.device("cpu")
    monkeypatch.setattr(th.cuda, "is_available", lambda: False)
    assert saved_device("cuda:1") == th.device("cpu")
    monkeypatch.setattr(th.cuda, "is_available", lambda: True)
    monkeypatch.setattr(th.cuda, "device_count", lambda: 1)
    assert saved_device("cuda:1") == th.device("cuda") and saved_device("cuda:0") == th.device("cuda:0")
    assert saved_device("cuda") == th.device("cuda")
