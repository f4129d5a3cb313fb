"""A whole gradient update captured once in a CUDA graph and replayed for every new batch.

An eager PyTorch Dreamer update launches thousands of small kernels (a T-step observe loop, an
H-step imagination loop, their backward passes, the optimiser), and on a GPU it is bound by their
launch cost, not by arithmetic. Capturing the update (forward, backward, optimiser step, slow-critic
EMA) in one CUDA graph replays all of them with one launch.

What capture requires of the update, and how this package meets it:

- no host synchronisation: no ``.item()``, no data-dependent Python branch, quantiles read at fixed
  sorted positions (:func:`~sb3_dreamer.functional.quantiles`), an optimiser whose step count and
  learning rate are device tensors (:class:`~sb3_dreamer.optimizers.LaProp`);
- fixed shapes and addresses: each batch is copied into static input tensors, and the outputs
  (metrics, posterior latents) are static tensors overwritten by each replay;
- random numbers from the CUDA generator, which advances its offset on every replay.

Capture first runs a few eager updates on a side stream (so cuBLAS and autograd allocate what
they need); their effect on parameters, buffers and optimiser state is undone afterwards, so
capturing never changes what the agent learns.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch as th
from torch import nn

from sb3_dreamer.type_aliases import SequenceSamples

UpdateOutput = tuple[dict[str, th.Tensor], th.Tensor, th.Tensor]


class CapturedUpdate:
    """Replays ``update`` from a CUDA graph.

    :param update: one gradient update, batch -> (metrics as 0-d tensors, posterior deter [B, T, D],
        posterior stoch [B, T, S*K]); it must be capturable (see the module docstring)
    :param module: the module whose parameters and buffers ``update`` changes
    :param optimizer: the optimiser ``update`` steps; its fresh per-parameter state must be zeros
        (true of :class:`~sb3_dreamer.optimizers.LaProp`)
    :param warmup: eager updates on a side stream before capture (undone afterwards)
    """

    def __init__(
        self, update: Callable[[SequenceSamples], UpdateOutput], module: nn.Module, optimizer: th.optim.Optimizer, warmup: int = 2
    ) -> None:
        self.update, self.module, self.optimizer, self.warmup = update, module, optimizer, warmup
        self.graph: th.cuda.CUDAGraph | None = None
        self.static_input: SequenceSamples | None = None
        self.static_output: UpdateOutput | None = None
        self.capture_seconds = 0.0

    def __call__(self, data: SequenceSamples) -> UpdateOutput:
        """Copy ``data`` into the static inputs and replay (capturing first, on the first call)."""
        if self.graph is None:
            self.capture(data)
        assert self.graph is not None and self.static_input is not None and self.static_output is not None
        for static, x in zip(self.static_input, data):
            if isinstance(static, dict):  # Dict observations
                for key, tensor in static.items():
                    copy_into(tensor, x[key])
            elif isinstance(static, th.Tensor):
                copy_into(static, x)
        self.graph.replay()
        return self.static_output

    def capture(self, data: SequenceSamples) -> None:
        """Capture the update on a batch shaped like ``data``; leaves the agent's state as it was."""
        start = time.perf_counter()
        device = data.rewards.device
        self.static_input = SequenceSamples(*(clone_tensors(x) for x in data))
        for group in self.optimizer.param_groups:  # a tensor learning rate, updated in place (see Dreamer)
            if not isinstance(group["lr"], th.Tensor):
                group["lr"] = th.tensor(float(group["lr"]), device=device)
        module_state = [t.detach().clone() for t in self._module_tensors()]
        optimizer_state = {p: {k: v.clone() for k, v in s.items()} for p, s in self.optimizer.state.items()}
        stream = th.cuda.Stream(device)
        stream.wait_stream(th.cuda.current_stream(device))
        with th.cuda.stream(stream):
            for _ in range(self.warmup):
                self.update(self.static_input)
        th.cuda.current_stream(device).wait_stream(stream)
        graph = th.cuda.CUDAGraph()
        with th.cuda.graph(graph):
            self.static_output = self.update(self.static_input)
        with th.no_grad():  # undo the warm-up updates
            for t, saved in zip(self._module_tensors(), module_state):
                t.copy_(saved)
            for p, state in self.optimizer.state.items():
                before = optimizer_state.get(p)
                for key, value in state.items():
                    if before is not None and key in before:
                        value.copy_(before[key])
                    else:
                        value.zero_()
        th.cuda.synchronize(device)
        self.graph = graph
        self.capture_seconds = time.perf_counter() - start

    def _module_tensors(self) -> list[th.Tensor]:
        return [*self.module.parameters(), *self.module.buffers()]


def clone_tensors(x: th.Tensor | dict[str, th.Tensor] | object) -> th.Tensor | dict[str, th.Tensor] | None:
    """A static copy of a batch field: a tensor, a dict of tensors (Dict observations), None for anything else."""
    if isinstance(x, dict):
        return {key: value.clone() for key, value in x.items()}
    return x.clone() if isinstance(x, th.Tensor) else None


def copy_into(static: th.Tensor, x: th.Tensor) -> None:
    """Copy a batch tensor into the captured graph's static input of the same shape."""
    if static.shape != x.shape:
        raise ValueError(f"The captured update takes batches of shape {tuple(static.shape)}, got {tuple(x.shape)}")
    static.copy_(x, non_blocking=True)
