"""Values every fused attention shares, computed once from the graph's attention_mask.

    attention_mask [B, T] --ReduceSum(axis 1)--> lengths [B] --(-1)--> Cast int32 --> seqlens_k [B]
    total_sequence_length: a new graph input, int32 scalar = T, fed by the caller from host memory

The mask is right-padded in the optimized graph (GroupQueryAttention's contract), so a row's length
is its number of ones. T is an input rather than Shape(attention_mask)[1] because onnxruntime runs
such shape arithmetic on the CPU EP, and a graph with CPU nodes can neither run with the CPU fallback
disabled nor be captured cleanly as a CUDA graph; GroupQueryAttention reads T from host memory anyway.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from artifact import contract

from .build import add_node, constant


@dataclass(frozen=True)
class AttentionLengths:
    seqlens_k: ir.Value  # int32 [B]: total length of each row minus one
    total_length: ir.Value  # int32 scalar: T, the graph input total_sequence_length
    seqlens_k_int64: ir.Value  # int64 [B], for index arithmetic


def attention_lengths(graph: ir.Graph) -> AttentionLengths:
    mask = next(v for v in graph.inputs if v.name == contract.ATTENTION_MASK)
    one = constant(graph, "attention/one", np.array(1, np.int64))
    axis = constant(graph, "attention/axis_1", np.array([1], np.int64))
    (lengths,) = add_node(graph, "ReduceSum", [mask, axis], {"keepdims": 0}, name="attention/lengths")
    (last,) = add_node(graph, "Sub", [lengths, one], name="attention/last_index")
    (seqlens,) = add_node(graph, "Cast", [last], {"to": ir.DataType.INT32}, name="attention/seqlens_k")
    total = ir.Value(name=contract.TOTAL_SEQUENCE_LENGTH, shape=ir.Shape([]), type=ir.TensorType(ir.DataType.INT32))
    graph.inputs.append(total)
    return AttentionLengths(seqlens, total, last)
