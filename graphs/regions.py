"""Find subgraphs by the PyTorch module that produced them.

torch.onnx records each node's module path in the `pkg.torch.onnx.name_scopes` metadata
(e.g. ['', 'model.layers.0', 'model.layers.0.self_attn', 'matmul']). A fusion's *find* step
collects a module's nodes; its *check* step then verifies the region's boundary.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass

import onnx_ir as ir

SCOPES_KEY = "pkg.torch.onnx.name_scopes"


def scopes_of(node: ir.Node) -> tuple[str, ...]:
    raw = node.metadata_props.get(SCOPES_KEY)
    return tuple(ast.literal_eval(raw)) if raw else ()


def nodes_in_scope(graph: ir.Graph, scope: str, exclude: tuple[str, ...] = ()) -> list[ir.Node]:
    """Nodes made inside module `scope`, leaving out those made inside any `exclude` sub-module."""
    chosen = []
    for node in graph:
        scopes = scopes_of(node)
        if scope in scopes and not any(sub in scopes for sub in exclude):
            chosen.append(node)
    return chosen


@dataclass(frozen=True)
class Region:
    nodes: tuple[ir.Node, ...]
    inputs: tuple[ir.Value, ...]  # produced outside (graph inputs or other nodes), initializers excluded
    outputs: tuple[ir.Value, ...]  # produced inside, used outside or graph outputs


def region_of(nodes: list[ir.Node]) -> Region:
    inside = set(nodes)
    inputs: list[ir.Value] = []
    outputs: list[ir.Value] = []
    for node in nodes:
        for value in node.inputs:
            if value is None or value.is_initializer() or value in inputs:
                continue
            if value.producer() not in inside:
                inputs.append(value)
        for value in node.outputs:
            used_outside = any(user not in inside for user, _ in value.uses())
            if used_outside or value.is_graph_output():
                outputs.append(value)
    return Region(tuple(nodes), tuple(inputs), tuple(outputs))


def initializers_of(nodes: list[ir.Node] | tuple[ir.Node, ...]) -> list[ir.Value]:
    seen: list[ir.Value] = []
    for node in nodes:
        for value in node.inputs:
            if value is not None and value.is_initializer() and value not in seen:
                seen.append(value)
    return seen


def node_path(node: ir.Node) -> str:
    """A readable hierarchical name from the module scope: model.layers.0.mlp.shared_expert -> layers.0/mlp/shared_expert."""
    modules = [s for s in scopes_of(node) if s.startswith(("model.", "lm_head"))]
    if not modules:
        return node.name or node.op_type
    parts = modules[-1].removeprefix("model.").split(".")
    if parts[0] == "layers" and len(parts) > 1:
        parts = [f"layers.{parts[1]}"] + parts[2:]
    return "/".join(parts)
