"""Image and Dict observations: CnnLatentPolicy, MultiInputLatentPolicy, uint8 replay, dreams of images."""

from __future__ import annotations

import struct
import warnings
from copy import deepcopy

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from gymnasium import spaces
from stable_baselines3.common.envs import FakeImageEnv, SimpleMultiObsEnv

from sb3_dreamer import CnnLatentPolicy, Dreamer, MultiInputLatentPolicy
from sb3_dreamer.buffers import SequenceReplayBuffer
from sb3_dreamer.dreams import plot_dream
from sb3_dreamer.networks.encoders import ConvEncoder, MultiEncoder
from sb3_dreamer.networks.world_model import WorldModel
from sb3_dreamer.optimizers import LaProp

from .helpers import TINY_KWARGS, TINY_POLICY_KWARGS, TINY_RSSM_KWARGS, SpaceEnv, assert_state_dicts_equal, predict_sequence

# 16 x 16 images through a CNN of depth 2: two stages (8 x 8, 4 x 4), 4 channels at the end.
TINY_IMAGE_KWARGS = dict(TINY_POLICY_KWARGS, image_size=16, depth=2)


def make_image_model(env, policy="CnnPolicy", policy_kwargs=None, **kwargs) -> Dreamer:
    return Dreamer(policy, env, policy_kwargs={**TINY_IMAGE_KWARGS, **(policy_kwargs or {})}, **{**TINY_KWARGS, **kwargs})


class DictCountingEnv(gym.Env):
    """Dict observations: "img" a 1 x 12 x 12 uint8 image filled with 10 * t (channel-last when asked),
    "vec" [t, last action]. The reward leading to step t is t; episodes terminate at step 5."""

    def __init__(self, channel_last: bool = False) -> None:
        super().__init__()
        self.shape = (12, 12, 1) if channel_last else (1, 12, 12)
        self.observation_space = spaces.Dict(
            img=spaces.Box(0, 255, self.shape, dtype=np.uint8),
            vec=spaces.Box(-1.0, 100.0, (2,), dtype=np.float32),
        )
        self.action_space = spaces.Discrete(2)
        self.t = 0

    def _obs(self, action: int) -> dict[str, np.ndarray]:
        return dict(img=np.full(self.shape, 10 * self.t, dtype=np.uint8), vec=np.array([self.t, action], dtype=np.float32))

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.t = 0
        return self._obs(-1), {}

    def step(self, action):
        self.t += 1
        return self._obs(int(action)), float(self.t), self.t >= 5, False, {}


@pytest.fixture(scope="module")
def dict_model():
    model = make_image_model(DictCountingEnv(channel_last=True), "MultiInputPolicy", seed=0)
    model.learn(120)
    return model


def observations(space: spaces.Space, n: int = 5) -> list:
    space = deepcopy(space)
    space.seed(0)
    if isinstance(space, spaces.Dict):
        return [{k: v[None] for k, v in space.sample().items()} for _ in range(n)]
    return [space.sample()[None] for _ in range(n)]


# ------------------------------------------------------------------------------------ learning, predict
@pytest.mark.parametrize("channel_first", [False, True], ids=["channel-last", "channel-first"])
@pytest.mark.parametrize("discrete", [True, False], ids=["discrete", "box"])
def test_learn_on_image_env(channel_first, discrete):
    env = FakeImageEnv(screen_height=20, screen_width=20, n_channels=3, discrete=discrete, channel_first=channel_first)
    model = make_image_model(env, seed=0)
    assert isinstance(model.policy, CnnLatentPolicy)
    assert model.observation_space.shape == (3, 20, 20)  # channel-first (SB3's VecTransposeImage)
    model.learn(150)
    assert model._n_updates > 0
    assert model.replay_buffer.observations.dtype == np.uint8
    assert model.replay_buffer.observations.shape[2:] == (3, 20, 20)
    # predict takes the env's own layout, one observation or a batch, and keeps the state's shapes.
    obs = env.observation_space.sample()
    action, state = model.predict(obs, deterministic=True)
    assert env.action_space.contains(action)
    actions, state = model.predict(np.stack([obs, obs, obs]), state=None, deterministic=True)
    assert actions.shape == (3, *env.action_space.shape)
    assert [s.shape[0] for s in state] == [3, 3, 3]


