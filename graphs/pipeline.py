"""The only place that knows the pass order. Runs each pass as find -> check -> build, counts what
fired, and fails when a count differs from what the model implies (one attention per layer, ...).

    portable graph --GroupQueryAttention--> --last_token_logits--> --tied_lm_head--> --MoE--> --MatMulNBits--> --packed_qkv-->
                   --packed_gate_up (CPU, int4)--> --SimplifiedLayerNormalization--> --SkipSimplifiedLayerNormalization-->
                   --precision--> --token_candidates--> optimized graph
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

from artifact import contract

from .attention_inputs import attention_lengths
from .build import MS_DOMAIN, remove_unused
from .errors import GraphError
from .facts import TARGET_DTYPES, ModelFacts, PassFacts
from .fusion import Fusion
from .fusions import gqa, int4_matmul, last_logits, moe, packed_matmul, precision, rms_norm, tied_lm_head, token_candidates

PASSES: tuple[Fusion, ...] = (
    gqa.FUSION, last_logits.FUSION, tied_lm_head.FUSION, moe.FUSION, int4_matmul.FUSION, packed_matmul.QKV, packed_matmul.GATE_UP,
    rms_norm.NORM, rms_norm.SKIP, precision.FUSION, token_candidates.FUSION,
)


@dataclass(frozen=True)
class PassReport:
    name: str
    fired: int
    expected: int
    rejected: tuple[str, ...]  # reasons given by `check` for candidates it turned down

    def count(self) -> contract.PassCount:
        return contract.PassCount(self.name, self.fired, self.expected)


def run_pass(graph: ir.Graph, fusion: Fusion, facts: PassFacts) -> tuple[PassFacts, PassReport]:
    results = [fusion.check(graph, candidate, facts) for candidate in fusion.find(graph, facts)]
    accepted = [r for r in results if not isinstance(r, str)]
    expected = fusion.expected(facts)
    facts = fusion.build(graph, accepted, facts)
    remove_unused(graph)
    graph.sort()
    return facts, PassReport(fusion.name, len(accepted), expected, tuple(r for r in results if isinstance(r, str)))


def packs_gate_up(target: str, model: ModelFacts) -> bool:
    """Whether gate and up become one GEMM and a Split. Float weights on CUDA stay two GEMMs: at Qwen2-7B
    shapes on the H200 they prefill 16 x 512 tokens 7% faster and decode as fast (tools/gpu_notes.md,
    session 15). CPU and int4 graphs keep the one GEMM (not re-measured)."""
    return target == "cpu" or model.quantized_linears > 0


def optimize(model: ir.Model, manifest: contract.Manifest, target: str, dtype: str | None = None,
             passes: tuple[Fusion, ...] = PASSES, int4_accuracy: int | None = None) -> list[PassReport]:
    """Rewrite the portable `model` in place for `target` ("cpu" or "cuda") with `passes` (a subset of
    PASSES, in their order); returns the pass reports. `int4_accuracy`: MatMulNBits' accuracy_level for
    int4 weights (default: int8 activations on CPU, where they are several times faster). Raises GraphError
    naming every pass whose count differs from what the model implies."""
    if target not in TARGET_DTYPES:
        raise GraphError(f"target {target!r} is not supported; choose one of {sorted(TARGET_DTYPES)}")
    dtype = dtype or TARGET_DTYPES[target][0]
    if dtype not in TARGET_DTYPES[target]:
        raise GraphError(f"{target} graphs run {list(TARGET_DTYPES[target])} (GroupQueryAttention and MoE kernels); not {dtype}")
    if target == "cuda" and (refusal := moe.cuda_qmoe_refusal(manifest)):
        raise GraphError(refusal)
    if int4_accuracy is None:
        int4_accuracy = int4_matmul.INT8_ACTIVATIONS if target == "cpu" else int4_matmul.EXACT
    if int4_accuracy not in int4_matmul.ACCURACY_LEVELS:
        raise GraphError(f"int4 accuracy level {int4_accuracy} is not supported; choose one of {int4_matmul.ACCURACY_LEVELS}")
    graph = model.graph
    facts = PassFacts(ModelFacts.from_manifest(manifest), attention_lengths(graph), dtype, int4_accuracy)
    if not packs_gate_up(target, facts.model):
        passes = tuple(p for p in passes if p is not packed_matmul.GATE_UP)
    reports = []
    for fusion in passes:
        facts, report = run_pass(graph, fusion, facts)
        reports.append(report)
    failed = [r for r in reports if r.fired != r.expected]
    if failed:
        raise GraphError("; ".join(
            f"{r.name} fired {r.fired} times, expected {r.expected}" + (f" (rejected: {r.rejected[0]})" if r.rejected else "")
            for r in failed
        ))
    settle_interface(graph)
    model.opset_imports.setdefault(MS_DOMAIN, 1)
    return reports


def settle_interface(graph: ir.Graph) -> None:
    """Drop inputs nothing reads (position_ids: GroupQueryAttention derives positions from seqlens_k) and
    give past and present their shared buffer's dim: one buffer of a capacity the host chooses."""
    for value in list(graph.inputs):
        if not value.uses():
            graph.inputs.remove(value)
    for value in [*graph.inputs, *graph.outputs]:
        if value.name.startswith((contract.PAST + ".", contract.PRESENT + ".")):
            batch, heads, _, head_dim = value.shape
            value.shape = ir.Shape([batch, heads, ir.SymbolicDim(contract.KV_CAPACITY), head_dim])
    remove_unused(graph)
    graph.sort()
