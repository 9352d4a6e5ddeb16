"""Checkpoint folder -> self-describing artifact folder with a portable ONNX graph.

    trace the model on `meta` (no weights in memory)  ->  onnx_ir graph whose initializers are empty
    lay out one external-data file                    ->  stream every checkpoint tensor into its slot
    point each initializer at its slot                ->  save model.onnx, copy tokenizer files, manifest

Everything is written into a hidden sibling folder and renamed into place only when complete, so an
interrupted export never leaves something that looks finished (staging.py: what an export may
replace or remove).
"""

from __future__ import annotations

import contextlib
import io
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnx_ir as ir
import onnxscript.optimizer
import torch

from artifact import contract, uint4
from artifact.hosts import write_host_configs

from . import io_spec
from . import staging as staging_area
from . import int4
from .checkpoint import CHUNK_BYTES, TensorEntry, list_tensors, plan_placements, quantized_parameters, read_chunks
from .config import Qwen2Config, load_config, round_to_nearest
from .errors import CheckpointError, ExportError
from .manifest import portable_manifest, token_facts
from .model import build_model
from .rope import rope_parameters

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
GRAPH_FILE = contract.graph_file()
DATA_FILE = contract.data_file()

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Slot:
    """Where one initializer's bytes sit in the external-data file."""

    offset: int
    length: int


def export_checkpoint(
    checkpoint_dir: str | Path,
    output_dir: str | Path,
    dtype: str = "fp32",
    force: bool = False,
    progress: Progress = lambda message: None,
    quantize: str | None = None,
    block_size: int = 32,
    symmetric: bool = False,
    task: str | None = None,
) -> Path:
    """Export `checkpoint_dir` to the artifact folder `output_dir`; returns its path. `quantize="int4"`
    rounds every projection to int4 per `block_size` inputs (with zero points unless `symmetric`) while
    streaming; int4 checkpoints (AWQ, GPTQ) keep their own codes without it. `task` (contract.TASKS)
    replaces the one config.json's architecture implies, e.g. feature-extraction of a causal LM.

    Raises ConfigError / CheckpointError for a bad checkpoint, ExportError for an output it may not
    replace (without `force`, or not an artifact) or too little disk space, OSError naming `output_dir`
    when writing fails. Peak memory follows one 64 MiB chunk plus the traced graph, not the model size.
    """
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r} is not supported; choose one of {sorted(DTYPES)}")
    if quantize not in (None, "int4"):
        raise ExportError(f"--quantize {quantize!r} is not supported; choose int4")
    source, target = Path(checkpoint_dir), Path(output_dir)
    staging_area.check_output(source, target, force)
    missing = [name for name in contract.CHECKPOINT_FILES if not (source / name).is_file()]
    config = load_config(source, task)
    if quantize:
        config = round_to_nearest(config, block_size, symmetric)
    if missing:
        raise CheckpointError(f"{source} lacks {missing}; an artifact carries the tokenizer, copy those files in")
    tokens = token_facts(source)  # a broken tokenizer stops the export before any work
    torch_dtype = DTYPES[dtype]
    entries = list_tensors(source)
    model = build_model(config, torch_dtype, "meta")
    parameters = dict(model.named_parameters())
    plan = plan_placements(entries, config, {name: tuple(p.shape) for name, p in parameters.items()})

    target.parent.mkdir(parents=True, exist_ok=True)
    staging_area.report_freed(staging_area.remove_stale_staging(target.parent), progress)
    staging_area.check_space(target.parent, weight_bytes(parameters, config))
    staging = staging_area.make_staging(target)
    try:
        (staging / contract.GRAPH_FOLDER).mkdir()
        started = time.monotonic()
        progress(f"tracing {config.architecture} ({config.num_hidden_layers} layers, {dtype})")
        graph = trace_to_onnx(model, config, torch_dtype)
        progress(f"traced in {time.monotonic() - started:.1f}s; writing weights")
        aliases = _parameter_aliases(model)
        quantized = quantized_parameters(config)  # int4 checkpoints: DequantizeLinear of [in, out] codes
        transposed = fold_weight_transposes(graph, _whole_parameters(plan, entries, aliases) | quantized)
        if quantized:
            int4.dequantize_weights(graph, quantized, config.quantization.group_size, config.quantization.symmetric)
        slots = lay_out(graph)
        data_path = staging / contract.GRAPH_FOLDER / DATA_FILE
        write_weights(data_path, graph, slots, transposed, aliases, entries, plan, config, progress)
        attach_external_data(graph, slots, data_path.parent)
        optimize_graph(graph, slots)
        onnx.save_model(ir.serde.serialize_model(graph), staging / GRAPH_FILE)
        onnx.checker.check_model(str(staging / GRAPH_FILE))
        for name in contract.CHECKPOINT_FILES + contract.OPTIONAL_CHECKPOINT_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, staging / name)  # not copy2: the artifact takes the umask's mode
        manifest = write_host_configs(staging, portable_manifest(staging, config, torch_dtype, tokens))
        contract.write_manifest(staging, manifest)
        staging_area.move_into_place(staging, target)
    except OSError as error:  # name the output, not the hidden staging folder; errno keeps the cause
        shutil.rmtree(staging, ignore_errors=True)
        raise OSError(error.errno, f"{error.strerror or error} while writing the artifact", str(target)) from error
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    progress(f"wrote {target} in {time.monotonic() - started:.1f}s")
    return target