def test_learn_on_dict_env_stores_terminal_observations(dict_model):
    model = dict_model
    assert isinstance(model.policy, MultiInputLatentPolicy)
    assert model._n_updates > 0
    buffer = model.replay_buffer
    img, vec = buffer.observations["img"], buffer.observations["vec"]
    assert img.dtype == np.uint8 and img.shape[2:] == (1, 12, 12) and vec.dtype == np.float32
    rows = buffer.count[0]
    t = vec[:rows, 0, 0]
    np.testing.assert_array_equal(img[:rows, 0].reshape(rows, -1).max(-1), 10 * t)  # the keys stay aligned
    np.testing.assert_array_equal(buffer.rewards[:rows, 0], t)
    last = buffer.is_last[:rows, 0]
    assert last.any()
    np.testing.assert_array_equal(t[last], 5)  # the final row holds the true terminal observation
    assert buffer.is_terminal[:rows, 0][last].all()
    samples = buffer.sample(2, 6)
    assert set(samples.observations) == {"img", "vec"}
    assert samples.observations["img"].dtype == th.uint8 and samples.observations["img"].shape == (2, 6, 1, 12, 12)
    assert samples.observations["vec"].shape == (2, 6, 2)
    obs = {"img": np.zeros((12, 12, 1), dtype=np.uint8), "vec": np.zeros(2, dtype=np.float32)}
    action, state = model.predict(obs, deterministic=True)
    assert model.action_space.contains(action) and state[0].shape[0] == 1


def test_simple_multi_obs_env_learns():
    model = make_image_model(SimpleMultiObsEnv(), "MultiInputLatentPolicy", seed=0, learning_starts=20)
    model.learn(60)
    assert model._n_updates > 0 and model.replay_buffer.observations["img"].shape[2:] == (1, 64, 64)


# ------------------------------------------------------------------------------------ save / load
def test_save_load_identical_predictions(tmp_path, dict_model):
    cnn = make_image_model(FakeImageEnv(screen_height=16, screen_width=16, n_channels=1), seed=1)
    cnn.learn(80)
    for model in (cnn, dict_model):
        model.save(tmp_path / "model.zip")
        loaded = Dreamer.load(tmp_path / "model.zip", device="cpu")
        assert type(loaded.policy) is type(model.policy)
        assert loaded.policy_kwargs == model.policy_kwargs
        assert_state_dicts_equal(loaded.policy.state_dict(), model.policy.state_dict())
        obs = observations(model.observation_space)
        for a, b in zip(predict_sequence(model, obs)[0], predict_sequence(loaded, obs)[0]):
            np.testing.assert_array_equal(a, b)


def test_replay_buffer_round_trip(tmp_path, dict_model):
    dict_model.save_replay_buffer(tmp_path / "replay.pkl")
    loaded = make_image_model(DictCountingEnv(channel_last=True), "MultiInputPolicy")
    loaded.load_replay_buffer(tmp_path / "replay.pkl", truncate_last_traj=False)
    for key in ("img", "vec"):
        np.testing.assert_array_equal(loaded.replay_buffer.observations[key], dict_model.replay_buffer.observations[key])
    assert loaded.replay_buffer.observations["img"].dtype == np.uint8


