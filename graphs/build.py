"""Small helpers that add nodes and initializers and return value handles, so wiring flows through
return values. Node names are hierarchical ("layers.3/attn/GroupQueryAttention")."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import onnx_ir as ir

MS_DOMAIN = "com.microsoft"


def add_node(graph: ir.Graph, op_type: str, inputs: list[ir.Value | None], attributes: dict[str, Any] | None = None,
             *, name: str, domain: str = "", num_outputs: int = 1) -> tuple[ir.Value, ...]:
    """Append a node (the pipeline sorts the graph after each pass) and return its outputs."""
    node = ir.Node(domain, op_type, inputs, ir.convenience.convert_attributes(attributes or {}),
                   num_outputs=num_outputs, name=name)
    for index, value in enumerate(node.outputs):
        value.name = f"{name}/output_{index}"
    graph.append(node)
    return tuple(node.outputs)


def add_initializer(graph: ir.Graph, name: str, dtype: ir.DataType, shape: tuple[int, ...],
                    compute: Callable[[], np.ndarray]) -> ir.Value:
    """An initializer whose data is computed only when the optimized graph is saved."""
    def tensor() -> ir.Tensor:
        return ir.Tensor(np.ascontiguousarray(compute()), dtype=dtype)

    value = ir.Value(name=name, shape=ir.Shape(shape), type=ir.TensorType(dtype),
                     const_value=ir.LazyTensor(tensor, dtype, ir.Shape(shape), name=name))
    graph.register_initializer(value)
    return value


def constant(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """A small initializer with its data in memory (shape constants, indices)."""
    value = ir.Value(name=name, shape=ir.Shape(array.shape), const_value=ir.Tensor(array, name=name))
    value.type = ir.TensorType(value.const_value.dtype)
    graph.register_initializer(value)
    return value


def replace_graph_output(graph: ir.Graph, old: ir.Value, new: ir.Value) -> None:
    """`new` takes `old`'s place, name and shape among the graph outputs."""
    index = list(graph.outputs).index(old)
    name, shape, value_type = old.name, old.shape, old.type
    old.name = f"{name}/replaced"
    graph.outputs[index] = new
    new.name, new.shape = name, shape
    new.type = new.type or value_type


def replace_value(graph: ir.Graph, old: ir.Value, new: ir.Value) -> None:
    """Point every consumer of `old` at `new`; a graph output keeps its name and place."""
    if old.is_graph_output():
        replace_graph_output(graph, old, new)
    old.replace_all_uses_with(new)


def remove_unused(graph: ir.Graph) -> None:
    """Delete nodes whose outputs nobody reads, then initializers nobody reads."""
    changed = True
    while changed:
        changed = False
        for node in reversed(list(graph)):
            if all(not value.uses() and not value.is_graph_output() for value in node.outputs):
                graph.remove(node, safe=True)
                changed = True
    for name, value in list(graph.initializers.items()):
        if not value.uses() and not value.is_graph_output():
            del graph.initializers[name]
