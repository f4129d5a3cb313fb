"""sb3-dreamer: DreamerV3 for Stable-Baselines3."""

from sb3_dreamer.dreamer import Dreamer
from sb3_dreamer.policies import DreamerPolicy, MlpLatentPolicy

__version__ = "0.1.0"

__all__ = ["Dreamer", "DreamerPolicy", "MlpLatentPolicy", "__version__"]
