"""How ONNX (and onnxruntime's MatMulNBits and QMoE) pack 4-bit values: two a byte along the last axis,
the lower index in the low nibble; int4 values as their two's-complement nibble; an odd count padded
with a zero nibble. The export (qwen2_export/int4.py) and the passes (graphs/fusions) both pack so."""

from __future__ import annotations

import numpy as np


def pack(values: np.ndarray) -> np.ndarray:
    """4-bit values [..., n] (uint4 0..15 or int4 -8..7, any integer type) -> bytes [..., ceil(n / 2)]."""
    values = values.astype(np.uint8) & 0xF
    if values.shape[-1] % 2:
        values = np.concatenate([values, np.zeros((*values.shape[:-1], 1), np.uint8)], axis=-1)
    return values[..., 0::2] | (values[..., 1::2] << 4)
