"""save/load, set_env, get/set_parameters, policy save/load (mirrors SB3's and sb3-contrib's test_save_load)."""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
from collections import OrderedDict
from copy import deepcopy

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from stable_baselines3.common.env_util import make_vec_env

from sb3_dreamer import Dreamer, DreamerPolicy
from sb3_dreamer.save_util import partial_prefix

from .helpers import assert_state_dicts_equal, make_model, predict_sequence, time_limited

ENV_IDS = ["CartPole-v1", "Pendulum-v1"]


@pytest.fixture(scope="module", params=ENV_IDS)
def trained(request, tmp_path_factory):
    """A tiny model trained for 100 steps (a dozen updates) and saved; shared by the tests of this module."""
    model = make_model(request.param, seed=0)
    model.learn(100)
    path = tmp_path_factory.mktemp("save") / "dreamer.zip"
    model.save(path)
    return model, path


def observations(model: Dreamer, n: int = 8, seed: int = 0) -> list[np.ndarray]:
    """A fixed list of batched observations of the model's observation space."""
    space = deepcopy(model.observation_space)
    space.seed(seed)
    return [space.sample()[None] for _ in range(n)]


def assert_same_predictions(a, b, obs: list[np.ndarray]) -> None:
    """Deterministic predictions along ``obs`` carrying the state, then from the same explicit state."""
    actions_a, state_a = predict_sequence(a, obs)
    actions_b, state_b = predict_sequence(b, obs)
    for x, y in zip(actions_a, actions_b):
        np.testing.assert_allclose(x, y, atol=1e-4)
    for x, y in zip(state_a, state_b):
        np.testing.assert_allclose(x, y, atol=1e-4)
    np.testing.assert_allclose(
        a.predict(obs[0], state=state_a, deterministic=True)[0], b.predict(obs[0], state=state_a, deterministic=True)[0]
    )


def test_save_load(trained):
    model, path = trained
    loaded = Dreamer.load(path, env=make_vec_env(model.env.envs[0].spec.id), device="cpu")
    assert_state_dicts_equal(loaded.policy.state_dict(), model.policy.state_dict())
    assert_same_predictions(model, loaded, observations(model))
    assert loaded.num_timesteps == model.num_timesteps == 100
    assert loaded._n_updates == model._n_updates > 0
    assert loaded.policy_kwargs == model.policy_kwargs
    assert loaded.replay_buffer.size() == 0  # the replay buffer is saved separately
    # Training state: the optimiser's moments and the return-percentile EMAs come back.
    assert model.policy.optimizer.state_dict()["state"], "no optimiser state to compare"
    assert_state_dicts_equal(loaded.policy.optimizer.state_dict(), model.policy.optimizer.state_dict())
    assert model.policy.return_high.item() != 0.0
    assert loaded.policy.return_low.item() == model.policy.return_low.item()
    assert loaded.policy.return_high.item() == model.policy.return_high.item()
    # ... and training goes on.
    loaded.learn(60, reset_num_timesteps=False)
    assert loaded.num_timesteps == 160 and loaded._n_updates > model._n_updates


def test_load_without_env_predicts(trained):
    model, path = trained
    loaded = Dreamer.load(path)
    assert loaded.get_env() is None
    assert_same_predictions(model, loaded, observations(model))


def test_load_refuses_speed_options_the_device_cannot_honour(trained):
    _, path = trained
    with pytest.raises(ValueError, match="cuda_graph=True needs a CUDA device"):
        Dreamer.load(path, device="cpu", cuda_graph=True)
    assert Dreamer.load(path, device="cpu", cuda_graph=False).uses_cuda_graph is False
    with pytest.raises(ValueError, match="precision must be"):
        Dreamer.load(path, device="cpu", precision="float16")


