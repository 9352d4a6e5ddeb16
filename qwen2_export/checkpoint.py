"""Checkpoint reading: safetensors headers, a name table from hub names to our parameters, and a stream.

Weights are read with plain file reads in bounded chunks rather than through a memory map, so the
resident memory of an export follows the chunk size, not the shard size (mapped pages of a 4 GB
shard would otherwise count towards RSS). The table is declarative: each checkpoint tensor lands in
a contiguous element range of one parameter (per-expert hub tensors land in slices of the stacked
expert tensors). `plan_placements` checks every tensor is consumed and every parameter filled before
any data is read.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

import torch

from artifact import contract

from . import int4
from .config import Qwen2Config
from .errors import CheckpointError
from .model import Qwen2ForCausalLM, build_model

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I32": torch.int32}
CHUNK_BYTES = 64 << 20
MAX_HEADER_BYTES = 100 << 20  # the safetensors library's own limit


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes sit inside a safetensors file."""

    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def numel(self) -> int:
        return (self.end - self.start) // self.dtype.itemsize


@dataclass(frozen=True)
class Placement:
    """A checkpoint tensor's destination: elements [offset, offset + numel) of `parameter`, flattened;
    or, for an int4 checkpoint, one `part` of a quantized parameter (int4.LAYOUTS), whole. `stacked`: one
    expert's Linear in its layer's stack [E, out, in] (the offset then locates that expert's rows)."""

    parameter: str
    offset: int
    part: str | None = None
    stacked: bool = False

    @property
    def whole(self) -> bool:
        """The tensor is all of its parameter (under its own name, or the bare model's name plus "model.")."""
        return self.part is None and not self.stacked


def safetensors_files(checkpoint_dir: Path) -> list[Path]:
    """The weight files of a checkpoint: the shards named by the index, or model.safetensors."""
    index = checkpoint_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = contract.read_json_object(index)["weight_map"]
        except (contract.NotAJsonObject, KeyError, TypeError) as error:
            raise CheckpointError(f"{index} is malformed ({error}); it needs a 'weight_map' object") from error
        files = [checkpoint_dir / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(
                f"{INDEX_FILE} names shards that are not in {checkpoint_dir}: {missing}; "
                "download the missing files (the index lists every shard)"
            )
        return files
    single = checkpoint_dir / SINGLE_FILE
    if single.is_file():
        return [single]
    found = sorted(p.name for p in checkpoint_dir.glob("*.safetensors"))
    if len(found) == 1:
        return [checkpoint_dir / found[0]]
    if found:
        raise CheckpointError(f"{checkpoint_dir} has several .safetensors files {found} but no {INDEX_FILE}")
    if list(checkpoint_dir.glob("*.bin")) or list(checkpoint_dir.glob("*.pt")):
        raise CheckpointError(
            f"{checkpoint_dir} has only pickle weights (*.bin / *.pt), which we never unpickle (they can run "
            "code); convert them to safetensors first, e.g. save_pretrained(..., safe_serialization=True)"
        )
    raise CheckpointError(f"no weights in {checkpoint_dir}: expected {SINGLE_FILE} or {INDEX_FILE} with shards")


def read_header(path: Path) -> list[TensorEntry]:
    """Parse a safetensors header (8-byte little-endian length, then JSON) without touching the data."""
    file_size = path.stat().st_size
    with path.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) != 8:
            raise CheckpointError(f"{path} is truncated: no safetensors header; re-download it")
        (length,) = struct.unpack("<Q", prefix)
        if length > min(file_size - 8, MAX_HEADER_BYTES):
            raise CheckpointError(f"{path} declares a {length:,}-byte header in a {file_size:,}-byte file: "
                                  "not a safetensors file, or a corrupt one; re-download it")
        try:
            header = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise CheckpointError(f"{path} has a corrupt safetensors header ({error}); re-download it") from error
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} has a corrupt safetensors header (not a JSON object); re-download it")
    data_start = 8 + length
    entries = [header_entry(path, name, info, data_start, file_size) for name, info in header.items()
               if name != "__metadata__"]
    return sorted(entries, key=lambda e: e.start)


