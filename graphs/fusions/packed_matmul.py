"""Projections that read the same input -> one MatMul.

q/k/v (with Qwen2's biases) feeding a GroupQueryAttention:

    x --MatMul Wq--> +bq --> q ┐                      x --MatMul [Wq|Wk|Wv]--> + [bq|bk|bv] --> qkv
    x --MatMul Wk--> +bk --> k ├--> GQA      becomes                                            └--> GQA(qkv, "", "")
    x --MatMul Wv--> +bv --> v ┘

gate/up of a SwiGLU MLP:

    x --MatMul Wg--> g --silu--┐                x --MatMul [Wg|Wu]--> Split(2) --> g, u (same consumers)
    x --MatMul Wu--> u --------┴--> Mul   becomes

Weights are concatenated along the output axis as [in, out]; GQA accepts packed QKV [B, S, (H + 2 Hkv) Dh].
Int4 weights (MatMulNBits) are concatenated the same way: their codes, scales and zero points are stored
per output row, so packing stacks rows and the result is one MatMulNBits with N the sum.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from ..build import MS_DOMAIN, add_initializer, add_node, constant, replace_value
from ..facts import PassFacts
from ..fusion import Fusion
from ..linear import Linear, linear_producing, same_kind
from ..regions import node_path

NAME = "packed_qkv"
GATE_UP_NAME = "packed_gate_up"


@dataclass(frozen=True)
class Packing:
    name: str  # hierarchical prefix for the new nodes
    linears: tuple[Linear, ...]
    consumer: ir.Node | None = None  # the GQA node, for q/k/v


def _pack(graph: ir.Graph, packing: Packing) -> ir.Value:
    """One MatMul or MatMulNBits (+ one Add) computing every linear's output side by side."""
    linears = packing.linears
    x = linears[0].input
    width = sum(l.out_features for l in linears)
    dtype = linears[0].weight.dtype if linears[0].nbits is None else linears[0].nbits.inputs[2].dtype
    if linears[0].nbits is not None:
        out = _pack_nbits(graph, packing.name, linears, width)
    else:
        weight = add_initializer(graph, f"{packing.name}/weight", dtype, (linears[0].in_features, width),
                                 lambda: np.concatenate([l.weight_in_out()() for l in linears], axis=1))
        (out,) = add_node(graph, "MatMul", [x, weight], name=f"{packing.name}/MatMul")
    if all(l.bias is not None for l in linears):
        bias = add_initializer(graph, f"{packing.name}/bias", dtype, (width,),
                               lambda: np.concatenate([l.bias.const_value.numpy() for l in linears]))
        (out,) = add_node(graph, "Add", [out, bias], name=f"{packing.name}/Add")
    return out


def _pack_nbits(graph: ir.Graph, name: str, linears: tuple[Linear, ...], width: int) -> ir.Value:
    """MatMulNBits over the stacked rows (codes, scales, zero points) of every linear."""
    nodes = [l.nbits for l in linears]

    def stacked(index: int, role: str) -> ir.Value | None:
        parts = [node.inputs[index] for node in nodes]
        if parts[0] is None:
            return None
        return add_initializer(graph, f"{name}/{role}", parts[0].dtype, (width, *parts[0].shape[1:]),
                               lambda: np.concatenate([p.const_value.numpy() for p in parts]))

    attributes = {key: attr.value for key, attr in nodes[0].attributes.items()} | {"N": width}
    (out,) = add_node(graph, "MatMulNBits", [linears[0].input, stacked(1, "B"), stacked(2, "scales"), stacked(3, "zero_points")],
                      attributes, name=f"{name}/MatMulNBits", domain=MS_DOMAIN)
    return out


def find(graph: ir.Graph, facts: PassFacts) -> list[ir.Node]:
    return [node for node in graph if node.op_type == "GroupQueryAttention"]


def check(graph: ir.Graph, node: ir.Node, facts: PassFacts) -> Packing | str:
    linears = tuple(linear_producing(v) for v in node.inputs[:3] if v is not None)
    if len(linears) != 3 or None in linears:
        return f"{node.name}: q/k/v are not three linear layers"
    if len({id(l.input) for l in linears}) != 1 or len({l.bias is None for l in linears}) != 1:
        return f"{node.name}: q/k/v read different inputs or only some have a bias"
    if any(len(l.output.uses()) != 1 for l in linears):
        return f"{node.name}: a projection output has other consumers"
    if not same_kind(linears):
        return f"{node.name}: q/k/v weights differ in type or int4 blocks"
    return Packing(node.name.replace("/GroupQueryAttention", "/qkv"), linears, node)


def build(graph: ir.Graph, found: list[Packing], facts: PassFacts) -> PassFacts:
    for packing in found:
        qkv = _pack(graph, packing)
        gqa = packing.consumer
        gqa.replace_input_with(0, qkv)
        gqa.replace_input_with(1, None)
        gqa.replace_input_with(2, None)
    return facts


def find_gate_up(graph: ir.Graph, facts: PassFacts) -> list[ir.Node]:
    """Mul(silu(gate), up) nodes: silu is exported as Mul(g, Sigmoid(g))."""
    return [node for node in graph if node.op_type == "Mul" and node.inputs[0] is not None
            and node.inputs[0].producer() is not None and node.inputs[0].producer().op_type == "Mul"]


def check_gate_up(graph: ir.Graph, node: ir.Node, facts: PassFacts) -> Packing | str:
    silu, up_value = node.inputs[0].producer(), node.inputs[1]
    gate_value = silu.inputs[0]
    sigmoid = silu.inputs[1].producer() if silu.inputs[1] is not None else None
    if sigmoid is None or sigmoid.op_type != "Sigmoid" or sigmoid.inputs[0] is not gate_value:
        return f"{node.name}: not silu(gate) * up"
    gate, up = linear_producing(gate_value), linear_producing(up_value)
    if gate is None or up is None or gate.input is not up.input or gate.bias is not None or up.bias is not None:
        return f"{node.name}: gate and up are not bias-free linears of one input"
    if not same_kind((gate, up)):
        return f"{node.name}: gate and up weights differ in type or int4 blocks"
    return Packing(f"{node_path(node)}/gate_up", (gate, up))


def build_gate_up(graph: ir.Graph, found: list[Packing], facts: PassFacts) -> PassFacts:
    for packing in found:
        packed = _pack(graph, packing)
        sizes = constant(graph, f"{packing.name}/sizes", np.array([l.out_features for l in packing.linears], np.int64))
        gate, up = add_node(graph, "Split", [packed, sizes], {"axis": -1}, name=f"{packing.name}/Split", num_outputs=2)
        replace_value(graph, packing.linears[0].output, gate)
        replace_value(graph, packing.linears[1].output, up)
    return facts


QKV = Fusion(NAME, lambda facts: facts.model.num_layers, find, check, build)
# every layer has one gate/up pair outside the routed experts: the dense MLP or the shared expert
GATE_UP = Fusion(GATE_UP_NAME, lambda facts: facts.model.num_layers, find_gate_up, check_gate_up, build_gate_up)
