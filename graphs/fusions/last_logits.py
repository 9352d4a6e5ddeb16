"""Compute logits only for each row's last real token.

Before:   hidden [B, S, D] --final norm--> --lm_head--> logits [B, S, V]
After:    hidden --GatherND(batch_dims=1, index_b)--> [B, D] --Unsqueeze--> [B, 1, D] --final norm--> --lm_head--> [B, 1, V]

With right padding, row b's last new token sits at index min(seqlens_k[b], S - 1): seqlens_k[b] in a
first prompt (lengths differ), S - 1 = 0 in a decode step, S - 1 in a continued prompt (batch 1).
A 4k-token prompt with a 152k vocabulary thus never materialises [S, V] logits.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import onnx_ir as ir

from artifact import contract

from ..build import add_node, constant
from ..facts import PassFacts
from ..fusion import Fusion
from ..regions import nodes_in_scope, region_of

NAME = "last_token_logits"


@dataclass(frozen=True)
class FinalHidden:
    hidden: ir.Value  # [B, S, D], input of the final norm
    consumers: tuple[ir.Node, ...]  # final-norm nodes reading it
    logits: ir.Value


def find(graph: ir.Graph, facts: PassFacts) -> list[list[ir.Node]]:
    if not facts.cached:  # the other tasks' heads pick their own positions
        return []
    nodes = nodes_in_scope(graph, "model.norm")
    return [nodes] if nodes else []


def check(graph: ir.Graph, nodes: list[ir.Node], facts: PassFacts) -> FinalHidden | str:
    region = region_of(nodes)
    logits = [v for v in graph.outputs if v.name == contract.LOGITS]
    if len(region.inputs) != 1 or not logits:
        return "final norm does not read exactly one activation, or the graph has no logits output"
    hidden = region.inputs[0]
    consumers = tuple(user for user, _ in hidden.uses() if user in set(nodes))
    return FinalHidden(hidden, consumers, logits[0])


def build(graph: ir.Graph, found: list[FinalHidden], facts: PassFacts) -> PassFacts:
    for final in found:
        input_ids = next(v for v in graph.inputs if v.name == contract.INPUT_IDS)
        zero = constant(graph, "last_token/zero", np.array(0, np.int64))
        one = constant(graph, "last_token/one", np.array(1, np.int64))
        axis = constant(graph, "last_token/axis_1", np.array([1], np.int64))
        # S - 1 per row from device tensors (sum of a row of ones), not from Shape: a shape value lives on
        # the host, and feeding it to a device op adds a Memcpy, which rules out CUDA-graph capture
        (zeros,) = add_node(graph, "Mul", [input_ids, zero], name="last_token/zeros")
        (ones,) = add_node(graph, "Add", [zeros, one], name="last_token/ones")
        (new_tokens,) = add_node(graph, "ReduceSum", [ones, axis], {"keepdims": 0}, name="last_token/new_tokens")
        (last_new,) = add_node(graph, "Sub", [new_tokens, one], name="last_token/last_new_index")
        (index,) = add_node(graph, "Min", [facts.lengths.seqlens_k_int64, last_new], name="last_token/index")
        (index_b1,) = add_node(graph, "Unsqueeze", [index, axis], name="last_token/index_b1")
        (gathered,) = add_node(graph, "GatherND", [final.hidden, index_b1], {"batch_dims": 1}, name="last_token/GatherND")
        (hidden_last,) = add_node(graph, "Unsqueeze", [gathered, axis], name="last_token/hidden")
        for node in final.consumers:
            for position, value in enumerate(node.inputs):
                if value is final.hidden:
                    node.replace_input_with(position, hidden_last)
        final.logits.shape = ir.Shape([ir.SymbolicDim(contract.BATCH), 1, final.logits.shape[-1]])
    return replace(facts, last_token_logits=bool(found))


FUSION = Fusion(NAME, lambda facts: int(facts.cached), find, check, build)
