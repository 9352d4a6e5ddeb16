"""Int4 weights of AWQ and GPTQ checkpoints, carried into the portable graph bit for bit.

For a Linear with K inputs, N outputs and groups of G inputs, W[k, n] = (q[k, n] - z[k // G, n]) * s[k // G, n]:

    AutoAWQ "gemm"                              AutoGPTQ ("gptq" format, desc_act false)
    qweight int32 [K, N/8]  along the outputs,  qweight int32 [K/8, N]  along the inputs, nibble j = row 8r + j
                            nibble i = column 8c + ORDER[i]
    qzeros  int32 [K/G, N/8] as qweight          qzeros  int32 [K/G, N/8] nibble j = column 8c + j, stored as z - 1
    scales  fp16  [K/G, N]                       scales  fp16  [K/G, N];  g_idx int32 [K] = k // G (checked)

Qwen2-MoE experts live in stacks [E, out, in] blocked along the last axis, so a GPTQ expert's
[K, N] codes, scales and zero points are transposed into its rows of the stack (gptq_expert_part).

`--quantize int4` ("rtn") computes codes from a float checkpoint, block by block along the inputs
(round_to_nearest): with zero points, s = (max - min) / 15 and z = round(-min / s) over the block
(its range widened to hold 0); symmetric, s = -w* / 8 for the block's value w* of largest magnitude,
int4 codes in [-8, 7] and no zero points (as onnxruntime's own quantizer does).

The portable graph computes exactly that with standard ONNX (opset 21+):

    q  uint4 [K, N] ─┐
    s  float [K/G, N]├─ DequantizeLinear(axis=0, block_size=G) ── W [K, N] ── MatMul(x, W)
    z  uint4 [K/G, N]┘

ONNX packs uint4 two to a byte, the lower index in the low nibble, row-major: codes 8c .. 8c+7 of a
row fill one 32-bit word with code 8c + j in nibble j. Repacking is therefore a permutation of
nibbles (AWQ words), a transpose of 8 x 8 nibble blocks (GPTQ words) or adding the 1 back (GPTQ
zeros), done chunk by chunk while streaming: no dequantization, no requantization. onnxruntime runs
the pairs as they are and fuses them into MatMulNBits itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx_ir as ir
import torch

from artifact import uint4

from .errors import CheckpointError

ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AWQ: nibble i of a word holds code 8c + ORDER[i]
NATURAL_FROM_AWQ = tuple(ORDER.index(j) for j in range(8))  # code 8c + j sits in AWQ nibble [j]


@dataclass(frozen=True)
class Part:
    """One checkpoint tensor of a quantized Linear: its type, its shape from (N, K, G), and the suffix of
    the graph initializer it fills (None: checked, not stored)."""

    dtype: torch.dtype
    shape: Callable[[int, int, int], tuple[int, ...]]
    initializer: str | None


CODES, SCALES, ZERO_POINTS = "int4", "scales", "zero_points"  # the initializers of one int4 weight
LAYOUTS = {
    "awq": {"qweight": Part(torch.int32, lambda n, k, g: (k, n // 8), CODES),
            "qzeros": Part(torch.int32, lambda n, k, g: (k // g, n // 8), ZERO_POINTS),
            "scales": Part(torch.float16, lambda n, k, g: (k // g, n), SCALES)},
    "gptq": {"qweight": Part(torch.int32, lambda n, k, g: (k // 8, n), CODES),
             "qzeros": Part(torch.int32, lambda n, k, g: (k // g, n // 8), ZERO_POINTS),
             "scales": Part(torch.float16, lambda n, k, g: (k // g, n), SCALES),
             "g_idx": Part(torch.int32, lambda n, k, g: (k,), None)},
}  # "rtn" (--quantize int4) reads float weights and has no parts


def initializer_name(parameter: str, suffix: str) -> str:
    return f"{parameter}.{suffix}"


def awq_words_to_uint4(words: torch.Tensor) -> bytes:
    """AWQ-packed int32 words -> the same codes as ONNX uint4 bytes, in natural column order."""
    packed = words.numpy().view(np.uint32)
    natural = np.zeros_like(packed)
    for j, source in enumerate(NATURAL_FROM_AWQ):
        natural |= ((packed >> np.uint32(4 * source)) & np.uint32(0xF)) << np.uint32(4 * j)
    return natural.astype("<u4").tobytes()


def gptq_zeros(words: torch.Tensor, where: str) -> np.ndarray:
    """GPTQ zero points [R, N/8] (stored as z - 1, 8 per word in column order) -> z [R, N] (uint8 values)."""
    packed = words.numpy().view(np.uint32)
    stored = np.stack([(packed >> np.uint32(4 * j)) & np.uint32(0xF) for j in range(8)], axis=-1)
    if (stored == 15).any():  # z = 16 does not fit 4 bits (AutoGPTQ adds the 1 back without wrapping)
        raise CheckpointError(f"{where} holds a zero point of 16, which 4-bit zero points cannot carry; "
                              "re-quantize with sym=True or zero points up to 15")
    return (stored + 1).reshape(*packed.shape[:-1], -1).astype(np.uint8)


def gptq_words_to_uint4(words: torch.Tensor, columns: int) -> bytes:
    """Whole rows of GPTQ words [R, N] -> codes [8R, N] as ONNX uint4 bytes (pairs of columns a byte).
    Word by word, without unpacking: nibble j of the words of columns 2m and 2m+1 make byte m of row
    8r + j; the even nibbles of both words first (bytes of rows 8r, +2, +4, +6), then the odd ones."""
    packed = words.numpy().view(np.uint32).reshape(-1, columns)
    left, right, low = packed[:, 0::2], packed[:, 1::2], np.uint32(0x0F0F0F0F)
    even = (left & low) | ((right & low) << np.uint32(4))  # byte b: row 8r + 2b
    odd = ((left >> np.uint32(4)) & low) | (right & ~low)  # byte b: row 8r + 2b + 1
    rows = np.stack([even.view(np.uint8).reshape(*even.shape, 4), odd.view(np.uint8).reshape(*odd.shape, 4)], axis=-1)
    return np.ascontiguousarray(rows.transpose(0, 2, 3, 1)).tobytes()  # [R, 4, 2, N/2] = [8R, N/2]


def gptq_zeros_to_uint4(words: torch.Tensor, where: str) -> bytes:
    """GPTQ zero points -> z as ONNX uint4 bytes, in the checkpoint's [R, N] order."""
    return uint4.pack(gptq_zeros(words, where)).tobytes()


