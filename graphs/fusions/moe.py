"""Routed experts of a Qwen2-MoE layer -> com.microsoft::MoE.

Before (modules model.layers.{i}.mlp.gate and .mlp.experts):

    x [B, S, D] --MatMul Wgᵀ--> logits --Softmax fp32--> TopK(k) --(renormalise)--> Scatter --> weights [B, S, E]
    x --MatMul gate_up[e]ᵀ--> silu(gate)·up --MatMul down[e]ᵀ--> Σ_e weights[..., e] · out_e   (every expert)

After:

    MoE(x [B, S, D], Reshape(logits, [-1, E]), fc1 = interleave(gate_up) [E, 2I, D], "", fc2 = down [E, D, I],
        k, activation_type="swiglu", swiglu_fusion=1, normalize_routing_weights=norm_topk_prob)

The op applies the softmax over all experts itself and takes the top-k of those probabilities, exactly
as transformers does (ort-contrib-ops.md §5). Only interleaved SwiGLU (swiglu_fusion=1) is used: CPU
supports nothing else, and the other layouts swapped gate and up on CUDA. The shared expert and its
sigmoid gate stay as ordinary nodes. The op takes 3-D tokens (its output keeps their shape) but 2-D
router logits; the reshape has a constant target, so no shape arithmetic enters the graph.
Legend: B batch, S tokens, D hidden, E experts, I expert intermediate.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from ..build import MS_DOMAIN, add_initializer, add_node, constant, replace_value
from ..facts import PassFacts
from ..fusion import Fusion
from ..regions import Region, initializers_of, nodes_in_scope, region_of

NAME = "MoE"


@dataclass(frozen=True)
class Experts:
    layer: int
    input: ir.Value
    router_logits: ir.Value
    gate_up: ir.Value  # [E, 2I, D], gate rows then up rows
    down: ir.Value  # [E, D, I]
    output: ir.Value


def interleave_gate_up(gate_up: np.ndarray) -> np.ndarray:
    """[E, 2I, D] with gate rows then up rows -> rows g0, u0, g1, u1, ... (MoE's swiglu_fusion=1)."""
    experts, rows, hidden = gate_up.shape
    gate, up = gate_up[:, : rows // 2], gate_up[:, rows // 2 :]
    return np.stack([gate, up], axis=2).reshape(experts, rows, hidden)


def find(graph: ir.Graph, facts: PassFacts) -> list[tuple[int, Region, Region]]:
    found = []
    for layer in facts.model.sparse_layers:
        experts = nodes_in_scope(graph, f"model.layers.{layer}.mlp.experts")
        router = nodes_in_scope(graph, f"model.layers.{layer}.mlp.gate")
        if experts and router:
            found.append((layer, region_of(experts), region_of(router)))
    return found


def check(graph: ir.Graph, candidate: tuple[int, Region, Region], facts: PassFacts) -> Experts | str:
    layer, experts, router = candidate
    stacked = [w for w in initializers_of(experts.nodes) if w.shape is not None and len(w.shape) == 3]
    if len(stacked) != 2:
        return f"layer {layer}: expected the two stacked expert tensors, found {len(stacked)}"
    gate_up, down = sorted(stacked, key=lambda w: w.name.endswith("down_proj"))
    experts_count, rows, hidden = gate_up.shape
    if list(down.shape) != [experts_count, hidden, rows // 2] or not gate_up.name.endswith("gate_up_proj"):
        return f"layer {layer}: expert tensors {gate_up.name} {list(gate_up.shape)} / {down.name} {list(down.shape)} do not pair up"
    matmuls = [n for n in router.nodes if n.op_type in ("MatMul", "Gemm") and any(v is not None and v.is_initializer() for v in n.inputs)]
    if len(matmuls) != 1:
        return f"layer {layer}: router logits MatMul not found"
    logits_node = matmuls[0]
    x = logits_node.inputs[0]
    if x not in experts.inputs or len(experts.outputs) != 1:
        return f"layer {layer}: experts and router do not read the same tokens, or the experts have several outputs"
    return Experts(layer, x, logits_node.outputs[0], gate_up, down, experts.outputs[0])


def build(graph: ir.Graph, found: list[Experts], facts: PassFacts) -> PassFacts:
    for experts in found:
        gate_up = experts.gate_up
        fc1 = add_initializer(graph, f"layers.{experts.layer}/mlp/moe/fc1", gate_up.dtype, tuple(gate_up.shape),
                              lambda w=gate_up: interleave_gate_up(w.const_value.numpy()))
        rows_shape = constant(graph, f"layers.{experts.layer}/mlp/moe/router_rows", np.array([-1, gate_up.shape[0]], np.int64))
        (router_rows,) = add_node(graph, "Reshape", [experts.router_logits, rows_shape], name=f"layers.{experts.layer}/mlp/router_rows")
        (out,) = add_node(
            graph, "MoE", [experts.input, router_rows, fc1, None, experts.down],
            {"k": facts.model.experts_per_token, "activation_type": "swiglu", "swiglu_fusion": 1,
             "normalize_routing_weights": int(facts.model.normalize_routing), "activation_alpha": 1.0, "activation_beta": 0.0},
            name=f"layers.{experts.layer}/mlp/MoE", domain=MS_DOMAIN,
        )
        replace_value(graph, experts.output, out)
    return facts


FUSION = Fusion(NAME, lambda facts: len(facts.model.sparse_layers), find, check, build)
