"""Blocked int4 DequantizeLinear feeding a MatMul -> com.microsoft::MatMulNBits.

    codes uint4 [K, N] ──┐
    scales      [K/G, N] ├─ DequantizeLinear(axis 0, block_size G) ── W ── MatMul(x, W)
    zeros uint4 [K/G, N] ┘   (or int4 codes without zero points: symmetric)
                                   becomes
    MatMulNBits(x, B uint8 [N, K/G, G/2], scales [N, K/G], zeros uint8 [N, ceil(K/G / 2)],
                K, N, bits=4, block_size=G, accuracy_level)

MatMulNBits keeps each output's codes together (ort-contrib-ops.md §4): row n of B holds W[:, n], two
codes a byte, the lower k in the low nibble; zero points are packed the same way along the blocks. The
codes are only moved, never changed. The pass runs before packed_qkv and packed_gate_up, which concatenate
these rows along N as they concatenate float weights.

`accuracy_level` 1 computes in the activations' float type (exact to rounding); 4 lets the CPU quantize
activations to int8 per block (several times faster at decode, ~1e-2 relative error). CUDA ignores it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from artifact import uint4

from ..build import MS_DOMAIN, add_initializer, add_node, replace_value
from ..facts import PassFacts
from ..fusion import Fusion

NAME = "MatMulNBits"
BITS = 4
EXACT, INT8_ACTIVATIONS = 1, 4  # onnxruntime's accuracy levels this project writes
ACCURACY_LEVELS = (EXACT, INT8_ACTIVATIONS)


@dataclass(frozen=True)
class Dequantized:
    matmul: ir.Node
    codes: ir.Value
    scales: ir.Value
    zeros: ir.Value | None
    block_size: int


def unsigned(codes: np.ndarray) -> np.ndarray:
    """uint4 codes as they are; int4 codes (symmetric, no zero points) shifted by 8 into uint4, the zero
    point MatMulNBits and QMoE assume when given none."""
    return codes.astype(np.int16) + 8 if codes.dtype.name == "int4" else codes


def blocked_codes(codes: np.ndarray, block_size: int) -> np.ndarray:
    """Codes [K, N] -> MatMulNBits' B [N, K / block, block / 2]."""
    k, n = codes.shape
    return uint4.pack(unsigned(codes).T).reshape(n, k // block_size, block_size // 2)


def find(graph: ir.Graph, facts: PassFacts) -> list[ir.Node]:
    return [node for node in graph if node.op_type == "DequantizeLinear"]


def check(graph: ir.Graph, node: ir.Node, facts: PassFacts) -> Dequantized | str:
    codes, scales, zeros = (list(node.inputs) + [None])[:3]
    attributes = {name: attr.value for name, attr in node.attributes.items()}
    block = attributes.get("block_size", 0)
    if codes is None or codes.dtype not in (ir.DataType.UINT4, ir.DataType.INT4) or not codes.is_initializer() \
            or len(codes.shape) != 2:
        return f"{node.name}: not 2-D int4 weights"
    if attributes.get("axis") != 0 or block < 16 or block & (block - 1) or codes.shape[0] % block:
        return f"{node.name}: blocks of {block} along axis {attributes.get('axis')} (MatMulNBits takes a power of two >= 16 along the inputs)"
    if (zeros is None) != (codes.dtype == ir.DataType.INT4) or (zeros is not None and zeros.dtype != ir.DataType.UINT4):
        return f"{node.name}: {codes.dtype} codes with zero points {zeros.dtype if zeros is not None else 'absent'}"
    uses = node.outputs[0].uses()
    if len(uses) != 1 or uses[0].node.op_type != "MatMul" or uses[0].idx != 1:
        return f"{node.name}: the weights feed something other than one MatMul"
    return Dequantized(uses[0].node, codes, scales, zeros, block)


def build(graph: ir.Graph, found: list[Dequantized], facts: PassFacts) -> PassFacts:
    for d in found:
        k, n = d.codes.shape
        blocks, name = k // d.block_size, d.codes.name.removesuffix(".int4")
        codes = add_initializer(graph, f"{name}.B", ir.DataType.UINT8, (n, blocks, d.block_size // 2),
                                lambda c=d.codes, b=d.block_size: blocked_codes(c.const_value.numpy(), b))
        scales = add_initializer(graph, f"{name}.scales_nk", d.scales.dtype, (n, blocks),
                                 lambda s=d.scales: s.const_value.numpy().T)
        zeros = None if d.zeros is None else add_initializer(
            graph, f"{name}.zero_points_nk", ir.DataType.UINT8, (n, (blocks + 1) // 2),
            lambda z=d.zeros: uint4.pack(z.const_value.numpy().T))
        (out,) = add_node(graph, "MatMulNBits", [d.matmul.inputs[0], codes, scales, zeros],
                          {"K": k, "N": n, "bits": BITS, "block_size": d.block_size, "accuracy_level": facts.int4_accuracy},
                          name=f"{name}/MatMulNBits", domain=MS_DOMAIN)
        out.producer().metadata_props.update(d.matmul.metadata_props)  # its module scope, which later passes read
        out.shape, out.type = d.matmul.outputs[0].shape, d.matmul.outputs[0].type
        replace_value(graph, d.matmul.outputs[0], out)
    return facts


def expected(facts: PassFacts) -> int:
    return facts.model.quantized_linears


FUSION = Fusion(NAME, expected, find, check, build)
