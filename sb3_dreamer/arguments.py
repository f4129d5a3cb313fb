"""Range checks of user-given settings: each problem names the setting, its rule and the value given.

A rule is a predicate with the words that state it (``"an integer >= 1"``); :func:`problems` checks the
settings present in a mapping, so a constructor checks all of its arguments and ``load`` those passed
to it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

Rule = tuple[Callable[[Any], bool], str]


def is_integer(value: Any) -> bool:
    """An int or numpy integer (not a bool, not a float such as 2.5 or 1e6)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_number(value: Any) -> bool:
    """A real int or float (numpy's too), not a bool or a string."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def integer_at_least(low: int) -> Rule:
    return (lambda v: is_integer(v) and v >= low), f"an integer >= {low}"


def number_at_least(low: float) -> Rule:
    return (lambda v: is_number(v) and v >= low), f"a number >= {low}"  # NaN fails the comparison


def number_within(low: float, high: float, low_open: bool = False, high_open: bool = False) -> Rule:
    """``low <= v <= high``, either end open as asked."""

    def ok(v: Any) -> bool:
        return is_number(v) and (v > low if low_open else v >= low) and (v < high if high_open else v <= high)

    return ok, f"a number in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"


def one_of(*choices: Any) -> Rule:
    return (lambda v: isinstance(v, str) and v in choices), "one of " + ", ".join(repr(c) for c in choices)


def or_none(rule: Rule) -> Rule:
    ok, words = rule
    return (lambda v: v is None or ok(v)), f"{words}, or None"


def problems(values: Mapping[str, Any], rules: Mapping[str, Rule]) -> list[str]:
    """``"<name> must be <rule>, got <value>"`` for each setting in ``values`` that breaks its rule."""
    return [f"{name} must be {words}, got {values[name]!r}" for name, (ok, words) in rules.items() if name in values and not ok(values[name])]
