"""Each row's best next-token candidates, computed on the device at the end of the graph.

    logits [B, 1, V] --Slice(:tokenizer vocab)--> --TopK(K, sorted)--> top_logits [B, K] (fp32), top_ids [B, K] (int64)

The runtime chooses the next token from these K pairs instead of copying the whole logits row to the
host each step (600 KB at a 152k vocabulary); it still can read `logits` when the candidates cannot
decide (runtime/sampling.py, choose_from_candidates). The slice drops the embedding's padding rows,
which no tokenizer id reaches. Only over last-token logits: never a TopK over a prompt's [B, S, V].
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from artifact import contract

from ..build import add_node, constant
from ..facts import PassFacts
from ..fusion import Fusion

NAME = "token_candidates"
DEFAULT_K = 64  # >= the top_k of Qwen's generation configs (20), so their sampling is decided on the device


def find(graph: ir.Graph, facts: PassFacts) -> list[ir.Value]:
    return [v for v in graph.outputs if v.name == contract.LOGITS]


def check(graph: ir.Graph, logits: ir.Value, facts: PassFacts) -> ir.Value | str:
    if len(logits.shape) != 3 or logits.shape[1] != 1:
        return "the logits are not last-token logits [batch, 1, vocab]"
    return logits


def build(graph: ir.Graph, found: list[ir.Value], facts: PassFacts) -> PassFacts:
    for logits in found:
        vocab = facts.model.tokenizer_vocab_size
        k = min(DEFAULT_K, vocab)
        scores = logits
        if isinstance(logits.shape[-1], int) and logits.shape[-1] > vocab:
            (scores,) = add_node(graph, "Slice", [logits, constant(graph, "candidates/start", np.array([0], np.int64)),
                                                   constant(graph, "candidates/end", np.array([vocab], np.int64)),
                                                   constant(graph, "candidates/axis", np.array([2], np.int64))],
                                 name="candidates/tokenizer_vocab")
        (values, ids) = add_node(graph, "TopK", [scores, constant(graph, "candidates/k", np.array([k], np.int64))],
                                 {"axis": -1, "largest": 1, "sorted": 1}, name="candidates/TopK", num_outputs=2)
        squeeze_axis = constant(graph, "candidates/axis_1", np.array([1], np.int64))
        batch = logits.shape[0]
        for value, name, dtype in ((values, contract.CANDIDATE_OUTPUTS[0], ir.DataType.FLOAT),
                                   (ids, contract.CANDIDATE_OUTPUTS[1], ir.DataType.INT64)):
            (output,) = add_node(graph, "Squeeze", [value, squeeze_axis], name=f"candidates/{name}")
            output.name, output.shape, output.type = name, ir.Shape([batch, k]), ir.TensorType(dtype)
            graph.outputs.append(output)
    return facts


FUSION = Fusion(NAME, lambda facts: int(facts.last_token_logits), find, check, build)
