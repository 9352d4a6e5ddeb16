"""Change the graph's float type (fp32 -> fp16/bf16 for CUDA, or back to fp32 for CPU).

Weights, KV cache and activations take the new type; the logits output stays fp32 (a Cast before
the output) so sampling sees full-precision scores. Statistics that need fp32 are already inside the
fused ops (SimplifiedLayerNormalization's stash_type=1, GroupQueryAttention's softmax, MoE's routing).
Casts to a float type inside the graph follow the new type. The pass has one candidate, the graph,
and fires once; it runs after the fusions (their ops come out in the new type too) and before
token_candidates, whose TopK must read the fp32 logits.
"""

from __future__ import annotations

import onnx_ir as ir

from artifact import contract

from ..build import add_node, replace_graph_output
from ..facts import PassFacts
from ..fusion import Fusion

NAME = "precision"
FLOATS = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)


def find(graph: ir.Graph, facts: PassFacts) -> list[ir.Graph]:
    return [graph]


def check(graph: ir.Graph, candidate: ir.Graph, facts: PassFacts) -> ir.DataType | str:
    if not any(v.name == contract.LOGITS for v in graph.outputs):
        return "the graph has no logits output"
    return ir.DataType(contract.ELEMENT_TYPES[facts.float_type])


def build(graph: ir.Graph, found: list[ir.DataType], facts: PassFacts) -> PassFacts:
    for target in found:
        set_float_type(graph, target)
    return facts


def set_float_type(graph: ir.Graph, target: ir.DataType) -> int:
    """Convert every float to `target` (when it differs) and keep the logits output fp32; returns how
    many initializers changed type."""
    changed = 0
    for value in list(graph.initializers.values()):
        tensor = value.const_value
        if tensor.dtype in FLOATS and tensor.dtype != target:
            value.const_value = ir.LazyTensor(
                lambda t=tensor: ir.Tensor(t.numpy().astype(target.numpy())), target, tensor.shape, name=value.name
            )
            value.type = ir.TensorType(target)
            changed += 1
    logits = next(v for v in graph.outputs if v.name == contract.LOGITS)
    for node in graph:
        if node.op_type == "Cast" and node.attributes["to"].value in FLOATS and not node.outputs[0].is_graph_output():
            node.attributes["to"] = ir.AttrInt64("to", target)
        for value in node.outputs:
            if value.dtype in FLOATS and value is not logits:
                value.type = ir.TensorType(target)
    for value in [*graph.inputs, *graph.outputs]:
        if value.dtype in FLOATS and value is not logits:
            value.type = ir.TensorType(target)
    # an fp16/bf16 graph (converted here or exported so) still hands fp32 logits to sampling
    if not _is_fp32_cast(logits.producer()):
        logits.type = ir.TensorType(target)
        if target != ir.DataType.FLOAT:
            (fp32_logits,) = add_node(graph, "Cast", [logits], {"to": ir.DataType.FLOAT}, name="lm_head/logits_fp32")
            fp32_logits.type = ir.TensorType(ir.DataType.FLOAT)
            replace_graph_output(graph, logits, fp32_logits)
    return changed


def _is_fp32_cast(node: ir.Node) -> bool:
    return node.op_type == "Cast" and node.attributes["to"].value == ir.DataType.FLOAT


FUSION = Fusion(NAME, lambda facts: 1, find, check, build)
