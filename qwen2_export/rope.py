"""Rotary embedding tables: one pure function per rope type returning (inv_freq, attention_factor).

Matches transformers' `ROPE_INIT_FUNCTIONS` (modeling_rope_utils, 4.57 and 5.x): frequencies in fp32,
the YaRN attention factor multiplies both cos and sin.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from .config import RopeConfig
from .errors import ConfigError


def default_inv_freq(rope: RopeConfig, dim: int) -> tuple[torch.Tensor, float]:
    """inv_freq[i] = theta^(-2i/dim), i < dim/2; no attention scaling."""
    exponent = torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim
    return 1.0 / (rope.theta**exponent), 1.0


def linear_inv_freq(rope: RopeConfig, dim: int) -> tuple[torch.Tensor, float]:
    """Position interpolation: every frequency divided by `factor`."""
    inv_freq, _ = default_inv_freq(rope, dim)
    return inv_freq / rope.factor, 1.0


def yarn_inv_freq(rope: RopeConfig, dim: int) -> tuple[torch.Tensor, float]:
    """YaRN: low dims extrapolate, high dims interpolate by `factor`, a linear ramp between.

    Same as transformers' `_compute_yarn_parameters`, including the truncated correction range and the
    attention factor 0.1 ln(factor) + 1 (or the mscale ratio, or an explicit value).
    """
    assert rope.original_max_position_embeddings is not None
    attention_factor = rope.attention_factor
    if attention_factor is None:
        if rope.mscale and rope.mscale_all_dim:
            attention_factor = _yarn_mscale(rope.factor, rope.mscale) / _yarn_mscale(rope.factor, rope.mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(rope.factor)

    def correction_dim(rotations: float) -> float:
        context = rope.original_max_position_embeddings
        return dim * math.log(context / (rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers avoids a zero-width ramp the same way

    position_freqs = rope.theta ** (torch.arange(0, dim, 2).to(torch.float32) / dim)
    extrapolation = 1.0 / position_freqs
    interpolation = 1.0 / (rope.factor * position_freqs)
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation_weight = 1 - ramp
    inv_freq = interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight
    return inv_freq, float(attention_factor)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


ROPE_FUNCTIONS: dict[str, Callable[[RopeConfig, int], tuple[torch.Tensor, float]]] = {
    "default": default_inv_freq,
    "linear": linear_inv_freq,
    "yarn": yarn_inv_freq,
}


def rope_parameters(rope: RopeConfig, dim: int) -> tuple[torch.Tensor, float]:
    """(inv_freq [dim/2] fp32, attention_factor) for `rope.rope_type`; raises for an unknown type."""
    if rope.rope_type not in ROPE_FUNCTIONS:
        raise ConfigError(f"rope type {rope.rope_type!r} is not supported; supported: {sorted(ROPE_FUNCTIONS)}")
    return ROPE_FUNCTIONS[rope.rope_type](rope, dim)
