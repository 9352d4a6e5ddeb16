"""Store projection weights as [out, in] and read them with FusedMatMul(transB=1).

    x --MatMul(W [in, out])-->   becomes   x --FusedMatMul(W^T [out, in], transB=1)-->

Same numbers, different cuBLAS call: with W as [out, in] every output is a dot product over contiguous
memory (the layout torch's F.linear uses), which changes the kernels cuBLAS picks for the one-row
GEMMs of a decode step (no split-K for the narrow down_proj). tools/bench_gemm_layout.py measures
which layout is faster on a GPU. MatMuls whose weight is not a 2-D initializer are left alone.
"""

from __future__ import annotations

import onnx_ir as ir

from ..build import MS_DOMAIN, add_initializer, add_node, replace_value
from ..linear import linear_producing

NAME = "weight_layout"
LAYOUTS = ("in_out", "out_in")


def transpose_weights(graph: ir.Graph) -> int:
    """Rewrite every MatMul with a 2-D initializer weight; returns how many changed."""
    changed = 0
    for node in list(graph):
        if node.op_type != "MatMul" or node.domain != "":
            continue
        linear = linear_producing(node.outputs[0])
        if linear is None or linear.weight_is_out_in:
            continue
        weight = linear.weight
        read_in_out = linear.weight_in_out()
        out_in = add_initializer(graph, f"{weight.name}/out_in", weight.dtype,
                                 (linear.out_features, linear.in_features), lambda read=read_in_out: read().T)
        (product,) = add_node(graph, "FusedMatMul", [linear.input, out_in], {"transB": 1},
                              name=f"{node.name}/out_in", domain=MS_DOMAIN)
        product.type, product.shape = node.outputs[0].type, node.outputs[0].shape
        replace_value(graph, node.outputs[0], product)
        changed += 1
    return changed