# ------------------------------------------------------------------------------------ replay memory
def test_replay_stores_images_as_uint8_and_counts_their_bytes():
    space = spaces.Box(0, 255, (3, 64, 64), dtype=np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a full buffer may not fit this machine: it is never allocated here
        full = SequenceReplayBuffer(1_000_000, space, spaces.Discrete(6), device="cpu")
    assert full.nbytes == 1_000_000 * (3 * 64 * 64 + 4 * (6 + 1) + 3)
    assert full.nbytes < 13e9
    buffer = SequenceReplayBuffer(100, spaces.Dict(img=space, vec=spaces.Box(-1, 1, (5,))), spaces.Discrete(6), device="cpu")
    obs = {"img": np.full((1, 3, 64, 64), 200, dtype=np.uint8), "vec": np.zeros((1, 5))}
    buffer.add(obs, np.eye(6)[:1], np.zeros(1), np.ones(1, bool), np.zeros(1, bool), np.zeros(1, bool))
    flags = [buffer.is_first, buffer.is_last, buffer.is_terminal]
    arrays = [*buffer.observations.values(), buffer.actions, buffer.rewards, *flags]
    assert sum(a.nbytes for a in arrays) == buffer.nbytes == 100 * (3 * 64 * 64 + 4 * 5 + 4 * 7 + 3)
    assert buffer.observations["img"].dtype == np.uint8 and buffer.observations["img"][0, 0].max() == 200


# ------------------------------------------------------------------------------------ networks
def test_conv_encoder_shapes_and_resizing():
    encoder = ConvEncoder(3, depth=4, image_size=32)  # 32 -> 16 -> 8 -> 4: channels 4, 8, 16
    assert encoder(th.rand(2, 5, 3, 32, 32)).shape == (2, 5, 16 * 4 * 4) == (2, 5, encoder.out_dim)
    space = spaces.Dict(a=spaces.Box(0, 255, (1, 40, 40), np.uint8), b=spaces.Box(0, 255, (2, 40, 40), np.uint8),
                        c=spaces.Box(0, 255, (3, 24, 24), np.uint8), v=spaces.Box(-1, 1, (2, 3)))  # fmt: skip
    multi = MultiEncoder(space, units=8, layers=1, depth=2, image_size=16)
    assert multi.image_groups == [["a", "b"], ["c"]] and multi.vector_keys == ["v"]  # same size: one CNN
    assert [cnn.convs[0].in_channels for cnn in multi.cnns] == [3, 3]
    obs = {key: th.as_tensor(np.stack([sub.sample() for _ in range(4)])) for key, sub in space.spaces.items()}
    inputs = multi.prepare(obs)
    assert inputs["a"].shape == (4, 1, 16, 16) and 0.0 <= inputs["a"].min() and inputs["a"].max() <= 1.0
    assert inputs["v"].shape == (4, 6)
    assert multi(inputs).shape == (4, multi.embed_dim) and multi.embed_dim == 8 + 2 * (4 * 16)
    with pytest.raises(ValueError, match="image_size"):
        ConvEncoder(3, image_size=48)


def test_normalize_images_false_uses_images_as_stored(tmp_path):
    space = spaces.Box(0.0, 1.0, (1, 16, 16), dtype=np.float32)
    encoder = MultiEncoder(space, depth=2, image_size=16, normalize_images=False)
    obs = th.rand(2, 1, 16, 16)
    th.testing.assert_close(encoder.prepare(obs)["obs"], obs)
    env = SpaceEnv(space, spaces.Discrete(2))
    model = make_image_model(env, policy_kwargs=dict(normalize_images=False))
    model.learn(60)
    assert model.replay_buffer.observations.dtype == np.float32 and model._n_updates > 0
    model.save(tmp_path / "model.zip")
    loaded = Dreamer.load(tmp_path / "model.zip", env=env, device="cpu")  # the float image space is accepted
    assert loaded.policy.normalize_images is False


def test_image_world_model_overfits_a_fixed_batch():
    th.manual_seed(0)
    space = spaces.Box(0, 255, (3, 16, 16), np.uint8)
    wm = WorldModel(space, 2, units=8, depth=4, image_size=16, **TINY_RSSM_KWARGS)
    gen = th.Generator().manual_seed(0)
    ramps = th.linspace(0, 255, 16) * th.rand(2, 8, 3, 1, 1, generator=gen)  # smooth images: horizontal ramps
    batch = (ramps.expand(2, 8, 3, 16, 16).to(th.uint8), th.zeros(2, 8, 2), th.zeros(2, 8), th.zeros(2, 8), th.zeros(2, 8))
    optimizer = LaProp(wm.parameters(), lr=3e-3, warmup=0)
    losses = []
    for _ in range(30):
        out = wm.loss(*batch, gamma=0.99)
        optimizer.zero_grad()
        out.loss.mean().backward()
        optimizer.step()
        losses.append(out.metrics["rec_loss"].item())
    assert losses[-1] < 0.3 * losses[0], losses


def test_decoder_keys_restrict_the_reconstruction_loss():
    space = spaces.Dict(img=spaces.Box(0, 255, (1, 16, 16), np.uint8), vec=spaces.Box(-1, 1, (3,)))
    gen = th.Generator().manual_seed(0)
    obs = dict(img=th.randint(0, 256, (2, 4, 1, 16, 16), generator=gen, dtype=th.uint8), vec=th.randn(2, 4, 3, generator=gen))
    batch = (th.zeros(2, 4, 2), th.zeros(2, 4), th.zeros(2, 4), th.zeros(2, 4))

    def rec_loss(wm: WorldModel, changed: str | None) -> float:
        x = dict(obs)
        if changed is not None:  # change what the decoder must reconstruct, not what the encoder sees
            x[changed] = obs[changed] // 2 if changed == "img" else obs[changed] * 3
        th.manual_seed(0)
        inputs = wm.encoder.prepare(obs)
        deter, stoch, _ = wm.rssm.observe(wm.encoder(inputs), batch[0], batch[2])
        return wm.decoder.loss(th.cat([deter, stoch], -1), wm.encoder.prepare(x)).sum().item()

    for keys, ignored in ((["vec"], "img"), (["img"], "vec")):
        th.manual_seed(0)
        wm = WorldModel(space, 2, units=8, depth=2, image_size=16, decoder_keys=keys, **TINY_RSSM_KWARGS)
        assert list(wm.decoder(th.zeros(1, wm.rssm.feat_dim))) == keys
        assert rec_loss(wm, ignored) == rec_loss(wm, None)
        assert rec_loss(wm, keys[0]) != rec_loss(wm, None)
        assert th.isfinite(wm.loss(obs, *batch, gamma=0.99).loss).all()
    with pytest.raises(ValueError, match="choose among"):
        WorldModel(space, 2, units=8, decoder_keys=["nope"], **TINY_RSSM_KWARGS)


# ------------------------------------------------------------------------------------ spaces
IMAGE = spaces.Box(0, 255, (16, 16, 3), dtype=np.uint8)
VECTOR = spaces.Box(-1, 1, (3,), dtype=np.float32)


@pytest.mark.parametrize(
    "policy, space, match",
    [
        ("MlpPolicy", IMAGE, "use CnnLatentPolicy"),
        ("MultiInputPolicy", IMAGE, "use CnnLatentPolicy"),
        ("CnnPolicy", VECTOR, "use MlpLatentPolicy"),
        ("MlpLatentPolicy", spaces.Dict(img=IMAGE, vec=VECTOR), "use MultiInputLatentPolicy"),
        ("CnnLatentPolicy", spaces.Dict(img=IMAGE), "use MultiInputLatentPolicy"),
        ("MultiInputPolicy", spaces.Dict(img=IMAGE, inner=spaces.Dict(vec=VECTOR)), "Dict"),
        ("MultiInputPolicy", spaces.Dict(img=IMAGE, t=spaces.Tuple([spaces.Discrete(3)])), "Tuple"),
        ("CnnPolicy", spaces.Discrete(3), "use MlpLatentPolicy"),
        ("CnnPolicy", spaces.Box(0.0, 1.0, (16, 16, 3), np.float32), r"uint8 Boxes with bounds \[0, 255\].*normalize_images=False"),
        ("CnnPolicy", spaces.Box(0, 255, (16, 16), np.uint8), r"give \(16, 16\) a channel axis"),
    ],
)
def test_unsupported_observation_spaces_raise(policy, space, match):
    with pytest.raises(ValueError, match=match):
        make_image_model(SpaceEnv(space, spaces.Discrete(2)), policy)


@pytest.mark.parametrize("dict_obs", [False, True], ids=["box", "dict"])
def test_channel_last_float_images_are_refused_with_a_fix_that_works(dict_obs):
    """SB3 transposes only uint8 images: a channel-last float one (an image with normalize_images=False)
    must come channel-first, and the message says how, not "wrap it in VecTransposeImage" (which refuses it)."""
    image = spaces.Box(0.0, 1.0, (16, 16, 3), dtype=np.float32)
    space, policy = (spaces.Dict(img=image, vec=VECTOR), "MultiInputPolicy") if dict_obs else (image, "CnnPolicy")
    with pytest.raises(ValueError, match=r"channel-first .*transposes only uint8 images.*np\.moveaxis"):
        make_image_model(SpaceEnv(space, spaces.Discrete(2)), policy, policy_kwargs=dict(normalize_images=False))


# ------------------------------------------------------------------------------------ dreams
def test_dream_and_plot_of_images(tmp_path, dict_model):
    cnn = make_image_model(FakeImageEnv(screen_height=20, screen_width=20, n_channels=3), seed=0)
    cnn.learn(80)
    data = cnn.replay_buffer.sample(2, 10)
    obs, actions = data.observations.numpy(), data.actions.numpy()
    predicted = cnn.policy.dream(obs, actions, context=4)
    assert predicted.observations.shape == (2, 6, 3, 20, 20) and predicted.observations.dtype == np.uint8
    assert predicted.rewards.shape == predicted.continues.shape == (2, 6)
    path = plot_dream(tmp_path / "cnn.png", obs, predicted, 4, rewards=data.rewards.numpy())
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    data = dict_model.replay_buffer.sample(1, 10)
    obs = {key: x.numpy()[0] for key, x in data.observations.items()}  # one sequence, no batch axis
    predicted = dict_model.policy.dream(obs, data.actions.numpy()[0], context=3)
    assert predicted.observations["img"].shape == (1, 7, 1, 12, 12) and predicted.observations["vec"].shape == (1, 7, 2)
    path = plot_dream(tmp_path / "dict.png", obs, predicted, 3, rewards=data.rewards.numpy())
    width, height = struct.unpack(">II", path.read_bytes()[16:24])
    # One image key (2.6 in high) above 3 series (vec[0], vec[1], reward: 1 row of 3 panels, 3.2 x 2.4 in), title 0.4 in; 100 dpi.
    assert (width, height) == (960, 540)
