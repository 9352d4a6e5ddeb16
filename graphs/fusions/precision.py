"""Change the graph's float type (fp32 -> fp16/bf16 for CUDA, or back to fp32 for CPU).

Weights, KV cache and activations take the new type; the logits output stays fp32 (a Cast before
the output) so sampling sees full-precision scores. In the other tasks' graphs everything after the
final norm stays fp32 (a Cast after the norm): the heads are small, and an embedding's L2 norm sums
thousands of squares, past fp16's range. Statistics that need fp32 are already inside the
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
    if facts.cached and not any(v.name == contract.LOGITS for v in graph.outputs):
        return "the graph has no logits output"
    if not facts.cached and facts.final_hidden is None:
        return "the final norm was not fused, so the head's fp32 part has no start"
    return ir.DataType(contract.ELEMENT_TYPES[facts.float_type])


def build(graph: ir.Graph, found: list[ir.DataType], facts: PassFacts) -> PassFacts:
    for target in found:
        if facts.cached:
            set_float_type(graph, target, untouched=frozenset(v for v in graph.outputs if v.name == contract.LOGITS))
            keep_logits_fp32(graph, target)
        else:
            set_float_type(graph, target, fp32_head(graph, facts.final_hidden))
    return facts


def fp32_head(graph: ir.Graph, hidden: ir.Value) -> set[ir.Node]:
    """Every node downstream of the final norm's output `hidden`, now reading it through a Cast to fp32."""
    head, frontier = set(), [hidden]
    while frontier:
        for user, _ in frontier.pop().uses():
            if user not in head:
                head.add(user)
                frontier.extend(user.outputs)
    (hidden_fp32,) = add_node(graph, "Cast", [hidden], {"to": ir.DataType.FLOAT}, name="head/hidden_fp32")
    hidden_fp32.type = ir.TensorType(ir.DataType.FLOAT)
    for user, index in list(hidden.uses()):
        if user in head:
            user.replace_input_with(index, hidden_fp32)
    return head | {hidden_fp32.producer()}


def set_float_type(graph: ir.Graph, target: ir.DataType, fp32_nodes: set[ir.Node] = frozenset(),
                   untouched: frozenset[ir.Value] = frozenset()) -> int:
    """Convert every float to `target` (when it differs), except what `fp32_nodes` compute and the weights
    only they read, which become fp32, and the values `untouched`; returns how many initializers changed type."""
    changed = 0
    for value in list(graph.initializers.values()):
        tensor = value.const_value
        wanted = ir.DataType.FLOAT if fp32_nodes and all(user in fp32_nodes for user, _ in value.uses()) else target
        if tensor.dtype in FLOATS and tensor.dtype != wanted:
            value.const_value = ir.LazyTensor(
                lambda t=tensor, w=wanted: ir.Tensor(t.numpy().astype(w.numpy())), wanted, tensor.shape, name=value.name
            )
            value.type = ir.TensorType(wanted)
            changed += 1
    for node in graph:
        wanted = ir.DataType.FLOAT if node in fp32_nodes else target
        if node.op_type == "Cast" and node.attributes["to"].value in FLOATS and not node.outputs[0].is_graph_output():
            node.attributes["to"] = ir.AttrInt64("to", wanted)
        for value in node.outputs:
            if value.dtype in FLOATS and value not in untouched:
                value.type = ir.TensorType(wanted)
    for value in [*graph.inputs, *graph.outputs]:
        if value.dtype in FLOATS and value not in untouched and value.producer() not in fp32_nodes:
            value.type = ir.TensorType(target)
    return changed


def keep_logits_fp32(graph: ir.Graph, target: ir.DataType) -> None:
    """An fp16/bf16 graph (converted here or exported so) still hands fp32 logits to sampling."""
    logits = next(v for v in graph.outputs if v.name == contract.LOGITS)
    if not _is_fp32_cast(logits.producer()):
        logits.type = ir.TensorType(target)
        if target != ir.DataType.FLOAT:
            (fp32_logits,) = add_node(graph, "Cast", [logits], {"to": ir.DataType.FLOAT}, name="lm_head/logits_fp32")
            fp32_logits.type = ir.TensorType(ir.DataType.FLOAT)
            replace_graph_output(graph, logits, fp32_logits)


def _is_fp32_cast(node: ir.Node) -> bool:
    return node.op_type == "Cast" and node.attributes["to"].value == ir.DataType.FLOAT


FUSION = Fusion(NAME, lambda facts: 1, find, check, build)
