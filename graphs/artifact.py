"""Write an optimized graph into an artifact folder next to the portable one and record it in the manifest.

Initializers the passes left untouched keep pointing into the portable graph's data file; new or
changed ones (packed, interleaved, cast, rope tables) go to the optimized graph's own data file,
computed one tensor at a time. Files are written under temporary names and renamed once complete,
then the other hosts' configs (artifact/hosts.py), the manifest last: it never names a graph that is
not whole.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx
import onnx_ir as ir

from artifact import contract, files
from artifact.hosts import write_host_configs

from .errors import GraphError
from .facts import TARGET_DTYPES
from .pipeline import PASSES, PassReport, optimize

TYPE_NAMES = {number: name for name, number in contract.ELEMENT_TYPES.items()}


def optimize_artifact(artifact: str | Path, target: str, dtype: str | None = None,
                      int4_accuracy: int | None = None) -> contract.GraphEntry:
    """Build `onnx/model_{target}.onnx` from the portable graph; returns the manifest's new graph entry.
    `int4_accuracy`: see pipeline.optimize."""
    artifact = Path(artifact)
    manifest = contract.read_manifest(artifact)
    portable = manifest.graph(contract.PORTABLE_GRAPH)
    if portable is None:
        raise contract.ArtifactError(f"{artifact} has no portable graph to optimize; re-export it")
    files.check_contained(artifact)
    files.check_files(artifact, portable.files)
    model = ir.load(files.inside(artifact, portable.file))
    reports = optimize(model, manifest, target, dtype, PASSES, int4_accuracy)
    graph_file = contract.graph_file(target)
    write_graph(model, artifact / graph_file, contract.data_file(target))
    folder = contract.GRAPH_FOLDER
    graph_files = [graph_file, f"{folder}/{contract.data_file(target)}", f"{folder}/{contract.data_file()}"]
    entry = graph_entry(artifact, model, manifest.task, target, dtype or TARGET_DTYPES[target][0], graph_files, reports)
    contract.write_manifest(artifact, write_host_configs(artifact, manifest.with_graph(entry)))
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
    """Stream every initializer that is not already in the portable data file into `path`, each computed
    once and written from its array (no bytes copy: the largest, an fp16 embedding, is a GB)."""
    offset = 0
    with path.open("wb") as f:
        for name, value in model.graph.initializers.items():
            tensor = value.const_value
            if isinstance(tensor, ir.ExternalTensor) and Path(tensor.location).name == contract.data_file():
                continue
            size = tensor.nbytes
            if size <= contract.INLINE_BYTES:
                value.const_value = ir.Tensor(tensor.numpy(), dtype=tensor.dtype, name=name)
                continue
            offset = contract.aligned_offset(offset, size)
            f.seek(offset)
            tensor.tofile(f)
            if f.tell() != offset + size:
                raise GraphError(f"{name}: wrote {f.tell() - offset} bytes, expected {size}")
            value.const_value = ir.ExternalTensor(location, offset, size, tensor.dtype, shape=tensor.shape,
                                                  name=name, base_dir=path.parent)
            offset += size
    return path


def tensor_spec(value: ir.Value) -> contract.TensorSpec:
    return contract.TensorSpec(value.name, TYPE_NAMES[int(value.dtype)],
                               tuple(d if isinstance(d, int) else str(d) for d in value.shape))


def graph_entry(artifact: Path, model: ir.Model, task: str, target: str, dtype: str, files: list[str],
                reports: list[PassReport]) -> contract.GraphEntry:
    outputs = {v.name: v for v in model.graph.outputs}
    candidates = outputs.get(contract.CANDIDATE_OUTPUTS[0])
    generation = task == contract.TEXT_GENERATION
    return contract.GraphEntry(
        name=contract.optimized_graph_name(target), file=files[0], target=target,
        files={f: contract.FileRecord.of(artifact / f) for f in files},
        opset=model.opset_imports.get("", contract.PORTABLE_OPSET),
        # rows are right-padded (GroupQueryAttention); generation: past and present share one buffer per layer,
        # logits come for each row's last token; other tasks: no cache, their own outputs
        kv_layout=contract.SHARED_BUFFER if generation else contract.NO_CACHE, padding=contract.RIGHT,
        logits=contract.LAST_TOKEN if generation else task,
        inputs=tuple(tensor_spec(v) for v in model.graph.inputs),
        outputs=tuple(tensor_spec(v) for v in model.graph.outputs),
        activation_dtype=dtype,
        token_candidates=candidates.shape[-1] if candidates is not None else 0,
        passes=tuple(r.count() for r in reports),
    )
