"""Recognise a linear layer in the exported graph and read its weight as [in, out].

The exporter writes MatMul(x, W) with W stored as [in, out] (our export folds the transpose), or
Gemm(x, W, transB=1) with W as [out, in] for 2-D inputs; an optional Add(·, bias) follows. Int4 weights
appear as com.microsoft::MatMulNBits (after the int4_matmul pass), whose codes, scales and zero points
are stored per output row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx_ir as ir


@dataclass(frozen=True)
class Linear:
    input: ir.Value
    output: ir.Value  # after the bias, if any
    weight: ir.Value
    weight_is_out_in: bool  # Gemm with transB=1
    bias: ir.Value | None
    in_features: int
    out_features: int
    nbits: ir.Node | None = None  # the MatMulNBits node holding int4 weights (its B, scales, zero points)

    def weight_in_out(self) -> Callable[[], np.ndarray]:
        """A deferred read of the weight as [in, out]."""
        weight, transpose = self.weight, self.weight_is_out_in
        return lambda: weight.const_value.numpy().T if transpose else weight.const_value.numpy()


def linear_producing(value: ir.Value) -> Linear | None:
    """The linear layer whose output is `value`, or None."""
    node = value.producer()
    bias = None
    if node is not None and node.op_type == "Add":
        initial = [v for v in node.inputs if v is not None and v.is_initializer()]
        other = [v for v in node.inputs if v is not None and not v.is_initializer()]
        if len(initial) != 1 or len(other) != 1:
            return None
        bias, node = initial[0], other[0].producer()
        if node is None or len(node.outputs[0].uses()) != 1:
            return None
    if node is not None and node.op_type == "MatMulNBits" and all(v is not None for v in node.inputs[:3]) \
            and all(v is None or v.is_initializer() for v in node.inputs[1:]):
        attributes = {name: attr.value for name, attr in node.attributes.items()}
        return Linear(node.inputs[0], value, node.inputs[1], False, bias, attributes["K"], attributes["N"], node)
    if node is None or node.op_type not in ("MatMul", "Gemm"):
        return None
    x, weight = node.inputs[0], node.inputs[1]
    if weight is None or not weight.is_initializer() or weight.shape is None or len(weight.shape) != 2:
        return None
    if node.op_type == "Gemm":
        attributes = {name: attr.value for name, attr in node.attributes.items()}
        if attributes.get("transB") != 1 or attributes.get("transA", 0) != 0 or len(node.inputs) > 2:
            return None
        out_features, in_features = weight.shape
        return Linear(x, value, weight, True, bias, in_features, out_features)
    in_features, out_features = weight.shape
    return Linear(x, value, weight, False, bias, in_features, out_features)


def same_kind(linears: tuple[Linear, ...]) -> bool:
    """Whether the weights can be concatenated along N: all float, or all int4 with the same blocks
    (MatMulNBits attributes other than N) and zero points in all or none."""
    if all(l.nbits is None for l in linears):
        return True
    if any(l.nbits is None for l in linears):
        return False
    settings = [{k: a.value for k, a in l.nbits.attributes.items() if k != "N"} for l in linears]
    inputs = [tuple(v is not None for v in l.nbits.inputs) for l in linears]
    return all(s == settings[0] for s in settings) and len(set(inputs)) == 1
