"""Model size presets, as keyword arguments of :class:`sb3_dreamer.policies.DreamerPolicy`.

``size400k`` (the default, measured on classic control) is ours; ``size1m`` ... ``size200m`` are
DreamerV3's official presets (2024 code): deter / hidden / classes / units / CNN depth. The CNN
(image observations, :mod:`sb3_dreamer.networks.encoders`) doubles ``depth`` at each stride-2 stage
(the 2023 layout; the 2024 code multiplies it by 2, 3, 4, 4). ``size400k``'s depth 16 gives 16, 32,
64 and 128 channels at 64 x 64. Pass one as ``policy_kwargs=dict(size="size12m")``; explicit keys
(``deter=...``, ``depth=...``) override the preset's.
"""

from __future__ import annotations

SIZE_PRESETS: dict[str, dict[str, int]] = {
    # Ours, for classic control on a CPU: size1m with half the deterministic state (~0.4M parameters
    # for vectors), and a CNN of depth 16 for images.
    "size400k": dict(deter=256, hidden=64, classes=4, units=64, depth=16),
    "size1m": dict(deter=512, hidden=64, classes=4, units=64, depth=4),
    "size12m": dict(deter=2048, hidden=256, classes=16, units=256, depth=16),
    "size25m": dict(deter=3072, hidden=384, classes=24, units=384, depth=24),
    "size50m": dict(deter=4096, hidden=512, classes=32, units=512, depth=32),
    "size100m": dict(deter=6144, hidden=768, classes=48, units=768, depth=48),
    "size200m": dict(deter=8192, hidden=1024, classes=64, units=1024, depth=64),
}

DEFAULT_SIZE = "size400k"


def resolve_size(size: str, **overrides: int | None) -> dict[str, int]:
    """The preset's sizes with the non-None ``overrides`` applied; ValueError for an unknown name."""
    if size not in SIZE_PRESETS:
        raise ValueError(f"Unknown size preset {size!r}; choose one of {', '.join(SIZE_PRESETS)}")
    sizes = dict(SIZE_PRESETS[size])
    sizes.update({k: v for k, v in overrides.items() if v is not None})
    return sizes