def gptq_expert_part(part: str, tensor: torch.Tensor, shape: tuple[int, ...], group_size: int,
                     scale_dtype: torch.dtype, where: str) -> np.ndarray | None:
    """One part (checkpoint tensor of `shape`) of one expert's GPTQ Linear, re-laid as that expert's rows
    [N, K] of the stacked experts, as the bytes to write at stack_offset. None for g_idx, only checked."""
    if part == "qweight":
        # word r of column n holds inputs 8r..8r+7, lower in lower nibble (little-endian): its byte b is the
        # uint4 byte of inputs 8r+2b and 8r+2b+1 of row n, so the rows [N, K] are the bytes transposed
        words = tensor.numpy().view(np.uint8).reshape(shape[0], shape[1], 4)
        return np.ascontiguousarray(words.transpose(1, 0, 2)).reshape(-1)
    if part == "qzeros":
        return uint4.pack(gptq_zeros(tensor, where).reshape(shape[0], -1).T.reshape(-1))
    if part == "scales":
        # flattened: a transposed [N, 1] keeps a stride that .view(uint8) refuses
        return tensor.view(shape).t().to(scale_dtype).contiguous().flatten().view(torch.uint8).numpy()
    check_g_idx(tensor, 0, group_size, where)
    return None


def stack_offset(suffix: str, element: int, group_size: int, scale_bytes: int) -> int:
    """Byte offset, within the stacked experts' initializer `suffix` (CODES, SCALES or ZERO_POINTS), of the
    values that start at element `element` of the stacked weight [E, R, K] (a whole number of blocks)."""
    if suffix == CODES:
        return element // 2
    return element // group_size * scale_bytes if suffix == SCALES else element // group_size // 2


def check_g_idx(values: torch.Tensor, first: int, group_size: int, where: str) -> None:
    expected = np.arange(first, first + values.numel()) // group_size
    if not np.array_equal(values.numpy(), expected):
        raise CheckpointError(f"{where} does not map input k to group k // {group_size}: an act-order (desc_act) "
                              "checkpoint, which is not supported; use one quantized with desc_act false")


def repack(method: str, part: str, chunk: torch.Tensor, first: int, shape: tuple[int, ...], group_size: int,
           where: str) -> bytes | None:
    """The graph bytes of one chunk of a packed part, starting at element `first` of the checkpoint
    tensor of `shape` (same byte offset in the graph initializer); None for a part only checked."""
    if method == "awq":
        return awq_words_to_uint4(chunk)
    if part == "qweight":
        return gptq_words_to_uint4(chunk, shape[1])
    if part == "qzeros":
        return gptq_zeros_to_uint4(chunk, where)
    check_g_idx(chunk, first, group_size, where)
    return None