def header_entry(path: Path, name: str, info: Any, data_start: int, file_size: int) -> TensorEntry:
    """One tensor's header record, checked: dtype, shape, and offsets that lie inside the file."""
    try:
        dtype_name, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        valid = all(isinstance(v, int) and v >= 0 for v in (*shape, begin, end)) and begin <= end
    except (TypeError, KeyError, ValueError) as error:
        raise CheckpointError(f"{path.name}: the header entry of {name} lacks or mangles dtype, shape or "
                              f"data_offsets ({error!r}); re-download the file") from error
    if not valid:
        raise CheckpointError(f"{path.name}: the header entry of {name} has invalid shape or offsets; re-download the file")
    if dtype_name not in SAFETENSORS_DTYPES:
        raise CheckpointError(
            f"{path.name}: tensor {name} has dtype {dtype_name}; supported source dtypes are "
            f"{sorted(SAFETENSORS_DTYPES)} (quantized checkpoints are not supported yet)"
        )
    if data_start + end > file_size:
        raise CheckpointError(f"{path} is truncated: {name} ends past the end of the file; re-download it")
    dtype = SAFETENSORS_DTYPES[dtype_name]
    if (end - begin) != math.prod(shape) * dtype.itemsize:
        raise CheckpointError(f"{path.name}: tensor {name} has {end - begin} bytes for shape {list(shape)} of "
                              f"{dtype_name}; the file is corrupt, re-download it")
    return TensorEntry(name, path, dtype, shape, data_start + begin, data_start + end)


def list_tensors(checkpoint_dir: str | Path) -> list[TensorEntry]:
    """Every tensor of the checkpoint, file by file in on-disk order (sequential reads)."""
    return [entry for path in safetensors_files(Path(checkpoint_dir)) for entry in read_header(path)]


