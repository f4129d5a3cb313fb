"""Methods replaced by their ``torch.compile`` versions, in a way that survives ``copy.deepcopy`` and ``pickle``."""

from __future__ import annotations

from typing import Any

import torch as th


class CompiledMethods:
    """Mixin for an ``nn.Module`` some of whose methods are replaced by compiled versions
    (:meth:`compile_method`).

    A compiled method is a function that holds the module it was made from, so ``copy.deepcopy``
    would give the copy the original's (the copy's updates would then run, and train, the original's
    weights), and ``pickle`` cannot store it. A copy therefore leaves them out and compiles its own:
    the same methods, bound to itself (compiled again on first call; torch caches the code on disk).
    """

    _compiled_methods: tuple[str, ...] = ()

    def compile_method(self, name: str) -> None:
        """Replace the method ``name`` of this module by ``torch.compile(method, dynamic=False)``."""
        method = getattr(type(self), name).__get__(self, type(self))  # the class's, even if compiled already
        setattr(self, name, th.compile(method, dynamic=False))
        if name not in self._compiled_methods:
            self._compiled_methods = (*self._compiled_methods, name)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()  # type: ignore[misc]
        for name in self._compiled_methods:
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # type: ignore[misc]
        for name in self._compiled_methods:
            self.compile_method(name)