def weight_bytes(parameters: dict[str, torch.nn.Parameter], config: Qwen2Config) -> int:
    """Bytes of the artifact's weights: an int4 parameter takes half a byte a weight, a scale and at most
    a byte of zero point a block; the others their dtype's size."""
    quantized = quantized_parameters(config)
    total = 0
    for name, parameter in parameters.items():
        count = parameter.numel()
        if name in quantized:
            total += count // 2 + count // config.quantization.group_size * (parameter.element_size() + 1)
        else:
            total += count * parameter.element_size()
    return total

def trace_to_onnx(model: torch.nn.Module, config: Qwen2Config, dtype: torch.dtype) -> ir.Model:
    """torch.export-based ONNX export of the meta model, with the io_spec names and symbolic dims."""
    inputs, outputs = io_spec.graph_inputs(config, dtype), io_spec.graph_outputs(config, dtype)
    dynamic = {spec.name: {i: d for i, d in enumerate(spec.dims) if isinstance(d, str)} for spec in inputs}
    example = io_spec.example_inputs(config, dtype, "meta")
    # The exporter narrates every step on stdout; keep library output quiet.
    with contextlib.redirect_stdout(io.StringIO()):
        program = torch.onnx.export(
            model,
            example,
            dynamo=True,
            optimize=False,  # constant folding would need the weights we deliberately do not load
            opset_version=contract.PORTABLE_OPSET,
            input_names=[spec.name for spec in inputs],
            output_names=[spec.name for spec in outputs],
            dynamic_shapes=dynamic_shapes(inputs, dynamic, config),
            verbose=False,
        )
    graph = program.model
    for value, spec in zip([*graph.graph.inputs, *graph.graph.outputs], [*inputs, *outputs], strict=True):
        if value.name != spec.name:
            raise ExportError(f"exported graph has {value.name!r} where {spec.name!r} was expected")
        value.shape = ir.Shape([ir.SymbolicDim(d) if isinstance(d, str) else d for d in spec.dims])
    graph.producer_name = "qwen2-onnx"
    return graph


def dynamic_shapes(inputs: tuple[contract.TensorSpec, ...], dynamic: dict[str, dict[int, str]], config: Qwen2Config) -> tuple:
    if config.task != contract.TEXT_GENERATION:  # forward(input_ids, attention_mask)
        return tuple(dynamic[spec.name] for spec in inputs)
    # forward(input_ids, attention_mask, position_ids, *past): the varargs form one tuple
    return (*(dynamic[spec.name] for spec in inputs[:3]), tuple(dynamic[spec.name] for spec in inputs[3:]))