def test_load_checks_the_arguments_passed_as_the_constructor_does(trained):
    _, path = trained
    with pytest.raises(ValueError, match=r"Dreamer.load: batch_size must be an integer >= 1, got 0; gamma must be a number in \[0, 1\], got 1.5"):
        Dreamer.load(path, batch_size=0, gamma=1.5)
    assert Dreamer.load(path, batch_size=3).batch_size == 3


def test_load_of_another_algorithms_model_raises(tmp_path):
    from stable_baselines3 import SAC

    SAC("MlpPolicy", "Pendulum-v1", buffer_size=100).save(tmp_path / "sac")
    with pytest.raises(ValueError, match=r"Dreamer needs one of its own policies .*SACPolicy.*e\.g\. SAC\.load"):
        Dreamer.load(tmp_path / "sac")


def test_learn_without_env_names_the_fix(trained):
    _, path = trained
    with pytest.raises(ValueError, match=r"no env to learn from .*model.set_env\(env\)"):
        Dreamer.load(path).learn(10)


def test_load_checks_only_the_speed_options_passed(trained, tmp_path):
    """A speed option saved with a model adapts to the device it loads on, also when another speed
    option is passed to load: only the passed ones are checked (as the constructor checks its own)."""
    model, _ = trained
    saved_option, model.cuda_graph = model.cuda_graph, True  # as if trained on a GPU with cuda_graph=True
    try:
        model.save(tmp_path / "gpu_model")
    finally:
        model.cuda_graph = saved_option
    loaded = Dreamer.load(tmp_path / "gpu_model", device="cpu", precision="float32")
    assert loaded.cuda_graph is True and not loaded.uses_cuda_graph and loaded.precision == "float32"
    assert_same_predictions(model, loaded, observations(model))
    with pytest.raises(ValueError, match="cuda_graph=True needs a CUDA device"):
        Dreamer.load(tmp_path / "gpu_model", device="cpu", precision="float32", cuda_graph=True)


def test_load_with_more_envs_then_learn(trained):
    model, path = trained
    env_id = model.env.envs[0].spec.id
    loaded = Dreamer.load(path, env=make_vec_env(time_limited(env_id, 20), n_envs=2))
    assert loaded.n_envs == 2 and loaded.replay_buffer.n_envs == 2
    loaded.learn(40, reset_num_timesteps=False)
    assert loaded.num_timesteps == 140 and loaded._n_updates > model._n_updates


def test_load_force_reset(trained):
    model, path = trained
    env = make_vec_env(model.env.envs[0].spec.id)
    assert Dreamer.load(path, env=env)._last_obs is None
    kept = Dreamer.load(path, env=env, force_reset=False)
    np.testing.assert_array_equal(kept._last_obs, model._last_obs)


def test_set_env():
    model = make_model("CartPole-v1", learning_starts=40)
    model.learn(64)
    model.set_env(make_vec_env("CartPole-v1"))
    assert model._last_obs is None  # forced reset
    model.learn(64)
    assert model.num_timesteps == 64
    model.set_env(gym.make("CartPole-v1"))
    model.learn(64, reset_num_timesteps=False)
    assert model.num_timesteps == 128
    with pytest.raises(AssertionError, match="number of environments"):
        model.set_env(make_vec_env("CartPole-v1", n_envs=2))


def test_get_parameters_names():
    params = make_model("CartPole-v1").get_parameters()
    assert set(params) == {"policy", "policy.optimizer"}
    # SB3's tests randomise every state dict whose name lacks "optim": all policy entries must be float tensors.
    assert all(isinstance(v, th.Tensor) and v.is_floating_point() for v in params["policy"].values())


