"""Recognise a linear layer in the exported graph and read its weight as [in, out].

The exporter writes MatMul(x, W) with W stored as [in, out] (our export folds the transpose), or
Gemm(x, W, transB=1) with W as [out, in] for 2-D inputs; an optional Add(·, bias) follows.
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
