"""Int4 weights of AWQ checkpoints, carried into the portable graph bit for bit.

AutoAWQ's "gemm" layout for a Linear with K inputs, N outputs and groups of G inputs:

    qweight  int32 [K, N/8]    8 codes per word, packed along the outputs in the order ORDER
    qzeros   int32 [K/G, N/8]  zero points, packed the same way
    scales   fp16  [K/G, N]    W[k, n] = (q[k, n] - z[k // G, n]) * s[k // G, n]

The portable graph computes exactly that with standard ONNX (opset 21+):

    q  uint4 [K, N] ─┐
    s  float [K/G, N]├─ DequantizeLinear(axis=0, block_size=G) ── W [K, N] ── MatMul(x, W)
    z  uint4 [K/G, N]┘

ONNX packs uint4 two to a byte, the lower index in the low nibble, row-major: codes 8c .. 8c+7 of a
row fill one 32-bit word with code 8c + j in nibble j. So repacking an AWQ word is a permutation
of its nibbles, done chunk by chunk while streaming (no dequantization, no requantization).
onnxruntime runs the pair as is and fuses it into MatMulNBits itself.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import torch

ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AWQ: nibble i of a word holds code 8c + ORDER[i]
NATURAL_FROM_AWQ = tuple(ORDER.index(j) for j in range(8))  # code 8c + j sits in AWQ nibble [j]
PARTS = {"qweight": torch.int32, "qzeros": torch.int32, "scales": torch.float16}  # the checkpoint's tensors
SUFFIX = {"qweight": "int4", "qzeros": "zero_points", "scales": "scales"}  # of the graph's initializers


def part_shape(part: str, weight_shape: tuple[int, ...], group_size: int) -> tuple[int, int]:
    """The checkpoint tensor `part` of a Linear weight of shape [N, K] (transformers' layout)."""
    n, k = weight_shape
    return {"qweight": (k, n // 8), "qzeros": (k // group_size, n // 8), "scales": (k // group_size, n)}[part]


def initializer_name(parameter: str, part: str) -> str:
    return f"{parameter}.{SUFFIX[part]}"


def awq_words_to_uint4(words: torch.Tensor) -> bytes:
    """AWQ-packed int32 words -> the same codes as ONNX uint4 bytes, in natural column order."""
    packed = words.numpy().view(np.uint32)
    natural = np.zeros_like(packed)
    for j, source in enumerate(NATURAL_FROM_AWQ):
        natural |= ((packed >> np.uint32(4 * source)) & np.uint32(0xF)) << np.uint32(4 * j)
    return natural.astype("<u4").tobytes()


def dequantize_weights(graph: ir.Model, parameters: set[str], group_size: int) -> None:
    """Replace each weight initializer in `parameters` (stored [K, N]) with DequantizeLinear of three new
    initializers whose bytes the export writes later (placeholders until then)."""
    for name in sorted(parameters):
        weight = graph.graph.initializers[name]
        k, n = weight.shape
        float_type = weight.dtype
        codes = placeholder(initializer_name(name, "qweight"), ir.DataType.UINT4, (k, n))
        zeros = placeholder(initializer_name(name, "qzeros"), ir.DataType.UINT4, (k // group_size, n))
        scales = placeholder(initializer_name(name, "scales"), float_type, (k // group_size, n))
        node = ir.node("DequantizeLinear", [codes, scales, zeros], attributes={"axis": 0, "block_size": group_size},
                       name=f"{name}/DequantizeLinear")
        node.outputs[0].name, node.outputs[0].dtype, node.outputs[0].shape = f"{name}.dequantized", float_type, ir.Shape([k, n])
        first_use = next(node for node in graph.graph if any(value is weight for value in node.inputs))
        weight.replace_all_uses_with(node.outputs[0])
        graph.graph.insert_before(first_use, node)
        del graph.graph.initializers[name]
        for value in (codes, zeros, scales):
            graph.graph.register_initializer(value)


def placeholder(name: str, dtype: ir.DataType, shape: tuple[int, int]) -> ir.Value:
    """An initializer whose bytes are not in memory: its slot in the data file is assigned later."""
    nbytes = shape[0] * shape[1] * dtype.bitwidth // 8
    tensor = ir.ExternalTensor("pending", 0, nbytes, dtype, shape=ir.Shape(shape), name=name)
    return ir.Value(name=name, shape=ir.Shape(shape), type=ir.TensorType(dtype), const_value=tensor)