def test_set_parameters_errors_and_values():
    model = make_model("CartPole-v1", learning_starts=40)
    model.learn(64)
    original = deepcopy(model.get_parameters())  # state_dict() tensors share storage with the model

    with pytest.raises(ValueError, match="invalid object name"):  # bogus key
        model.set_parameters({"I should not be here": {"a": 1}}, exact_match=False)
    with pytest.raises(ValueError, match="do not match"):  # missing object
        model.set_parameters({k: v for k, v in list(original.items())[:-1]}, exact_match=True)
    missing_tensor = {name: OrderedDict(list(sd.items())[:-1]) for name, sd in original.items()}
    with pytest.raises(RuntimeError, match="Missing key"):  # missing tensor
        model.set_parameters(missing_tensor, exact_match=True)

    random_params = {
        name: sd if "optim" in name else OrderedDict((k, th.rand_like(v)) for k, v in sd.items())
        for name, sd in original.items()
    }
    model.set_parameters(random_params, exact_match=True)
    for key, value in model.get_parameters()["policy"].items():
        assert th.equal(value, random_params["policy"][key])
        assert not th.equal(value, original["policy"][key]), key
    model.learn(16, reset_num_timesteps=False)


def test_save_exclude_include(tmp_path):
    model = make_model("CartPole-v1", verbose=2, learning_starts=7)
    path = tmp_path / "dreamer.zip"
    model.save(path, exclude=["verbose", "learning_starts"])
    loaded = Dreamer.load(path)
    assert loaded.verbose != 2 and loaded.learning_starts != 7
    model.save(path, exclude=["verbose"], include=["verbose"])
    assert Dreamer.load(path).verbose == 2


def test_deepcopy_and_pickle_after_parallel_backward():
    # SB3's algorithms can be deep-copied (e.g. to keep the best model in memory); ours holds a worker thread.
    model = make_model("Pendulum-v1", parallel_backward=True)
    model.learn(100)
    assert model._backward_pool is not None
    copied = deepcopy(model)
    assert copied._backward_pool is None and model._backward_pool is not None
    assert_state_dicts_equal(copied.policy.state_dict(), model.policy.state_dict())
    copied.learn(40, reset_num_timesteps=False)  # trains on its own thread
    assert copied.num_timesteps == 140 and copied._backward_pool is not model._backward_pool
    unpickled = pickle.loads(pickle.dumps(model))
    assert_state_dicts_equal(unpickled.policy.state_dict(), model.policy.state_dict())


def test_a_copy_of_a_compiled_model_compiles_its_own_methods():
    # A torch.compile'd method holds the module it was made from: copied as it is, the copy's actor
    # (and observe and imagine steps) would run the original's weights.
    model = make_model("Pendulum-v1", compile_steps=True, compile_losses=True)
    for copied in (deepcopy(model), pickle.loads(pickle.dumps(model))):
        net, original = copied.policy.actor.net, model.policy.actor.net
        assert net._compiled_methods == ("forward",) and "forward" in vars(net)
        assert set(copied.policy._compiled_methods) == set(model.policy._compiled_methods)
        with th.no_grad():
            for p in net.parameters():
                p.add_(0.5)
            feat = th.randn(3, copied.policy.world_model.rssm.feat_dim)
            expected = type(net).forward(net, feat)  # eager, the copy's weights
            np.testing.assert_allclose(net(feat).numpy(), expected.numpy(), rtol=1e-5, atol=1e-5)
            assert not th.allclose(original(feat), expected)