def read_chunks(entry: TensorEntry, chunk_bytes: int = CHUNK_BYTES) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (element offset, 1-D tensor) pieces of one tensor, never more than `chunk_bytes` at once."""
    itemsize = entry.dtype.itemsize
    step = max(itemsize, chunk_bytes // itemsize * itemsize)
    with entry.file.open("rb") as f:
        f.seek(entry.start)
        for begin in range(entry.start, entry.end, step):
            buffer = bytearray(min(step, entry.end - begin))
            f.readinto(buffer)
            yield (begin - entry.start) // itemsize, torch.frombuffer(buffer, dtype=entry.dtype)


_EXPERT = re.compile(r"(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")


def placement_of(name: str, config: Qwen2Config, quantized: set[str]) -> Placement | None:
    """Where a hub tensor goes; None for a tensor we deliberately drop (lm_head of a tied model).
    `quantized`: the weights an int4 checkpoint stores as parts (quantized_parameters)."""
    if name == "lm_head.weight" and config.tie_word_embeddings:
        return None
    if config.task == contract.FEATURE_EXTRACTION:  # the bare model: no head, and its own names lack "model."
        if name.startswith(("lm_head.", "score.")):
            return None
        name = name if name.startswith("model.") else f"model.{name}"
    if config.quantization is not None and config.quantization.method in int4.LAYOUTS:
        prefix, _, part = name.rpartition(".")
        if part in int4.LAYOUTS[config.quantization.method]:
            if f"{prefix}.weight" in quantized:
                return Placement(f"{prefix}.weight", 0, part)
            expert = expert_slot(f"{prefix}.weight", config)
            if expert is not None and expert.parameter in quantized:  # one expert's part of an int4 stack
                return replace(expert, part=part)
    return expert_slot(name, config) or Placement(name, 0)


def expert_slot(name: str, config: Qwen2Config) -> Placement | None:
    """Where one expert's Linear weight sits in its layer's stacked tensor; None for other names."""
    match = _EXPERT.fullmatch(name)
    if match is None:
        return None
    experts, expert, projection = match.group(1), int(match.group(2)), match.group(3)
    assert config.moe is not None
    block = config.moe.moe_intermediate_size * config.hidden_size  # one [I, D] or [D, I] matrix
    if projection == "down_proj":
        return Placement(f"{experts}.down_proj", expert * block, stacked=True)
    # gate_up_proj[e] holds gate rows then up rows, as transformers 5.x fuses them
    return Placement(f"{experts}.gate_up_proj", (2 * expert + (projection == "up_proj")) * block, stacked=True)


def expert_matrix(stack_shape: tuple[int, ...], parameter: str) -> tuple[int, int]:
    """(out, in) of one expert's Linear in a stack: gate_up [E, 2I, D] holds two [I, D], down [E, D, I] one."""
    _, rows, columns = stack_shape
    return (rows // 2, columns) if parameter.endswith("gate_up_proj") else (rows, columns)


def packed_modules(config: Qwen2Config, packed: set[str]) -> dict[tuple[str, int], str]:
    """(parameter, element offset) of every Linear an int4 checkpoint stores as parts -> its module name."""
    modules = {(name, 0): name.removesuffix(".weight") for name in packed if name.endswith(".weight")}
    for layer in config.sparse_layers if packed else ():
        for expert in range(config.moe.num_experts):
            for projection in ("gate_proj", "up_proj", "down_proj"):
                module = f"model.layers.{layer}.mlp.experts.{expert}.{projection}"
                slot = expert_slot(f"{module}.weight", config)
                if slot.parameter in packed:
                    modules[(slot.parameter, slot.offset)] = module
    return modules


def quantized_parameters(config: Qwen2Config) -> set[str]:
    """The parameters an int4 artifact holds quantized (contract.quantized_weights): Linear weights and,
    in Qwen2-MoE layers, the stacked experts."""
    if config.quantization is None:
        return set()
    linears, experts = contract.quantized_weights(config.num_hidden_layers, config.sparse_layers)
    return set(linears) | set(experts)


def plan_placements(
    entries: list[TensorEntry], config: Qwen2Config, parameter_shapes: dict[str, tuple[int, ...]]
) -> dict[str, Placement | None]:
    """Map every checkpoint tensor to its destination; raise listing what is unknown, odd or unfilled."""
    plan: dict[str, Placement | None] = {}
    unknown, wrong_shape = [], []
    filled = {name: 0 for name in parameter_shapes}
    # int4 checkpoints store each quantized weight as parts; --quantize int4 reads float weights like any other
    packed = quantized_parameters(config) if config.quantization and config.quantization.method in int4.LAYOUTS else set()
    parts_seen: dict[tuple[str, int], set[str]] = {}  # int4 Linears: which of their tensors the checkpoint has
    for entry in entries:
        placement = placement_of(entry.name, config, packed)
        plan[entry.name] = placement
        if placement is None:
            continue
        shape = parameter_shapes.get(placement.parameter)
        if shape is None:
            unknown.append(entry.name)
            continue
        if placement.part is not None:  # one of the tensors of an int4 Linear: filled once all are seen
            layout = int4.LAYOUTS[config.quantization.method][placement.part]
            matrix = expert_matrix(shape, placement.parameter) if placement.stacked else shape
            expected = layout.shape(*matrix, config.quantization.group_size)
            if tuple(entry.shape) != expected or entry.dtype != layout.dtype:
                wrong_shape.append(f"{entry.name} {list(entry.shape)} (expected {list(expected)})")
            else:
                parts_seen.setdefault((placement.parameter, placement.offset), set()).add(placement.part)
            continue
        whole = placement.whole
        if (whole and tuple(entry.shape) != shape) or placement.offset + entry.numel > _numel(shape):
            wrong_shape.append(f"{entry.name} {list(entry.shape)} (parameter {list(shape)})")
            continue
        filled[placement.parameter] += entry.numel
    unfilled = [name for name, count in filled.items() if name not in packed and count != _numel(parameter_shapes[name])]
    if packed:
        parts = set(int4.LAYOUTS[config.quantization.method])
        unfilled += sorted(f"{module}.weight" for key, module in packed_modules(config, packed).items()
                           if parts_seen.get(key) != parts)
    problems = []
    if unknown:
        problems.append(f"checkpoint tensors not used by {config.architecture}: {_listing(unknown)}")
    if wrong_shape:
        problems.append(f"tensors whose shape disagrees with config.json: {_listing(wrong_shape)}")
    if unfilled:
        problems.append(f"parameters missing from the checkpoint: {_listing(unfilled)}")
    if problems:
        raise CheckpointError(
            "checkpoint does not match config.json:\n  " + "\n  ".join(problems)
            + "\n(check that config.json belongs to these weights and that no shard is missing)"
        )
    return plan


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def _listing(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" ... and {len(names) - limit} more" if len(names) > limit else "")


def load_model(
    checkpoint_dir: str | Path, config: Qwen2Config, dtype: torch.dtype = torch.float32
) -> Qwen2ForCausalLM:
    """Our torch model with the checkpoint's weights, streamed chunk by chunk and cast to `dtype`."""
    model = build_model(config, dtype, "cpu")
    parameters = dict(model.named_parameters())
    entries = list_tensors(checkpoint_dir)
    plan = plan_placements(entries, config, {name: tuple(p.shape) for name, p in parameters.items()})
    with torch.no_grad():
        for entry in entries:
            placement = plan[entry.name]
            if placement is None:
                continue
            flat = parameters[placement.parameter].view(-1)
            for offset, chunk in read_chunks(entry):
                start = placement.offset + offset
                flat[start : start + chunk.numel()].copy_(chunk)
    return model.eval()
