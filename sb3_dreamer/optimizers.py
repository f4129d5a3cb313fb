"""LaProp with adaptive gradient clipping and linear warm-up: DreamerV3's single optimiser (2024 code).

Per parameter tensor p with gradient g, at step t:

1. AGC: ``g *= min(1, agc * max(|p|, pmin) / |g|)`` (norms over the whole tensor).
2. RMS scaling: ``v = beta2 v + (1 - beta2) g^2``; ``u = g / (sqrt(v / (1 - beta2^t)) + eps)``.
3. Momentum on the scaled update (LaProp's order): ``m = beta1 m + (1 - beta1) u``.
4. ``p -= lr * min(1, t / warmup) * m / (1 - beta1^t)``.

All tensors are updated with ``torch._foreach`` kernels: a handful of launches per step whatever the
number of parameter tensors.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch as th


class LaProp(th.optim.Optimizer):
    """LaProp + AGC + warm-up.

    :param params: parameters to optimise
    :param lr: learning rate (SB3's schedule overwrites ``param_groups[i]["lr"]`` before each update)
    :param betas: (beta1 for momentum, beta2 for the squared-gradient average)
    :param eps: added to the RMS denominator
    :param agc: adaptive gradient clipping ratio (0 disables clipping)
    :param agc_pmin: lower bound of the parameter norm in the clipping ratio
    :param warmup: number of steps over which the learning rate ramps linearly from 0 (DreamerV3: 1000;
        100 here, measured: 1000 updates span 2,000 env steps at our default update rate)
    """

    def __init__(
        self,
        params: Iterable[th.Tensor],
        lr: float = 4e-5,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-20,
        agc: float = 0.3,
        agc_pmin: float = 1e-3,
        warmup: int = 100,
    ) -> None:
        if lr < 0 or eps < 0 or agc < 0 or warmup < 0:
            raise ValueError(f"LaProp needs non-negative lr, eps, agc and warmup, got {lr}, {eps}, {agc}, {warmup}")
        defaults = dict(lr=lr, betas=betas, eps=eps, agc=agc, agc_pmin=agc_pmin, warmup=warmup)
        super().__init__(params, defaults)

    @th.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        """One update. Free of host syncs: the step count lives on the parameters' device, and
        ``group["lr"]`` may be a 0-d tensor there, so the step can be captured in a CUDA graph."""
        loss = None
        if closure is not None:
            with th.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            beta1, beta2 = group["betas"]
            step = self._group_step(group, params[0].device)
            for p in params:
                state = self.state[p]
                if not state:
                    state["step"] = step
                    state["exp_avg"] = th.zeros_like(p)
                    state["exp_avg_sq"] = th.zeros_like(p)
            step.add_(1.0)
            if group["agc"] > 0:
                grad_norm = th.stack(th._foreach_norm(grads))
                param_norm = th.stack(th._foreach_norm(params)).clamp_(min=group["agc_pmin"])
                scale = (group["agc"] * param_norm / grad_norm.clamp(min=1e-6)).clamp_(max=1.0)
                th._foreach_mul_(grads, list(scale.unbind()))
            exp_avg = [self.state[p]["exp_avg"] for p in params]
            exp_avg_sq = [self.state[p]["exp_avg_sq"] for p in params]
            th._foreach_mul_(exp_avg_sq, beta2)
            th._foreach_addcmul_(exp_avg_sq, grads, grads, value=1.0 - beta2)
            denom = th._foreach_div(exp_avg_sq, 1.0 - beta2**step)
            th._foreach_sqrt_(denom)
            th._foreach_add_(denom, group["eps"])
            update = th._foreach_div(grads, denom)
            th._foreach_mul_(exp_avg, beta1)
            th._foreach_add_(exp_avg, update, alpha=1.0 - beta1)
            warm = th.clamp(step / group["warmup"], max=1.0) if group["warmup"] > 0 else 1.0
            step_size = group["lr"] * warm / (1.0 - beta1**step)
            th._foreach_sub_(params, th._foreach_mul(exp_avg, step_size))
        return loss

    def _group_step(self, group: dict, device: th.device) -> th.Tensor:
        """The group's step count: one 0-d tensor on the parameters' device, shared by the state of
        every parameter of the group (they all step together), so a step increments it once."""
        for p in group["params"]:
            state = self.state.get(p)
            if state and "step" in state:
                return state["step"]
        return th.zeros((), dtype=th.float32, device=device)

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's loader; then moves the step counts to the parameters' device (saved on another
        device, or by an older version on the CPU) and shares one count per group again."""
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            step = None
            for p in group["params"]:
                state = self.state.get(p)
                if state and "step" in state:
                    if step is None:
                        step = state["step"].to(device=p.device, dtype=th.float32)
                    state["step"] = step
