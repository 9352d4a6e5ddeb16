"""Write an optimized graph into an artifact folder next to the portable one and record it in the manifest.

Initializers the passes left untouched keep pointing into the portable graph's data file; new or
changed ones (packed, interleaved, cast, rope tables) go to the optimized graph's own data file,
computed one tensor at a time. Files are written under temporary names and renamed at the end,
manifest last, so an interrupted run leaves the artifact as it was.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from qwen2_export.files import aligned_offset, file_record

from .fusions.token_candidates import OUTPUTS
from .pipeline import PassReport, optimize

PORTABLE_DATA = "model.onnx_data"
INLINE_BYTES = 1024
ONNX_TYPE_NAMES = {1: "float32", 10: "float16", 16: "bfloat16", 7: "int64", 6: "int32"}


def optimize_artifact(artifact: str | Path, target: str, dtype: str | None = None,
                      pack_gate_up: bool = True) -> dict[str, Any]:
    """Build `onnx/model_{target}.onnx` from the portable graph; returns the manifest's new graph entry.
    `pack_gate_up`: see graphs.pipeline.optimize."""
    artifact = Path(artifact)
    manifest_path = artifact / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    portable = next(g for g in manifest["graphs"] if g["name"] == "portable")
    model = ir.load(artifact / portable["file"])
    reports = optimize(model, manifest, target, dtype, pack_gate_up=pack_gate_up)
    graph_file, data_file = f"onnx/model_{target}.onnx", f"model_{target}.onnx_data"
    write_graph(model, artifact / graph_file, data_file)
    entry = graph_entry(artifact, model, target, graph_file, [graph_file, f"onnx/{data_file}", f"onnx/{PORTABLE_DATA}"], reports)
    manifest["graphs"] = [g for g in manifest["graphs"] if g["name"] != entry["name"]] + [entry]
    manifest_tmp = manifest_path.with_suffix(".json.partial")
    manifest_tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(manifest_tmp, manifest_path)
    return entry


def write_graph(model: ir.Model, graph_path: Path, data_file: str) -> None:
    """Save `model` as `graph_path` with its new weights in `data_file` beside it; both appear only
    once complete (written as *.partial, then renamed)."""
    data_path = graph_path.parent / data_file
    partial_graph, partial_data = graph_path.with_name(graph_path.name + ".partial"), data_path.with_name(data_file + ".partial")
    try:
        write_new_weights(model, partial_data, data_file)
        onnx.save_model(ir.serde.serialize_model(model), partial_graph)
        os.replace(partial_data, data_path)
        os.replace(partial_graph, graph_path)
    except BaseException:
        partial_graph.unlink(missing_ok=True)
        partial_data.unlink(missing_ok=True)
        raise


def write_new_weights(model: ir.Model, path: Path, location: str) -> Path:
    """Stream every initializer that is not already in the portable data file into `path`."""
    offset = 0
    with path.open("wb") as f:
        for name, value in model.graph.initializers.items():
            tensor = value.const_value
            if isinstance(tensor, ir.ExternalTensor) and Path(tensor.location).name == PORTABLE_DATA:
                continue
            data = tensor.tobytes()
            if len(data) <= INLINE_BYTES:
                value.const_value = ir.Tensor(tensor.numpy(), dtype=tensor.dtype, name=name)
                continue
            offset = aligned_offset(offset, len(data))
            f.seek(offset)
            f.write(data)
            value.const_value = ir.ExternalTensor(location, offset, len(data), tensor.dtype, shape=tensor.shape,
                                                  name=name, base_dir=path.parent)
            offset += len(data)
    return path


def graph_entry(artifact: Path, model: ir.Model, target: str, graph_file: str, files: list[str],
                reports: list[PassReport]) -> dict[str, Any]:
    def describe(value: ir.Value) -> dict[str, Any]:
        dims = [d if isinstance(d, int) else str(d) for d in value.shape]
        return {"name": value.name, "dtype": ONNX_TYPE_NAMES[int(value.dtype)], "dims": dims}

    return {
        "name": f"optimized-{target}",
        "file": graph_file,
        "target": target,
        "files": {f: file_record(artifact / f) for f in files},
        "opset": model.opset_imports.get("", 23),
        # past and present share one buffer per layer: bind the same OrtValue to past_key_values.i.* and
        # present.i.*; its length is the capacity the runtime chooses (prompt + new tokens, at most the context)
        "kv_cache": {"layout": "shared_buffer", "order": "key, value per layer", "dims": "[batch, kv_heads, capacity, head_dim]"},
        # rows are right-padded: attention_mask is 1 on each row's tokens (cached and new), 0 after
        "padding": "right",
        "logits": "last_token",  # [batch, 1, vocab]: each row's last real token, fp32
        # the graph input total_sequence_length: int32 scalar in host memory, the attention_mask's width
        "total_sequence_length": "attention_mask width",
        **candidates_entry(model.graph),
        "activation_dtype": ONNX_TYPE_NAMES[int(next(v for v in model.graph.inputs if v.name.startswith("past")).dtype)],
        "passes": [r.describe() for r in reports],
        "inputs": [describe(v) for v in model.graph.inputs],
        "outputs": [describe(v) for v in model.graph.outputs],
    }


def candidates_entry(graph: ir.Graph) -> dict[str, Any]:
    """Describe the device-side next-token candidates, when the graph has them."""
    outputs = {v.name: v for v in graph.outputs}
    if not all(name in outputs for name in OUTPUTS):
        return {}
    # top_logits / top_ids [batch, k]: the k best scores of each row's logits over the tokenizer's
    # vocabulary, best first, and their token ids
    return {"token_candidates": {"k": outputs[OUTPUTS[0]].shape[-1], "outputs": list(OUTPUTS)}}