@dataclass(frozen=True)
class Quantized:
    """A band of rows [n, K] of a Linear weight quantized: codes [n, K], scales and zero points [n, K / G]."""

    codes: np.ndarray  # uint8 values 0..15, or int8 values -8..7 (symmetric)
    scales: torch.Tensor  # in the graph's float type: the codes were computed with these rounded scales
    zeros: np.ndarray | None


def round_to_nearest(weight: torch.Tensor, group_size: int, symmetric: bool, scale_dtype: torch.dtype) -> Quantized:
    """Quantize rows [n, K] of a float weight to int4, one scale (and zero point) per `group_size` inputs
    (in place on one fp32 copy: this runs over every projection of the model)."""
    n, k = weight.shape
    blocks = weight.float().reshape(n, k // group_size, group_size)
    if symmetric:
        extreme = blocks.gather(2, blocks.abs().argmax(dim=2, keepdim=True))[..., 0]
        scales = (extreme / -8).to(scale_dtype)
        codes = blocks.div_(nonzero(scales)[..., None]).round_().clamp_(-8, 7).to(torch.int8)
        return Quantized(codes.reshape(n, k).numpy(), scales, None)
    low, high = torch.aminmax(blocks, dim=2)
    low.clamp_(max=0)
    high.clamp_(min=0)
    scales = ((high - low) / 15).to(scale_dtype)
    s = nonzero(scales)
    zeros = torch.round(-low / s).clamp_(0, 15)
    codes = blocks.div_(s[..., None]).add_(zeros[..., None]).round_().clamp_(0, 15).to(torch.uint8)
    return Quantized(codes.reshape(n, k).numpy(), scales, zeros.to(torch.uint8).numpy())


def nonzero(scales: torch.Tensor) -> torch.Tensor:
    """fp32 scales to divide by: an all-zero block (scale 0) divides by 1 and gets codes at its zero point."""
    s = scales.float()
    s[s == 0] = 1.0
    return s


def dequantize_weights(graph: ir.Model, parameters: set[str], group_size: int, symmetric: bool = False) -> None:
    """Replace each weight initializer in `parameters` with DequantizeLinear of new initializers whose bytes
    the export writes later (placeholders until then): uint4 codes and zero points, or int4 codes alone
    (`symmetric`), and scales, blocked along the inputs: axis 0 of a Linear weight stored [K, N], the last
    axis of stacked experts [E, R, K]."""
    for name in sorted(parameters):
        weight = graph.graph.initializers[name]
        shape, float_type = tuple(weight.shape), weight.dtype
        axis = 0 if len(shape) == 2 else len(shape) - 1
        blocks = tuple(size // group_size if i == axis else size for i, size in enumerate(shape))
        codes = placeholder(initializer_name(name, CODES), ir.DataType.INT4 if symmetric else ir.DataType.UINT4, shape)
        zeros = None if symmetric else placeholder(initializer_name(name, ZERO_POINTS), ir.DataType.UINT4, blocks)
        scales = placeholder(initializer_name(name, SCALES), float_type, blocks)
        node = ir.node("DequantizeLinear", [codes, scales, zeros], attributes={"axis": axis, "block_size": group_size},
                       name=f"{name}/DequantizeLinear")
        node.outputs[0].name, node.outputs[0].dtype, node.outputs[0].shape = f"{name}.dequantized", float_type, ir.Shape(shape)
        first_use = next(node for node in graph.graph if any(value is weight for value in node.inputs))
        weight.replace_all_uses_with(node.outputs[0])
        graph.graph.insert_before(first_use, node)
        del graph.graph.initializers[name]
        for value in (codes, zeros, scales):
            if value is not None:
                graph.graph.register_initializer(value)


def placeholder(name: str, dtype: ir.DataType, shape: tuple[int, ...]) -> ir.Value:
    """An initializer whose bytes are not in memory: its slot in the data file is assigned later."""
    nbytes = (int(np.prod(shape)) * dtype.bitwidth + 7) // 8
    tensor = ir.ExternalTensor("pending", 0, nbytes, dtype, shape=ir.Shape(shape), name=name)
    return ir.Value(name=name, shape=ir.Shape(shape), type=ir.TensorType(dtype), const_value=tensor)
