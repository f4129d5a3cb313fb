"""Seeing the dreams: open-loop predictions, the PNG helper and the TensorBoard callback."""

import struct

import numpy as np
import pytest
import torch as th
from gymnasium import spaces

from sb3_dreamer.dreams import DreamCallback, plot_dream, to_observation_units, within_one_episode
from sb3_dreamer.functional import symlog
from sb3_dreamer.networks.encoders import vector_values

from .helpers import assert_state_dicts_equal, counting_env, make_model


def _sequence(model, steps=12):
    model.learn(120)
    data = model.replay_buffer.sample(1, steps)
    return data.observations.numpy(), data.actions.numpy(), data.rewards.numpy()


def test_dream_shapes_and_open_loop():
    model = make_model("CartPole-v1", seed=0)
    obs, actions, _ = _sequence(model)
    th.manual_seed(0)  # latents are sampled: compare dreams under the same seed
    predicted = model.policy.dream(obs, actions, context=4)
    assert predicted.observations.shape == (1, 8, 4) and predicted.rewards.shape == predicted.continues.shape == (1, 8)
    assert ((predicted.continues >= 0) & (predicted.continues <= 1)).all()
    # Open loop: observations after the context are never read; the actions are.
    changed_obs = obs.copy()
    changed_obs[:, 4:] += 10.0
    th.manual_seed(0)
    np.testing.assert_allclose(model.policy.dream(changed_obs, actions, 4).observations, predicted.observations)
    changed_actions = actions.copy()
    changed_actions[:, 5:] = 1.0 - changed_actions[:, 5:]
    th.manual_seed(0)
    a = model.policy.dream(obs, actions, 4).observations
    th.manual_seed(0)
    b = model.policy.dream(obs, changed_actions, 4).observations
    # Step t is predicted from the action taken at t - 1: the change at 5 first shows at step 6 (dream index 2).
    np.testing.assert_array_equal(a[:, :2], b[:, :2])
    assert not np.allclose(a[:, 2:], b[:, 2:])
    # The context observations are read: changing them changes the dream.
    changed_context = obs.copy()
    changed_context[:, :4] += 1.0
    th.manual_seed(0)
    assert not np.allclose(model.policy.dream(changed_context, actions, 4).observations, a)
    # 2-D input is one sequence.
    assert model.policy.dream(obs[0], actions[0], 4).observations.shape == (1, 8, 4)


def test_dream_checks_its_inputs():
    model = make_model("CartPole-v1", seed=0)
    obs, actions, _ = _sequence(model)
    with pytest.raises(ValueError, match="context"):
        model.policy.dream(obs, actions, context=12)
    with pytest.raises(ValueError, match="actions"):
        model.policy.dream(obs, actions[:, :5], context=2)
    with pytest.raises(ValueError, match=r"observations must have shape \[B, T, \*\(4,\)\] or \[T, \*\(4,\)\] .*got \(1, 12, 3\)"):
        model.policy.dream(obs[..., :3], actions, context=2)  # a matmul shape error deep inside before


def test_plot_dream_writes_a_png_of_the_expected_size(tmp_path):
    model = make_model("CartPole-v1", seed=0)
    obs, actions, rewards = _sequence(model)
    path = plot_dream(tmp_path / "dream.png", obs, model.policy.dream(obs, actions, 4), 4, rewards=rewards)
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", header[16:24])
    assert (width, height) == (1280, 480)  # 4 observation panels + rewards: 4 x 2 panels of 3.2 x 2.4 in at 100 dpi


def test_plot_dream_leaves_the_users_matplotlib_backend_and_figures_alone(tmp_path):
    """A notebook's or GUI's backend stays (it used to be switched to Agg), and no pyplot figure is left open."""
    import matplotlib
    import matplotlib.pyplot as plt

    model = make_model("CartPole-v1", seed=0)
    obs, actions, rewards = _sequence(model)
    before = matplotlib.get_backend()
    matplotlib.use("pdf")  # a backend of the user's, other than Agg
    try:
        plot_dream(tmp_path / "dream.png", obs, model.policy.dream(obs, actions, 4), 4, rewards=rewards)
        assert matplotlib.get_backend() == "pdf" and plt.get_fignums() == []
    finally:
        matplotlib.use(before)


def test_dream_callback_logs_a_picture_to_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = make_model("CartPole-v1", seed=0, tensorboard_log=str(tmp_path))
    model.learn(160, callback=DreamCallback(log_freq=80, sequence_length=12, context=4), log_interval=1)
    runs = list(tmp_path.iterdir())
    events = EventAccumulator(str(runs[0]), size_guidance={"images": 0}).Reload()
    assert "dream/predictions" in events.Tags()["images"]


def test_within_one_episode_picks_a_window_with_no_later_episode_start():
    is_first = np.array([[1, 0, 1, 0], [0, 0, 0, 1], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=bool)
    assert within_one_episode(is_first) == 2
    assert within_one_episode(is_first[[0, 1, 3]]) == 2
    assert within_one_episode(is_first[:2]) is None


def test_dream_callback_warns_when_episodes_are_shorter_than_its_window():
    model = make_model(counting_env(max_episode_steps=5), seed=0)
    with pytest.warns(UserWarning, match="stays inside one episode"):
        model.learn(120, callback=DreamCallback(log_freq=100, sequence_length=12, context=4))


@pytest.mark.parametrize(
    "space",
    [spaces.Discrete(4, start=1), spaces.MultiDiscrete([2, 3], start=[0, -1]), spaces.MultiBinary(3), spaces.Box(-2, 2, (2, 3))],
    ids=["discrete", "multidiscrete", "multibinary", "box"],
)
def test_predictions_in_model_units_map_back_to_observations(space):
    # The decoder predicts symlog(vector_values(obs)); a perfect prediction maps back to the observation.
    space.seed(0)
    obs = np.stack([space.sample() for _ in range(6)]).reshape(2, 3, *space.shape)
    pred = symlog(vector_values(th.as_tensor(obs, dtype=th.float32), space))
    back = to_observation_units(pred, space, image=False, normalize_images=True)
    assert back.shape == obs.shape
    np.testing.assert_allclose(back, obs, rtol=1e-5, atol=1e-5)


def test_dream_callback_does_not_disturb_training(monkeypatch):
    """Its replayed windows and the dream's samples draw from generators restored afterwards: the
    same seed trains the same model with or without it (as EvalCallback's test checks)."""
    import sb3_dreamer.dreams as dreams

    pictures = []
    figure = dreams.dream_figure
    monkeypatch.setattr(dreams, "dream_figure", lambda *args: pictures.append(1) or figure(*args))

    def train(callback=None):
        model = make_model("CartPole-v1", learning_starts=30, seed=0)
        return model.learn(80, callback=callback)

    with_dreams, without = train(DreamCallback(log_freq=20, sequence_length=10, context=4)), train()
    assert len(pictures) >= 2 and with_dreams._n_updates == without._n_updates > 0
    np.testing.assert_array_equal(with_dreams.replay_buffer.actions, without.replay_buffer.actions)
    assert_state_dicts_equal(with_dreams.policy.state_dict(), without.policy.state_dict())