def fold_weight_transposes(graph: ir.Model, whole_parameters: set[str]) -> set[str]:
    """Drop `Transpose(perm=[1, 0])` of 2-D weights by storing them as [in, out]; returns those names.

    transformers keeps Linear weights as [out, in] and the exporter emits MatMul(x, Transpose(W)).
    Writing W transposed into the data file spares onnxruntime a transposed copy of every weight at
    load time. Only weights filled by one whole checkpoint tensor are folded; a tied embedding (also
    read by Gather) and the stacked experts (whose [E, 2I, D] layout the MoE op wants) keep theirs.
    """
    folded = set()
    for node in list(graph.graph):
        weight = node.inputs[0] if node.op_type == "Transpose" and node.inputs else None
        if weight is None or not weight.is_initializer() or weight.name not in whole_parameters:
            continue
        perm = node.attributes.get("perm")
        if len(weight.shape) != 2 or perm is None or list(perm.as_ints()) != [1, 0] or len(weight.uses()) != 1:
            continue
        rows, columns = weight.shape
        weight.shape = ir.Shape([columns, rows])
        weight.doc_string = "stored transposed: [in_features, out_features]"
        node.outputs[0].replace_all_uses_with(weight)
        graph.graph.remove(node, safe=True)
        folded.add(weight.name)
    return folded


def optimize_graph(graph: ir.Model, slots: dict[str, Slot]) -> None:
    """onnxscript's cleanup (constant folding of shape arithmetic, dead code), never touching weights:
    folding a node that reads a weight would load it into memory and inline it into model.onnx."""

    def reads_weight(node: ir.Node) -> bool | None:
        return False if any(v is not None and v.is_initializer() and v.name in slots for v in node.inputs) else None

    onnxscript.optimizer.optimize_ir(graph, should_fold=reads_weight)


def lay_out(graph: ir.Model) -> dict[str, Slot]:
    """Assign every initializer a byte range in the data file, in graph order."""
    slots, offset = {}, 0
    for name, value in graph.graph.initializers.items():
        length = value.const_value.nbytes
        offset = contract.aligned_offset(offset, length)
        slots[name] = Slot(offset, length)
        offset += length
    return slots


def write_weights(
    data_path: Path,
    graph: ir.Model,
    slots: dict[str, Slot],
    transposed: set[str],
    aliases: dict[str, str],
    entries: list[TensorEntry],
    plan: dict,
    config: Qwen2Config,
    progress: Progress,
) -> None:
    """Stream every checkpoint tensor, cast, into its initializer's slot; derived tables are computed."""
    initializer_of = {aliases.get(name, name): name for name in graph.graph.initializers}
    dtype_of = {name: io_spec.TORCH_DTYPES[int(value.const_value.dtype)] for name, value in graph.graph.initializers.items()
                if int(value.const_value.dtype) in io_spec.TORCH_DTYPES}  # not the uint4 codes
    rounded = quantized_parameters(config) if config.quantization and config.quantization.method == "rtn" else set()
    total = sum(entry.end - entry.start for entry in entries)
    done, last_report, written = 0, time.monotonic(), set()
    with data_path.open("wb") as f:
        f.truncate(max((s.offset + s.length for s in slots.values()), default=0))
        for entry in entries:
            placement = plan[entry.name]
            part = None if placement is None or placement.part is None else \
                int4.LAYOUTS[config.quantization.method][placement.part]
            if placement is not None and placement.parameter in rounded:  # --quantize int4
                written.update(write_rtn_weight(f, entry, placement, slots, config.quantization,
                                                dtype_of[int4.initializer_name(placement.parameter, int4.SCALES)]))
            elif part is not None and placement.stacked:  # an expert's part
                written.update(write_expert_part(f, entry, placement, slots, config, dtype_of))
            elif part is not None and not part.dtype.is_floating_point:  # packed codes, zero points; g_idx
                written.update(write_int4_part(f, entry, placement, slots, config))
            elif placement is not None:  # floats, int4 scales included: cast into their slot
                name = int4.initializer_name(placement.parameter, part.initializer) if part else \
                    initializer_of.get(placement.parameter)
                if name not in slots:
                    raise ExportError(f"traced graph has no initializer for parameter {placement.parameter}")
                base = slots[name].offset
                if name in transposed:
                    _write_transposed(f, base, entry, dtype_of[name])
                else:
                    itemsize = dtype_of[name].itemsize
                    for offset, chunk in read_chunks(entry):
                        f.seek(base + (placement.offset + offset) * itemsize)
                        f.write(chunk.to(dtype_of[name]).view(torch.uint8).numpy().data)
                written.add(name)
            done += entry.end - entry.start
            if time.monotonic() - last_report > 5:
                progress(f"weights {100 * done / total:.0f}% ({done / 1e9:.1f} of {total / 1e9:.1f} GB read)")
                last_report = time.monotonic()
        for name, values in derived_tensors(config).items():
            if name in slots:
                f.seek(slots[name].offset)
                f.write(values.to(dtype_of[name]).contiguous().view(torch.uint8).numpy().data)
                written.add(name)
    unfilled = set(slots) - written
    if unfilled:
        raise ExportError(f"initializers with no source (an exporter change?): {sorted(unfilled)}")


