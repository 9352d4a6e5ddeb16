"""Values every fused attention shares, computed once from the graph's attention_mask.

    attention_mask [B, T] --ReduceSum(axis 1)--> lengths [B] --(-1)--> Cast int32 --> seqlens_k [B]
    attention_mask [B, T] --Shape--> Gather(1) --> Cast int32 --> total_length (scalar T)

The mask is right-padded in the optimized graph (GroupQueryAttention's contract), so a row's length
is its number of ones. T is computed in the graph, as onnxruntime-genai's own builder does, so genai
and transformers.js can drive the graph with the inputs they feed. GroupQueryAttention reads T from
host memory: onnxruntime computes those three nodes on the CPU EP even in a CUDA session (Shape reads
no data), which CUDA-graph capture allows; their names start with contract.HOST_SHAPE_NODES, and the
runtime refuses any other node that onnxruntime would place on the CPU (runtime/session.py).
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
    total_length: ir.Value  # int32 scalar: T, the mask's width, in host memory
    seqlens_k_int64: ir.Value  # int64 [B], for index arithmetic


def attention_lengths(graph: ir.Graph) -> AttentionLengths:
    mask = next(v for v in graph.inputs if v.name == contract.ATTENTION_MASK)
    one = constant(graph, "attention/one", np.array(1, np.int64))
    axis = constant(graph, "attention/axis_1", np.array([1], np.int64))
    (lengths,) = add_node(graph, "ReduceSum", [mask, axis], {"keepdims": 0}, name="attention/lengths")
    (last,) = add_node(graph, "Sub", [lengths, one], name="attention/last_index")
    (seqlens,) = add_node(graph, "Cast", [last], {"to": ir.DataType.INT32}, name="attention/seqlens_k")
    (shape,) = add_node(graph, "Shape", [mask], name=f"{contract.HOST_SHAPE_NODES}mask_shape")
    (width,) = add_node(graph, "Gather", [shape, one], {"axis": 0}, name=f"{contract.HOST_SHAPE_NODES}mask_width")
    (total,) = add_node(graph, "Cast", [width], {"to": ir.DataType.INT32}, name=f"{contract.HOST_SHAPE_NODES}total_length")
    return AttentionLengths(seqlens, total, last)
