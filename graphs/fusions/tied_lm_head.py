"""A tied lm_head reads the embedding in place: Transpose + MatMul -> Gemm(transB=1).

Before:   hidden [B, 1, D] --MatMul(Transpose(embedding [V, D]))--> logits [B, 1, V]
After:    hidden --Reshape [B, D]--> Gemm(·, embedding, transB=1) --Reshape [B, 1, V]--> logits

With tied embeddings one [V, D] tensor serves the Gather of the input ids and the output
projection. onnxruntime folds a Transpose of an initializer at load by materialising a transposed
copy (545 MB for Qwen2-0.5B in fp32); Gemm reads the embedding as it is. Runs after
last_token_logits, so the hidden state has one position per row.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from ..build import add_node, constant, replace_value
from ..facts import PassFacts
from ..fusion import Fusion

NAME = "tied_lm_head"


@dataclass(frozen=True)
class TiedHead:
    matmul: ir.Node
    hidden: ir.Value
    embedding: ir.Value


def find(graph: ir.Graph, facts: PassFacts) -> list[ir.Node]:
    """MatMuls whose weight is a Transpose of an initializer (the logits may pass through a Cast after)."""
    def transposed_initializer(value: ir.Value | None) -> bool:
        producer = value.producer() if value is not None else None
        return producer is not None and producer.op_type == "Transpose" and producer.inputs[0].is_initializer()

    return [node for node in graph if node.op_type == "MatMul" and transposed_initializer(node.inputs[1])]


def check(graph: ir.Graph, node: ir.Node, facts: PassFacts) -> TiedHead | str:
    if not facts.last_token_logits:
        return "needs last_token_logits first (one position per row)"
    transpose = node.inputs[1].producer() if node.inputs[1] is not None else None
    if transpose is None or transpose.op_type != "Transpose":
        return "lm_head does not read a transposed weight (untied, or already rewritten)"
    embedding = transpose.inputs[0]
    if embedding is None or not embedding.is_initializer() or embedding.shape is None or len(embedding.shape) != 2:
        return "lm_head's transposed weight is not a 2-D initializer"
    if not any(user.op_type == "Gather" for user, _ in embedding.uses()):
        return "the lm_head weight is not shared with the embedding Gather"
    return TiedHead(node, node.inputs[0], embedding)


def build(graph: ir.Graph, found: list[TiedHead], facts: PassFacts) -> PassFacts:
    for head in found:
        rows = constant(graph, "lm_head/rows_shape", np.array([-1, facts.model.hidden_size], np.int64))
        (hidden_rows,) = add_node(graph, "Reshape", [head.hidden, rows], name="lm_head/rows")
        (scores,) = add_node(graph, "Gemm", [hidden_rows, head.embedding], {"transB": 1}, name="lm_head/Gemm")
        vocab = head.embedding.shape[0]
        logits_shape = constant(graph, "lm_head/logits_shape", np.array([-1, 1, vocab], np.int64))
        (logits,) = add_node(graph, "Reshape", [scores, logits_shape], name="lm_head/logits")
        replace_value(graph, head.matmul.outputs[0], logits)
    return facts


# needs one position per row, so it fires only after last_token_logits
FUSION = Fusion(NAME, lambda facts: int(facts.model.tied_embeddings and facts.last_token_logits), find, check, build)