def write_int4_part(f, entry: TensorEntry, placement, slots: dict[str, Slot], config: Qwen2Config) -> list[str]:
    """Repack one packed tensor of a quantized Linear into its graph initializer (the same byte count, at
    the same byte offsets), in chunks of whole rows; returns the initializer it filled (none for g_idx,
    which is only checked)."""
    quantization = config.quantization
    suffix = int4.LAYOUTS[quantization.method][placement.part].initializer
    name = int4.initializer_name(placement.parameter, suffix) if suffix else None
    base = slots[name].offset if name else 0
    row_bytes = entry.shape[-1] * entry.dtype.itemsize
    for offset, chunk in read_chunks(entry, max(row_bytes, CHUNK_BYTES // row_bytes * row_bytes)):
        data = int4.repack(quantization.method, placement.part, chunk, offset, entry.shape, quantization.group_size,
                           f"{entry.file.name}: {entry.name}")
        if data is not None:
            f.seek(base + offset * entry.dtype.itemsize)
            f.write(data)
    return [name] if name else []


def write_expert_part(f, entry: TensorEntry, placement, slots: dict[str, Slot], config: Qwen2Config,
                      dtype_of: dict[str, torch.dtype]) -> list[str]:
    """One expert's GPTQ part (a few MiB, read whole) into its rows of the stacked int4 initializer."""
    suffix = int4.LAYOUTS[config.quantization.method][placement.part].initializer
    scale_dtype = dtype_of[int4.initializer_name(placement.parameter, int4.SCALES)]
    tensor = torch.cat([chunk for _, chunk in read_chunks(entry)])
    data = int4.gptq_expert_part(placement.part, tensor, entry.shape, config.quantization.group_size, scale_dtype,
                                 f"{entry.file.name}: {entry.name}")
    if data is None:
        return []
    name = int4.initializer_name(placement.parameter, suffix)
    f.seek(slots[name].offset + int4.stack_offset(suffix, placement.offset, config.quantization.group_size, scale_dtype.itemsize))
    f.write(data.tobytes())
    return [name]


def write_rtn_weight(f, entry: TensorEntry, placement, slots: dict[str, Slot], quantization, scale_dtype: torch.dtype) -> list[str]:
    """Quantize a float weight a band of whole rows (outputs) at a time. A Linear weight [N, K] fills the
    columns of its [K, N] codes and [K / G, N] scales and zero points (stored transposed, as MatMul reads
    them); one expert's [rows, K] fills its rows of the stacked [E, R, K] codes and [E, R, K / G] scales
    and zero points, at the placement's offset."""
    rows, k = entry.shape
    group = quantization.group_size
    names = {suffix: int4.initializer_name(placement.parameter, suffix) for suffix in (int4.CODES, int4.SCALES, int4.ZERO_POINTS)}
    codes, scales, zeros = (slots.get(names[suffix]) for suffix in (int4.CODES, int4.SCALES, int4.ZERO_POINTS))
    # a quarter chunk: quantizing holds an fp32 copy of the band and its codes (export's peak RSS);
    # even: two uint4 values a byte
    band_rows = max(2, CHUNK_BYTES // 4 // (k * entry.dtype.itemsize) // 2 * 2)
    for offset, chunk in read_chunks(entry, band_rows * k * entry.dtype.itemsize):
        first = offset // k
        band = int4.round_to_nearest(chunk.view(-1, k), group, quantization.symmetric, scale_dtype)
        if placement.stacked:  # rows of [E, R, K]: contiguous, starting at element placement.offset + first * k
            start = placement.offset + first * k
            for suffix, data in ((int4.CODES, uint4.pack(band.codes.reshape(-1))),
                                 (int4.SCALES, band.scales.contiguous().view(torch.uint8).numpy()),
                                 (int4.ZERO_POINTS, None if band.zeros is None else uint4.pack(band.zeros.reshape(-1)))):
                if data is not None:
                    f.seek(slots[names[suffix]].offset + int4.stack_offset(suffix, start, group, scale_dtype.itemsize))
                    f.write(data.tobytes())
            continue
        write_columns(f, codes.offset, rows // 2, first // 2, uint4.pack(band.codes.T))
        write_columns(f, scales.offset, rows * scale_dtype.itemsize, first * scale_dtype.itemsize,
                      band.scales.t().contiguous().view(torch.uint8).numpy())  # [K / G, band rows * itemsize]
        if band.zeros is not None:
            write_columns(f, zeros.offset, rows // 2, first // 2, uint4.pack(band.zeros.T))
    return [name for name in names.values() if name in slots]


def write_columns(f, base: int, row_bytes: int, first_byte: int, band: np.ndarray) -> None:
    """Write the bytes `band` [R, b] into rows 0..R-1 of a row-major tensor at `base` whose rows are
    `row_bytes` long, starting `first_byte` into each row."""
    for row in range(band.shape[0]):
        f.seek(base + row * row_bytes + first_byte)
        f.write(np.ascontiguousarray(band[row]).data)


def _write_transposed(f, base: int, entry: TensorEntry, dtype: torch.dtype) -> None:
    """Write a [rows, columns] tensor as [columns, rows], a band of whole rows at a time."""
    rows, columns = entry.shape
    row_bytes = columns * entry.dtype.itemsize
    band_bytes = max(row_bytes, CHUNK_BYTES // row_bytes * row_bytes)
    for offset, chunk in read_chunks(entry, band_bytes):
        first_row = offset // columns
        band = chunk.view(-1, columns).t().to(dtype).contiguous()  # [columns, band rows]
        # flatten first: a band of one row stays a strided [columns, 1] view, which .view(uint8) refuses
        write_columns(f, base, rows * dtype.itemsize, first_row * dtype.itemsize,
                      band.flatten().view(torch.uint8).view(columns, -1).numpy())


def derived_tensors(config: Qwen2Config) -> dict[str, torch.Tensor]:
    """Initializers computed from config.json rather than read from the checkpoint."""
    return {"model.rotary_emb.inv_freq": rope_parameters(config.rope, config.head_dim)[0]}


def attach_external_data(graph: ir.Model, slots: dict[str, Slot], base_dir: Path) -> None:
    """Point every initializer at its slot in the data file (shape as stored, transposed or not)."""
    for name, value in graph.graph.initializers.items():
        value.const_value = ir.ExternalTensor(
            DATA_FILE, slots[name].offset, slots[name].length, value.const_value.dtype,
            shape=value.shape, name=name, base_dir=base_dir, doc_string=value.doc_string,
        )


def _whole_parameters(plan: dict, entries: list[TensorEntry], aliases: dict[str, str]) -> set[str]:
    """Initializer names whose parameter is exactly one checkpoint tensor (not a slice of a stack),
    and not shared with another module."""
    shared = {canonical for name, canonical in aliases.items() if name != canonical}
    return {
        p.parameter for entry in entries
        if (p := plan[entry.name]) is not None and p.whole and p.parameter not in shared
    }


def _parameter_aliases(model: torch.nn.Module) -> dict[str, str]:
    """Every name of a shared parameter -> its canonical name (tied lm_head -> embed_tokens)."""
    canonical = {id(p): name for name, p in model.named_parameters()}
    return {name: canonical[id(p)] for name, p in model.named_parameters(remove_duplicate=False)}
