"""RMSNorm -> SimplifiedLayerNormalization; with the residual Add before it -> SkipSimplifiedLayerNormalization.

Before (module *.input_layernorm, *.post_attention_layernorm, model.norm):

    x --Cast fp32--> Pow 2 --> ReduceMean --> Add eps --> Sqrt --> Reciprocal --> Mul x --> Cast --> Mul weight

After:  SimplifiedLayerNormalization(x, weight, axis=-1, epsilon=config eps, stash_type=1 (fp32 statistics))

Then, where x = Add(residual, branch) and that sum also feeds the next residual Add:

    SkipSimplifiedLayerNormalization(branch, residual, weight, epsilon) -> (normed, "", "", sum)

The op's default epsilon (1e-5 / 1e-12) is wrong for Qwen2, so epsilon always comes from config.json.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import onnx_ir as ir

from ..build import MS_DOMAIN, add_node, replace_value
from ..facts import PassFacts
from ..fusion import Fusion
from ..regions import Region, initializers_of, nodes_in_scope, region_of

NAME = "SimplifiedLayerNormalization"
FINAL_NORM = "model.norm"
SKIP_NAME = "SkipSimplifiedLayerNormalization"


@dataclass(frozen=True)
class Norm:
    scope: str
    input: ir.Value
    weight: ir.Value
    output: ir.Value


def norm_scopes(facts: PassFacts) -> list[str]:
    layers = range(facts.model.num_layers)
    per_layer = [f"model.layers.{i}.{name}" for i in layers for name in ("input_layernorm", "post_attention_layernorm")]
    return per_layer + [FINAL_NORM]


def find(graph: ir.Graph, facts: PassFacts) -> list[tuple[str, Region]]:
    return [(scope, region_of(nodes)) for scope in norm_scopes(facts) if (nodes := nodes_in_scope(graph, scope))]


def check(graph: ir.Graph, candidate: tuple[str, Region], facts: PassFacts) -> Norm | str:
    scope, region = candidate
    weights = initializers_of(region.nodes)
    # values made by earlier passes carry no type yet, so rule out integer (shape) inputs instead
    float_inputs = [v for v in region.inputs if v.dtype not in (ir.DataType.INT64, ir.DataType.INT32)]
    if len(float_inputs) != 1 or len(region.outputs) != 1:
        return f"{scope}: expected one input and one output, found {len(float_inputs)} and {len(region.outputs)}"
    scale = [w for w in weights if w.shape is not None and list(w.shape) == [facts.model.hidden_size]]
    if len(scale) != 1 or not any(n.op_type == "ReduceMean" for n in region.nodes):
        return f"{scope}: not an RMSNorm (no [hidden] weight or no ReduceMean)"
    return Norm(scope, float_inputs[0], scale[0], region.outputs[0])


def build(graph: ir.Graph, found: list[Norm], facts: PassFacts) -> PassFacts:
    for norm in found:
        (out,) = add_node(graph, "SimplifiedLayerNormalization", [norm.input, norm.weight],
                          {"axis": -1, "epsilon": facts.model.rms_norm_eps, "stash_type": 1},
                          name=f"{norm.scope.removeprefix('model.')}/SimplifiedLayerNormalization")
        replace_value(graph, norm.output, out)
        if norm.scope == FINAL_NORM:
            facts = replace(facts, final_hidden=out)
    return facts


@dataclass(frozen=True)
class ResidualNorm:
    norm: ir.Node
    add: ir.Node


def find_residual(graph: ir.Graph, facts: PassFacts) -> list[ir.Node]:
    return [node for node in graph if node.op_type == "SimplifiedLayerNormalization"]


def check_residual(graph: ir.Graph, norm: ir.Node, facts: PassFacts) -> ResidualNorm | str:
    add = norm.inputs[0].producer()
    if add is None or add.op_type != "Add":
        return f"{norm.name}: input is not a residual Add"
    a, b = add.inputs
    if a is None or b is None or a.is_initializer() or b.is_initializer() or a.shape != b.shape:
        return f"{norm.name}: the Add is not a sum of two same-shaped activations"
    return ResidualNorm(norm, add)


def build_residual(graph: ir.Graph, found: list[ResidualNorm], facts: PassFacts) -> PassFacts:
    for pair in found:
        branch, residual = pair.add.inputs
        name = pair.norm.name.replace("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization")
        out, _, _, total = add_node(graph, "SkipSimplifiedLayerNormalization", [branch, residual, pair.norm.inputs[1]],
                                    {"epsilon": facts.model.rms_norm_eps}, name=name, domain=MS_DOMAIN, num_outputs=4)
        _, mean, inv_std, _ = total.producer().outputs
        mean.name, inv_std.name = "", ""  # unused optional outputs
        if pair.norm.outputs[0] is facts.final_hidden:
            facts = replace(facts, final_hidden=out)
        replace_value(graph, pair.norm.outputs[0], out)
        replace_value(graph, pair.add.outputs[0], total)
    return facts


NORM = Fusion(NAME, lambda facts: 2 * facts.model.num_layers + 1, find, check, build)
# every norm but the first (it reads the embeddings) and, once logits are per row, the final one
SKIP = Fusion(SKIP_NAME, lambda facts: 2 * facts.model.num_layers - int(facts.last_token_logits),
              find_residual, check_residual, build_residual)
