"""sb3-dreamer: DreamerV3 for Stable-Baselines3."""

from sb3_dreamer.dreamer import Dreamer
from sb3_dreamer.envs import register_envs
from sb3_dreamer.policies import CnnLatentPolicy, DreamerPolicy, MlpLatentPolicy, MultiInputLatentPolicy

__version__ = "0.1.0"

register_envs()  # CartPolePixels-v1, CartPoleDict-v1 (sb3_dreamer.envs)

__all__ = ["CnnLatentPolicy", "Dreamer", "DreamerPolicy", "MlpLatentPolicy", "MultiInputLatentPolicy", "__version__"]
