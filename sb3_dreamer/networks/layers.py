"""Building blocks shared by every network: normalised linear layers, block-diagonal linear layers, MLPs,
the channel norm of the convolutional encoder and decoder.

DreamerV3 uses Linear -> RMSNorm -> SiLU everywhere, truncated-normal fan-in initialisation and zero
biases; output layers can be scaled down (``outscale``), zero for reward and value heads. Our
:class:`NormLinear` initialises its bias like a weight column instead (see there for why).
"""

from __future__ import annotations

import math

import torch as th
from torch import nn

from sb3_dreamer.compiled import CompiledMethods


def init_linear_(weight: th.Tensor, fan_in: int, scale: float = 1.0) -> None:
    """Truncated-normal fan-in initialisation, std ``scale * 1.1368 / sqrt(fan_in)`` (unit variance after truncation)."""
    if scale == 0.0:
        nn.init.zeros_(weight)
        return
    std = scale * 1.1368 / math.sqrt(fan_in)
    nn.init.trunc_normal_(weight, std=std, a=-2.0 * std, b=2.0 * std)


class RMSNorm(nn.RMSNorm):
    """``nn.RMSNorm`` whose scale follows the input's dtype, so bfloat16 inputs under autocast take
    the fused kernel (a float32 scale with a bfloat16 input falls back to several unfused ones)."""

    def forward(self, x: th.Tensor) -> th.Tensor:
        weight = self.weight if self.weight is None or self.weight.dtype == x.dtype else self.weight.to(x.dtype)
        return nn.functional.rms_norm(x, self.normalized_shape, weight, self.eps)


class ChannelRMSNorm(RMSNorm):
    """RMSNorm over the channels of feature maps [N, C, H, W] (the norm of DreamerV3's convolutions)."""

    def forward(self, x: th.Tensor) -> th.Tensor:
        return super().forward(x.movedim(1, -1)).movedim(-1, 1)


class Linear(nn.Linear):
    """``nn.Linear`` with DreamerV3's initialisation; ``outscale=0`` gives an all-zero output layer."""

    def __init__(self, in_features: int, out_features: int, outscale: float = 1.0) -> None:
        super().__init__(in_features, out_features)
        init_linear_(self.weight, in_features, outscale)
        nn.init.zeros_(self.bias)


class NormLinear(nn.Module):
    """Linear (with bias) -> RMSNorm -> SiLU: [..., in] -> [..., out].

    The bias is what lets the layer see its input's scale: RMSNorm(W c x) = RMSNorm(W x) for any
    c > 0, so without it a 1-dimensional input (a Box action, a 1-d observation) is seen only by its
    sign, and a vector only by its direction. It is initialised like one more input column that is
    always 1, so the layer sees the scale from the first update.
    """

    def __init__(self, in_features: int, out_features: int, eps: float = 1e-4) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        weight = th.empty(out_features, in_features + 1)
        init_linear_(weight, in_features + 1)
        with th.no_grad():
            self.linear.weight.copy_(weight[:, :-1])
            self.linear.bias.copy_(weight[:, -1])
        self.norm = RMSNorm(out_features, eps=eps)

    def forward(self, x: th.Tensor) -> th.Tensor:
        return nn.functional.silu(self.norm(self.linear(x)))


class BlockLinear(nn.Module):
    """Block-diagonal linear layer: G independent ``in/G -> out/G`` maps, [..., in] -> [..., out]."""

    def __init__(self, in_features: int, out_features: int, blocks: int) -> None:
        super().__init__()
        if in_features % blocks or out_features % blocks:
            raise ValueError(f"BlockLinear needs sizes divisible by blocks={blocks}, got {in_features} -> {out_features}")
        self.blocks = blocks
        self.weight = nn.Parameter(th.empty(blocks, in_features // blocks, out_features // blocks))
        self.bias = nn.Parameter(th.zeros(out_features))
        init_linear_(self.weight, in_features // blocks)

    def forward(self, x: th.Tensor) -> th.Tensor:
        lead = x.shape[:-1]
        x = x.reshape(-1, self.blocks, x.shape[-1] // self.blocks).transpose(0, 1)  # [G, N, in/G]
        y = th.bmm(x, self.weight).transpose(0, 1)  # [N, G, out/G]
        return y.reshape(*lead, -1) + self.bias


class MLP(CompiledMethods, nn.Sequential):
    """``layers`` x NormLinear(units), then an optional Linear(out_features, outscale): [..., in] -> [..., out]."""

    def __init__(self, in_features: int, units: int, layers: int, out_features: int | None = None, outscale: float = 1.0):
        modules: list[nn.Module] = []
        for i in range(layers):
            modules.append(NormLinear(in_features if i == 0 else units, units))
        if out_features is not None:
            modules.append(Linear(units if layers else in_features, out_features, outscale=outscale))
        super().__init__(*modules)
