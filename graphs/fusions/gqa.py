"""Attention with rotary embeddings -> com.microsoft::GroupQueryAttention.

Before (module model.layers.{i}.self_attn, minus its projections):

    q, k, v ---Reshape/Transpose---> rotate_half(cos, sin) --> Concat(past, new) --> repeat_kv
            --> MatMul(q, kᵀ)·scale + mask bias --> Softmax(fp32) --> MatMul(·, v) --> Reshape --> o_proj
                                            present.{i}.key / present.{i}.value <-- the Concat outputs

After:

    q, k, v, past_key, past_value, seqlens_k, total_length, cos_cache, sin_cache
        --> GroupQueryAttention(num_heads, kv_num_heads, scale, do_rotary=1, local_window_size)
        --> out [B, S, H·Dh], present_key, present_value [B, Hkv, P, Dh]

Graphs without a KV cache (classification, embeddings) give the op no past and leave its present
unread: every call is a first prompt, total_length = S.

Contract (ort-contrib-ops.md §1): right-padded rows; seqlens_k = per-row total length - 1 (int32);
rotary positions come from seqlens_k; cos/sin caches [context, Dh/2] carry the rope type's scaling and
attention factor (YaRN). A shared past/present buffer is possible by binding one OrtValue to both.
Legend: B batch, S new tokens, P past/buffer length, H heads, Hkv kv heads, Dh head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from artifact import contract

from ..build import MS_DOMAIN, add_initializer, add_node, replace_value
from ..facts import ModelFacts, PassFacts
from ..fusion import Fusion
from ..regions import Region, nodes_in_scope, region_of, scopes_of

NAME = "GroupQueryAttention"
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class Attention:
    layer: int
    query: ir.Value
    key: ir.Value
    value: ir.Value
    past_key: ir.Value | None  # None: no KV cache
    past_value: ir.Value | None
    output: ir.Value
    present_key: ir.Value | None
    present_value: ir.Value | None
    window: int | None


def find(graph: ir.Graph, facts: PassFacts) -> list[tuple[int, Region]]:
    candidates = []
    for layer in range(facts.model.num_layers):
        scope = f"model.layers.{layer}.self_attn"
        nodes = nodes_in_scope(graph, scope, exclude=tuple(f"{scope}.{p}" for p in PROJECTIONS))
        if nodes:
            candidates.append((layer, region_of(nodes)))
    return candidates


def check(graph: ir.Graph, candidate: tuple[int, Region], facts: PassFacts) -> Attention | str:
    layer, region = candidate
    scope = f"model.layers.{layer}.self_attn"

    def projected(name: str) -> ir.Value | None:
        found = [v for v in region.inputs if v.producer() is not None and f"{scope}.{name}" in scopes_of(v.producer())]
        return found[0] if len(found) == 1 else None

    inputs = {v.name: v for v in region.inputs}
    outputs = {v.name: v for v in region.outputs}
    query, key, value = projected("q_proj"), projected("k_proj"), projected("v_proj")
    if None in (query, key, value):
        return "q/k/v projections not found at the region's boundary"
    past, present = [None, None], [None, None]
    if facts.cached:
        past = [inputs.get(name) for name in contract.kv_names(layer + 1, contract.PAST)[-2:]]
        present = [outputs.get(name) for name in contract.kv_names(layer + 1, contract.PRESENT)[-2:]]
        if None in past or None in present:
            return "past/present KV values of the layer not found at the region's boundary"
    to_o_proj = [v for v in region.outputs if any(f"{scope}.o_proj" in scopes_of(user) for user, _ in v.uses())]
    if len(to_o_proj) != 1:
        return "the attention output feeding o_proj was not found"
    if not any(node.op_type == "Softmax" for node in region.nodes):
        return "no Softmax in the region: not the attention the exporter writes"
    return Attention(layer, query, key, value, past[0], past[1], to_o_proj[0], present[0], present[1], facts.model.windows[layer])


def rotary_caches(graph: ir.Graph, facts: ModelFacts, dtype: ir.DataType) -> tuple[ir.Value, ir.Value]:
    """cos/sin [context_length, Dh/2] from the exported inv_freq, times the rope's attention factor."""
    inv_freq = graph.initializers[facts.inv_freq_initializer]
    numpy_dtype = dtype.numpy()
    shape = (facts.context_length, facts.head_dim // 2)

    def table(function):
        def compute() -> np.ndarray:
            angles = np.arange(facts.context_length, dtype=np.float64)[:, None] * inv_freq.const_value.numpy().astype(np.float64)
            return (function(angles) * facts.attention_factor).astype(np.float32).astype(numpy_dtype)
        return compute

    return (add_initializer(graph, "rotary/cos_cache", dtype, shape, table(np.cos)),
            add_initializer(graph, "rotary/sin_cache", dtype, shape, table(np.sin)))


def build(graph: ir.Graph, found: list[Attention], facts: PassFacts) -> PassFacts:
    if not found:
        return facts
    model, lengths = facts.model, facts.lengths
    cos, sin = rotary_caches(graph, model, found[0].query.dtype)
    for attention in found:
        window = attention.window if attention.window is not None else -1
        out, present_key, present_value = add_node(
            graph, "GroupQueryAttention",
            [attention.query, attention.key, attention.value, attention.past_key, attention.past_value,
             lengths.seqlens_k, lengths.total_length, cos, sin],
            {"num_heads": model.num_heads, "kv_num_heads": model.num_kv_heads, "scale": float(model.head_dim**-0.5),
             "do_rotary": 1, "rotary_interleaved": 0, "local_window_size": window},
            name=f"layers.{attention.layer}/attn/GroupQueryAttention", domain=MS_DOMAIN, num_outputs=3,
        )
        replace_value(graph, attention.output, out)
        if attention.present_key is not None:
            replace_value(graph, attention.present_key, present_key)
            replace_value(graph, attention.present_value, present_value)
    return facts


FUSION = Fusion(NAME, lambda facts: facts.model.num_layers, find, check, build)
