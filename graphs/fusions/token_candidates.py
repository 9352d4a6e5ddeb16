"""Each row's best next-token candidates, computed on the device at the end of the graph.

    logits [B, 1, V] --Slice(:tokenizer vocab)--> --TopK(K, sorted)--> top_logits [B, K] (fp32)
                                                                     --> lowest id first --> top_ids [B, K] (int64)

The runtime chooses the next token from these K pairs instead of copying the whole logits row to the
host each step (600 KB at a 152k vocabulary); it still can read `logits` when the candidates cannot
decide (runtime/sampling.py, choose_from_candidates). The slice drops the embedding's padding rows,
which no tokenizer id reaches. Only over last-token logits: never a TopK over a prompt's [B, S, V].

The first id is the greedy token as the runtime chooses it, the lowest id among the best scores: TopK
leaves the order of equal scores to its kernel (onnxruntime's CUDA kernel does not put the lowest
first, and fp16 logits tie often), and the runtime feeds a queued decode step the first candidate on
the device, running the step again where the host chose another (runtime/batcher.py, check_ahead).
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
        ids = lowest_best_id_first(graph, values, ids, k)
        squeeze_axis = constant(graph, "candidates/axis_1", np.array([1], np.int64))
        batch = logits.shape[0]
        for value, name, dtype in ((values, contract.CANDIDATE_OUTPUTS[0], ir.DataType.FLOAT),
                                   (ids, contract.CANDIDATE_OUTPUTS[1], ir.DataType.INT64)):
            (output,) = add_node(graph, "Squeeze", [value, squeeze_axis], name=f"candidates/{name}")
            output.name, output.shape, output.type = name, ir.Shape([batch, k]), ir.TensorType(dtype)
            graph.outputs.append(output)
    return facts


def lowest_best_id_first(graph: ir.Graph, values: ir.Value, ids: ir.Value, k: int) -> ir.Value:
    """`ids` (TopK's, [..., K], best first) with the lowest id among those scoring `values[..., 0]` swapped
    into the first place; the (id, score) pairs stay the same, as the two scores swapped are equal. On ids
    as floats (exact below 2**24, past any vocabulary), which onnxruntime's ReduceMin and Where take on the
    CPU and on CUDA alike (pytest -m cuda loads these graphs with every node on CUDA)."""
    name = "candidates/lowest_first"
    last_axis = constant(graph, f"{name}/last_axis", np.array([-1], np.int64))
    first_column = [constant(graph, f"{name}/zero", np.array([0], np.int64)),
                    constant(graph, f"{name}/one", np.array([1], np.int64)), last_axis]  # Slice's starts, ends, axes
    (id_values,) = add_node(graph, "Cast", [ids], {"to": ir.DataType.FLOAT}, name=f"{name}/ids_as_float")
    (best,) = add_node(graph, "Slice", [values, *first_column], name=f"{name}/best")
    (tied,) = add_node(graph, "Equal", [values, best], name=f"{name}/tied")
    (tied_ids,) = add_node(graph, "Where", [tied, id_values, constant(graph, f"{name}/inf", np.array(np.inf, np.float32))],
                           name=f"{name}/tied_ids")
    (lowest,) = add_node(graph, "ReduceMin", [tied_ids, last_axis], {"keepdims": 1}, name=f"{name}/lowest")
    (first,) = add_node(graph, "Slice", [id_values, *first_column], name=f"{name}/first")
    (is_lowest,) = add_node(graph, "Equal", [id_values, lowest], name=f"{name}/is_lowest")
    (swapped,) = add_node(graph, "Where", [is_lowest, first, id_values], name=f"{name}/first_to_its_place")
    (reordered,) = add_node(graph, "Where", [constant(graph, f"{name}/at_front", np.arange(k) == 0), lowest, swapped],
                            name=f"{name}/lowest_to_front")
    return add_node(graph, "Cast", [reordered], {"to": ir.DataType.INT64}, name=f"{name}/ids")[0]


FUSION = Fusion(NAME, lambda facts: int(facts.last_token_logits), find, check, build)
