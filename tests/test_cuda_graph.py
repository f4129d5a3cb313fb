"""The optimised paths against the eager ones: same losses for the same batch and seed.

Tolerances: float32 CUDA graph vs eager float32, rtol 1e-4 (floating-point reassociation and
atomics only); bfloat16 autocast vs float32 on CPU, 5% on the world-model terms (what bfloat16's
8-bit mantissa costs).
"""

import pytest
import torch as th

from sb3_dreamer import Dreamer
from sb3_dreamer.cuda_graph import CapturedUpdate
from tests.helpers import TINY_POLICY_KWARGS

cuda = pytest.mark.skipif(not th.cuda.is_available(), reason="needs a CUDA device")


def _model(device: str, **kwargs) -> Dreamer:
    model = Dreamer(
        "MlpLatentPolicy", "CartPole-v1", learning_starts=64, batch_size=4, sequence_length=8, imagination_starts=None,
        policy_kwargs=TINY_POLICY_KWARGS, device=device, seed=3, **kwargs,
    )  # fmt: skip
    model.learn(64)  # random steps: fills the replay, no update yet
    return model


def _batches(model: Dreamer, n: int) -> list:
    th.manual_seed(0)
    return [model.replay_buffer.sample(model.batch_size, model.sequence_length) for _ in range(n)]


@cuda
@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_cuda_graph_matches_eager(precision):
    graphed, eager = _model("cuda", cuda_graph=True, precision=precision), _model("cuda", cuda_graph=False, precision=precision)
    batches = _batches(eager, 4)
    graphed._captured_update = CapturedUpdate(graphed._update, graphed.policy, graphed.policy.optimizer)
    graphed._captured_update.capture(batches[0])  # leaves parameters and optimiser state as they were
    for i, batch in enumerate(batches):
        th.manual_seed(100 + i)
        got = {k: v.item() for k, v in graphed.train_step(batch).items()}
        th.manual_seed(100 + i)
        want = {k: v.item() for k, v in eager.train_step(batch).items()}
        for key in want:
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-5), (i, key)
    for p, q in zip(graphed.policy.parameters(), eager.policy.parameters()):
        th.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


@cuda
def test_cuda_graph_learns_and_saves(tmp_path):
    model = _model("cuda")
    assert model.uses_cuda_graph
    model.learn(200, reset_num_timesteps=False)
    assert model._n_updates > 0 and model._captured_update is not None
    model.save(tmp_path / "graphed")
    loaded = Dreamer.load(tmp_path / "graphed", env=model.get_env(), device="cuda")
    loaded.learn(50, reset_num_timesteps=False)


def test_bfloat16_autocast_matches_float32_on_cpu():
    full, half = _model("cpu", precision="float32"), _model("cpu", precision="bfloat16")
    assert half.autocast_dtype == th.bfloat16 and full.autocast_dtype is None
    batch = _batches(full, 1)[0]
    th.manual_seed(7)
    want = full.train_step(batch)
    th.manual_seed(7)
    got = half.train_step(batch)
    for key in ("model_loss", "rec_loss", "reward_loss", "cont_loss", "dyn_kl"):
        assert got[key].item() == pytest.approx(want[key].item(), rel=0.05, abs=1e-3), key


def test_cuda_graph_option_is_checked():
    assert not Dreamer("MlpLatentPolicy", "CartPole-v1", device="cpu").uses_cuda_graph
    with pytest.raises(ValueError, match="needs a CUDA device"):
        Dreamer("MlpLatentPolicy", "CartPole-v1", device="cpu", cuda_graph=True)
    with pytest.raises(ValueError, match="precision"):
        Dreamer("MlpLatentPolicy", "CartPole-v1", precision="float16")
