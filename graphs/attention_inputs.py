"""Values every fused attention shares, computed once from the graph's attention_mask.

    attention_mask [B, T] --ReduceSum(axis 1)--> lengths [B] --(-1)--> Cast int32 --> seqlens_k [B]
    attention_mask --Shape[1]--> Cast int32 --> total_sequence_length (scalar)

The mask is right-padded in the optimized graph (GroupQueryAttention's contract), so a row's length
is its number of ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from .build import add_node, constant


@dataclass(frozen=True)
class AttentionLengths:
    seqlens_k: ir.Value  # int32 [B]: total length of each row minus one
    total_length: ir.Value  # int32 scalar: T
    seqlens_k_int64: ir.Value  # int64 [B], for index arithmetic


def attention_lengths(graph: ir.Graph) -> AttentionLengths:
    mask = next(v for v in graph.inputs if v.name == "attention_mask")
    one = constant(graph, "attention/one", np.array(1, np.int64))
    axis = constant(graph, "attention/axis_1", np.array([1], np.int64))
    (lengths,) = add_node(graph, "ReduceSum", [mask, axis], {"keepdims": 0}, name="attention/lengths")
    (last,) = add_node(graph, "Sub", [lengths, one], name="attention/last_index")
    (seqlens,) = add_node(graph, "Cast", [last], {"to": ir.DataType.INT32}, name="attention/seqlens_k")
    (shape,) = add_node(graph, "Shape", [mask], {"start": 1, "end": 2}, name="attention/mask_width")
    (width,) = add_node(graph, "Squeeze", [shape], name="attention/total_length_int64")
    (total,) = add_node(graph, "Cast", [width], {"to": ir.DataType.INT32}, name="attention/total_length")
    return AttentionLengths(seqlens, total, last)
