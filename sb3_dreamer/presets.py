"""Model size presets, as keyword arguments of :class:`sb3_dreamer.policies.DreamerPolicy`.

``size400k`` (the default, measured on classic control) is ours; ``size1m`` ... ``size200m`` are DreamerV3's official presets (2024 code): deter / hidden / classes /
units (CNN depth equals classes there; images are not supported yet). Pass one as
``policy_kwargs=dict(size="size12m")``; explicit keys (``deter=...``) override the preset's.
"""

from __future__ import annotations

SIZE_PRESETS: dict[str, dict[str, int]] = {
    # Ours, for classic control on a CPU: size1m with half the deterministic state (~0.4M parameters).
    "size400k": dict(deter=256, hidden=64, classes=4, units=64),
    "size1m": dict(deter=512, hidden=64, classes=4, units=64),
    "size12m": dict(deter=2048, hidden=256, classes=16, units=256),
    "size25m": dict(deter=3072, hidden=384, classes=24, units=384),
    "size50m": dict(deter=4096, hidden=512, classes=32, units=512),
    "size100m": dict(deter=6144, hidden=768, classes=48, units=768),
    "size200m": dict(deter=8192, hidden=1024, classes=64, units=1024),
}

DEFAULT_SIZE = "size400k"


def resolve_size(size: str, **overrides: int | None) -> dict[str, int]:
    """The preset's sizes with the non-None ``overrides`` applied; ValueError for an unknown name."""
    if size not in SIZE_PRESETS:
        raise ValueError(f"Unknown size preset {size!r}; choose one of {', '.join(SIZE_PRESETS)}")
    sizes = dict(SIZE_PRESETS[size])
    sizes.update({k: v for k, v in overrides.items() if v is not None})
    return sizes