def test_a_save_stopped_midway_leaves_the_previous_files(tmp_path, monkeypatch):
    import stable_baselines3.common.base_class as base_class
    from stable_baselines3.common import save_util

    model = make_model("CartPole-v1", learning_starts=20)
    model.learn(30)
    model.save(tmp_path / "model")  # SB3's suffix rule: model.zip
    model.save_replay_buffer(tmp_path / "replay")  # replay.pkl
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert set(before) == {"model.zip", "replay.pkl"}

    def stopped(path, *args, **kwargs):  # writes part of the file, then fails (a full disk, an error, a kill)
        with open(path, "wb") as f:
            f.write(b"PK partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(base_class, "save_to_zip_file", stopped)
    monkeypatch.setattr(save_util.pickle, "dump", lambda obj, file, protocol=None: (file.write(b"partial"), stopped(file.name)))
    model.learn(10, reset_num_timesteps=False)
    for save, name in ((model.save, "model"), (model.save_replay_buffer, "replay")):
        with pytest.raises(OSError, match="No space left"):
            save(tmp_path / name)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # intact, and no partial files left
    monkeypatch.undo()
    assert Dreamer.load(tmp_path / "model.zip").num_timesteps == 30
    model.save(tmp_path / "model.zip")  # a complete save replaces the file
    assert Dreamer.load(tmp_path / "model.zip").num_timesteps == 40 and len(list(tmp_path.iterdir())) == 2


def test_a_killed_saves_partial_file_goes_at_the_next_save(tmp_path):
    # A kill (SIGTERM, SIGKILL) runs no cleanup, so its temporary file stays beside the target until the next
    # save there, which deletes those of processes that no longer run on this machine and keeps the others.
    model = make_model("CartPole-v1")
    final = tmp_path / "model.zip"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"{partial_prefix(final)}{dead.pid}.partial"
    running = tmp_path / f"{partial_prefix(final)}{os.getppid()}.partial"  # a save in progress in another process
    elsewhere = tmp_path / f".model.zip.another-machine-{dead.pid}.partial"  # on a shared disk
    for path in (stale, running, elsewhere):
        path.write_bytes(b"partial")
    model.save(final)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["model.zip", running.name, elsewhere.name])


def test_save_to_a_long_file_name(tmp_path):
    # 250 bytes: a valid name, whose temporary file's name must stay under the 255-byte limit
    model = make_model("CartPole-v1", learning_starts=5)
    model.learn(10)
    model.save(tmp_path / ("m" * 246 + ".zip"))
    model.save_replay_buffer(tmp_path / ("r" * 246 + ".pkl"))
    model.policy.save(tmp_path / ("p" * 250))
    assert Dreamer.load(tmp_path / ("m" * 246 + ".zip")).num_timesteps == 10
    assert len(list(tmp_path.iterdir())) == 3


def test_policy_save_stopped_midway_leaves_the_previous_file(trained, tmp_path, monkeypatch):
    model, _ = trained
    path = tmp_path / "policy.pth"
    model.policy.save(path)
    before = path.read_bytes()

    def stopped(obj, f, *args, **kwargs):
        with open(f, "wb") as file:
            file.write(b"partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(th, "save", stopped)
    with pytest.raises(OSError, match="No space left"):
        model.policy.save(path)
    assert path.read_bytes() == before and list(tmp_path.iterdir()) == [path]


def test_save_to_file_object():
    model = make_model("CartPole-v1")
    buffer = io.BytesIO()
    model.save(buffer)
    buffer.seek(0)
    loaded = Dreamer.load(buffer)
    assert_state_dicts_equal(loaded.policy.state_dict(), model.policy.state_dict())


def test_policy_save_load(trained, tmp_path):
    model, _ = trained
    path = tmp_path / "policy.pkl"
    model.policy.save(path)
    policy = DreamerPolicy.load(path)
    assert_state_dicts_equal(policy.state_dict(), model.policy.state_dict())
    obs = observations(model)
    actions_model, state_model = predict_sequence(model, obs)
    actions_policy, state_policy = predict_sequence(policy, obs)
    for x, y in zip(actions_model, actions_policy):
        np.testing.assert_array_equal(x, y)
    for x, y in zip(state_model, state_policy):
        np.testing.assert_array_equal(x, y)


def test_load_does_not_reset_counters(trained):
    model, path = trained
    loaded = Dreamer.load(path)
    assert model._episode_num > 0 or model.env.get_attr("spec")[0].id == "Pendulum-v1"  # no episode ends in 100 steps
    assert loaded._episode_num == model._episode_num
    assert loaded._update_credit == pytest.approx(model._update_credit)
    assert loaded.seed == model.seed == 0
