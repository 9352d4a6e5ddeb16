"""The only place that knows the pass order. Runs each fusion as find -> check -> build, counts what
fired, and fails when a count differs from what the model implies (one attention per layer, ...).

    portable graph --GroupQueryAttention--> --last_token_logits--> --tied_lm_head--> --MoE--> --packed_qkv--> --packed_gate_up-->
                   --SimplifiedLayerNormalization--> --SkipSimplifiedLayerNormalization--> --precision-->
                   --token_candidates--> optimized graph
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import onnx_ir as ir

from .attention_inputs import attention_lengths
from .build import remove_unused
from .facts import TARGET_DTYPES, ModelFacts
from .fusions import gqa, last_logits, moe, packed_matmul, precision, rms_norm, tied_lm_head, token_candidates

IR_FLOAT_TYPES = {"float32": ir.DataType.FLOAT, "float16": ir.DataType.FLOAT16, "bfloat16": ir.DataType.BFLOAT16}


class PipelineError(RuntimeError):
    """A pass fired a different number of times than the model implies; the message names it."""


@dataclass(frozen=True)
class PassReport:
    name: str
    fired: int
    expected: int
    rejected: tuple[str, ...]  # reasons given by `check` for candidates it turned down

    def describe(self) -> dict[str, Any]:
        return {"pass": self.name, "fired": self.fired, "expected": self.expected}


def run_fusion(graph: ir.Graph, facts: ModelFacts, name: str, expected: int, find: Callable, check: Callable,
               build: Callable, *build_extra: Any) -> PassReport:
    results = [check(graph, candidate, facts) for candidate in find(graph, facts)]
    accepted = [r for r in results if not isinstance(r, str)]
    build(graph, accepted, facts, *build_extra)
    remove_unused(graph)
    graph.sort()
    return PassReport(name, len(accepted), expected, tuple(r for r in results if isinstance(r, str)))


def optimize(model: ir.Model, manifest: dict[str, Any], target: str, dtype: str | None = None,
             only: tuple[str, ...] | None = None, pack_gate_up: bool = True) -> list[PassReport]:
    """Rewrite the portable `model` in place for `target` ("cpu" or "cuda"); returns the pass reports.

    `only` runs a subset of the fusions (by NAME, still in pipeline order) for tests of one fusion.
    `pack_gate_up` computes gate and up with one GEMM and a Split; False leaves two GEMMs (faster
    prefill of long prompts, slower decode on the H100: tools/gpu_notes.md).
    """
    if target not in TARGET_DTYPES:
        raise PipelineError(f"target {target!r} is not supported; choose one of {sorted(TARGET_DTYPES)}")
    dtype = dtype or TARGET_DTYPES[target][0]
    if dtype not in TARGET_DTYPES[target]:
        raise PipelineError(f"{target} graphs run {list(TARGET_DTYPES[target])} (GroupQueryAttention and MoE kernels); not {dtype}")
    facts = ModelFacts.from_manifest(manifest)
    graph = model.graph
    layers, sparse = facts.num_layers, len(facts.sparse_layers)
    lengths = attention_lengths(graph)
    fusions = [
        (gqa.NAME, layers, gqa.find, gqa.check, gqa.build, lengths),
        (last_logits.NAME, 1, last_logits.find, last_logits.check, last_logits.build, lengths),
        # needs one position per row, so only after last_token_logits
        (tied_lm_head.NAME, int(facts.tied_embeddings), tied_lm_head.find, tied_lm_head.check, tied_lm_head.build),
        (moe.NAME, sparse, moe.find, moe.check, moe.build),
        (packed_matmul.NAME, layers, packed_matmul.find, packed_matmul.check, packed_matmul.build),
        # every layer has one gate/up pair outside the routed experts: the dense MLP or the shared expert
        (packed_matmul.GATE_UP_NAME, layers, packed_matmul.find_gate_up, packed_matmul.check_gate_up,
         packed_matmul.build_gate_up),
        (rms_norm.NAME, 2 * layers + 1, rms_norm.find, rms_norm.check, rms_norm.build),
        # all but the first norm (reads the embeddings) and, after last_token_logits, the final one
        (rms_norm.SKIP_NAME, 2 * layers - (1 if only is None or last_logits.NAME in only else 0),
         lambda g, f: rms_norm.find_residual(g), lambda g, c, f: rms_norm.check_residual(c), rms_norm.build_residual),
    ]
    reports = [run_fusion(graph, facts, *fusion) for fusion in fusions
               if (only is None or fusion[0] in only) and (pack_gate_up or fusion[0] != packed_matmul.GATE_UP_NAME)]
    failed = [r for r in reports if r.fired != r.expected]
    if failed:
        raise PipelineError("; ".join(
            f"{r.name} fired {r.fired} times, expected {r.expected}" + (f" (rejected: {r.rejected[0]})" if r.rejected else "")
            for r in failed
        ))
    converted = precision.set_float_type(graph, IR_FLOAT_TYPES[dtype])
    reports.append(PassReport(precision.NAME, converted, converted, ()))
    if only is None or last_logits.NAME in only:  # TopK over [B, 1, V] only, never over a prompt's [B, S, V]
        added = token_candidates.add_candidates(graph, facts)
        reports.append(PassReport(token_candidates.NAME, added, 1, ()))
        if not added:
            raise PipelineError(f"{token_candidates.NAME}: the graph has no last-token logits [batch, 1, vocab]")
    for value in list(graph.inputs):  # GroupQueryAttention derives positions from seqlens_k
        if not value.uses():
            graph.inputs.remove(value)
    for value in [*graph.inputs, *graph.outputs]:  # past and present are one buffer of chosen capacity
        if value.name.startswith(("past_key_values.", "present.")):
            batch, heads, _, head_dim = value.shape
            value.shape = ir.Shape([batch, heads, ir.SymbolicDim("kv_capacity"), head_dim])
    remove_unused(graph)
    graph.sort()
    model.opset_imports.setdefault("com.microsoft", 1)
    return reports
