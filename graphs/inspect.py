"""Describe an artifact's graphs: op histogram, inputs and outputs (for `qwen2-onnx inspect` and tests)."""

from __future__ import annotations

import collections
from pathlib import Path

import onnx

from artifact import contract, files


def op_histogram(graph_path: Path) -> dict[str, int]:
    """Count of each op ("domain::Op" for non-standard domains), most frequent first."""
    graph = onnx.load(str(graph_path), load_external_data=False).graph
    counts = collections.Counter(f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type for n in graph.node)
    return dict(counts.most_common())


def describe_artifact(artifact: str | Path) -> str:
    """A readable report of every graph in the artifact's manifest."""
    artifact = Path(artifact)
    manifest = contract.read_manifest(artifact)
    lines = [f"{artifact}: {manifest.architecture}, {manifest.model.num_hidden_layers} layers, dtype {manifest.dtype}"]
    if (q := manifest.quantization) is not None:
        lines.append(f"int{q.bits} weights ({q.method}, blocks of {q.group_size}, "
                     f"{'symmetric' if q.symmetric else 'zero points'}): {', '.join(q.projections)}")
    for graph in manifest.graphs:
        histogram = op_histogram(files.inside(artifact, graph.file))
        lines.append(f"\ngraph {graph.name} ({graph.file}, target {graph.target}, "
                     f"KV {graph.kv_layout}, {graph.padding} padding): {sum(histogram.values())} nodes")
        lines += [f"  {count:6d}  {op}" for op, count in histogram.items()]
        for kind, specs in (("inputs", graph.inputs), ("outputs", graph.outputs)):
            lines.append(f"  {kind}:")
            lines += [f"    {spec.name}: {spec.dtype} {list(spec.dims)}" for spec in specs]
        if graph.passes:
            lines.append("  passes: " + ", ".join(f"{p.name} x{p.fired}" for p in graph.passes))
    return "\n".join(lines)
