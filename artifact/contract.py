"""The artifact contract: everything an artifact folder promises to a host, written down once.

Export writes it, graphs/ adds optimized graphs to it, runtime/ reads it, and a host in any language
can drive the graphs from manifest.json alone. This module owns the file names, the graph input and
output names and dims, the KV names, the element types, the manifest's typed schema (one writer, one
reader, the format version checked on read), checksums and the data-file alignment rule. It imports
nothing but the standard library, so a runtime-only install has it.

    ARTIFACT/
      manifest.json                      Manifest (below)
      onnx/model.onnx  model.onnx_data   the portable graph (standard ONNX, opset 23) and all weights
      onnx/model_{target}.onnx(_data)    optimized graphs (onnxruntime's fused ops) and their new weights
      config.json  generation_config.json  tokenizer.json  tokenizer_config.json  [chat_template.jinja]
      genai_config.json  genai/{graph}.json  onnxruntime-genai's config, and an overlay per graph (hosts.py)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import types
import typing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

FORMAT = "qwen2-onnx-artifact"
FORMAT_VERSION = 1
READABLE_VERSIONS = (1,)
PRODUCER = "qwen2-onnx"

# ---- files ------------------------------------------------------------------------------------------
MANIFEST_FILE = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
GENERATION_CONFIG_FILE = "generation_config.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
GENAI_CONFIG_FILE = "genai_config.json"  # onnxruntime-genai's config (artifact/hosts.py)
# copied from the checkpoint: the first three are required, the rest when present
CONFIG_FILE = "config.json"  # the checkpoint's, with transformers.js's block added (artifact/hosts.py)
CHECKPOINT_FILES = (CONFIG_FILE, TOKENIZER_FILE, TOKENIZER_CONFIG_FILE)
OPTIONAL_CHECKPOINT_FILES = (GENERATION_CONFIG_FILE, CHAT_TEMPLATE_FILE)
GRAPH_FOLDER = "onnx"
PORTABLE_GRAPH = "portable"
PORTABLE_OPSET = 23


def graph_file(target: str | None = None) -> str:
    """The graph's path inside the artifact: the portable graph, or the one optimized for `target`."""
    return f"{GRAPH_FOLDER}/model.onnx" if target is None else f"{GRAPH_FOLDER}/model_{target}.onnx"


def data_file(target: str | None = None) -> str:
    """The graph's external-data file name, relative to the graph (as ONNX external data locations are)."""
    return "model.onnx_data" if target is None else f"model_{target}.onnx_data"


def optimized_graph_name(target: str) -> str:
    return f"optimized-{target}"


def genai_overlay_file(graph_name: str) -> str:
    """onnxruntime-genai's overlay of genai_config.json that makes it drive the graph `graph_name`."""
    return f"genai/{graph_name}.json"


# ---- tasks: what an artifact's graphs compute (transformers' pipeline names) ---------------------------
TEXT_GENERATION = "text-generation"  # logits for the next token, with a KV cache (every graph contract below)
TEXT_CLASSIFICATION = "text-classification"  # logits [batch, labels] at each row's last token that is not the pad
TOKEN_CLASSIFICATION = "token-classification"  # logits [batch, sequence, labels]
FEATURE_EXTRACTION = "feature-extraction"  # last hidden state, and each row's last real token's, L2-normalised
TASKS = (TEXT_GENERATION, TEXT_CLASSIFICATION, TOKEN_CLASSIFICATION, FEATURE_EXTRACTION)
LAST_HIDDEN_STATE, SENTENCE_EMBEDDING = "last_hidden_state", "sentence_embedding"

# ---- graph inputs and outputs -----------------------------------------------------------------------
INPUT_IDS, ATTENTION_MASK, POSITION_IDS = "input_ids", "attention_mask", "position_ids"
# an input of optimized graphs written by earlier versions (int32 scalar, the attention mask's width);
# optimized graphs now compute it from the mask in nodes named HOST_SHAPE_NODES..., which onnxruntime runs on
# the CPU EP (they read shapes only) whatever the device: a runtime may allow exactly those on the CPU
TOTAL_SEQUENCE_LENGTH = "total_sequence_length"
HOST_SHAPE_NODES = "host_shape/"
LOGITS = "logits"
# [batch, K]: each row's K best logits (fp32) and their ids, best first, and first of all the lowest id
# among the best (the greedy token)
CANDIDATE_OUTPUTS = ("top_logits", "top_ids")
PAST, PRESENT = "past_key_values", "present"
BATCH, SEQUENCE, PAST_LENGTH, TOTAL_LENGTH = "batch_size", "sequence_length", "past_sequence_length", "total_sequence_length"
KV_CAPACITY = "kv_capacity"  # optimized graphs: the length of the shared KV buffer the host allocates

# element types by name, as ONNX TensorProto numbers them (bf16 has no numpy type: hosts allocate by number)
ELEMENT_TYPES = {"float32": 1, "int64": 7, "int32": 6, "float16": 10, "bfloat16": 16}
FLOAT_TYPES = ("float32", "float16", "bfloat16")

# the contracts a graph can declare (kv_cache.layout, padding, logits)
CONCAT, SHARED_BUFFER = "concat", "shared_buffer"
LEFT, RIGHT = "left", "right"
ALL_POSITIONS, LAST_TOKEN = "all_positions", "last_token"
NO_CACHE = "none"  # the classification graphs
KV_DIMS = {CONCAT: "[batch, kv_heads, length, head_dim]", SHARED_BUFFER: "[batch, kv_heads, capacity, head_dim]",
           NO_CACHE: "no KV cache"}


def kv_names(num_layers: int, prefix: str) -> list[str]:
    """`past_key_values.{i}.key|value` or `present.{i}.key|value`: key before value, layer by layer."""
    return [f"{prefix}.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # a key of ELEMENT_TYPES
    dims: tuple[str | int, ...]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "dims": list(self.dims)}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> "TensorSpec":
        return cls(raw["name"], raw["dtype"], tuple(raw["dims"]))


def portable_inputs(num_layers: int, kv_heads: int, head_dim: int, dtype: str) -> tuple[TensorSpec, ...]:
    """The portable graph's inputs: left-padded rows, explicit positions, a KV cache that grows by concat."""
    kv = (BATCH, kv_heads, PAST_LENGTH, head_dim)
    return (TensorSpec(INPUT_IDS, "int64", (BATCH, SEQUENCE)),
            TensorSpec(ATTENTION_MASK, "int64", (BATCH, TOTAL_LENGTH)),
            TensorSpec(POSITION_IDS, "int64", (BATCH, SEQUENCE)),
            *(TensorSpec(name, dtype, kv) for name in kv_names(num_layers, PAST)))


def portable_outputs(num_layers: int, kv_heads: int, head_dim: int, vocab_size: int, dtype: str) -> tuple[TensorSpec, ...]:
    """Logits of every position (fp32 whatever the model dtype) and present = concat(past, new)."""
    kv = (BATCH, kv_heads, TOTAL_LENGTH, head_dim)
    return (TensorSpec(LOGITS, "float32", (BATCH, SEQUENCE, vocab_size)),
            *(TensorSpec(name, dtype, kv) for name in kv_names(num_layers, PRESENT)))


def classification_inputs() -> tuple[TensorSpec, ...]:
    """The inputs of a classification or embedding graph: rows padded on either side, the mask 0 on pads;
    no KV cache."""
    return (TensorSpec(INPUT_IDS, "int64", (BATCH, SEQUENCE)), TensorSpec(ATTENTION_MASK, "int64", (BATCH, SEQUENCE)))


def classification_outputs(task: str, num_labels: int, hidden_size: int) -> tuple[TensorSpec, ...]:
    """fp32 logits: one row per sequence (text-classification) or per token (token-classification); or
    (feature-extraction) the final norm's output per token and the sentence embedding, last-token pooled
    (each row's last position with mask 1, as gte-Qwen2 pools) and L2-normalised."""
    if task == FEATURE_EXTRACTION:
        return (TensorSpec(LAST_HIDDEN_STATE, "float32", (BATCH, SEQUENCE, hidden_size)),
                TensorSpec(SENTENCE_EMBEDDING, "float32", (BATCH, hidden_size)))
    dims = (BATCH, num_labels) if task == TEXT_CLASSIFICATION else (BATCH, SEQUENCE, num_labels)
    return (TensorSpec(LOGITS, "float32", dims),)


# ---- files on disk ----------------------------------------------------------------------------------
# large tensors start on 64 KiB boundaries so onnxruntime can memory-map them on every OS; small ones on 64 bytes
LARGE_TENSOR_BYTES, LARGE_ALIGNMENT, SMALL_ALIGNMENT = 1 << 20, 1 << 16, 64
INLINE_BYTES = 1024  # optimized graphs keep tensors this small inside the .onnx file


def aligned_offset(offset: int, nbytes: int) -> int:
    """Where a tensor of `nbytes` starts in a data file when the previous one ends at `offset`."""
    alignment = LARGE_ALIGNMENT if nbytes >= LARGE_TENSOR_BYTES else SMALL_ALIGNMENT
    return offset + -offset % alignment


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(16 << 20):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class FileRecord:
    sha256: str
    bytes: int

    @classmethod
    def of(cls, path: Path) -> "FileRecord":
        return cls(sha256_of(path), path.stat().st_size)


def records_json(records: dict[str, FileRecord]) -> dict[str, Any]:
    return {name: {"sha256": r.sha256, "bytes": r.bytes} for name, r in records.items()}


def records_from_json(raw: dict[str, Any]) -> dict[str, FileRecord]:
    return {name: FileRecord(r["sha256"], r["bytes"]) for name, r in raw.items()}  # types: check_types


# ---- the manifest -----------------------------------------------------------------------------------
class ArtifactError(ValueError):
    """The folder is not an artifact this version can read; the message says why and what to do."""


@dataclass(frozen=True)
class MoeFacts:
    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    shared_expert_intermediate_size: int
    norm_topk_prob: bool
    sparse_layers: tuple[int, ...]


@dataclass(frozen=True)
class ModelFacts:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    context_length: int
    max_position_embeddings: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    qkv_bias: bool
    layer_types: tuple[str, ...]  # "full_attention" or "sliding_attention" per layer
    sliding_window: int | None
    moe: MoeFacts | None

    def window_of(self, layer: int) -> int | None:
        """The layer's attention window, None for full attention."""
        return self.sliding_window if self.layer_types[layer] == "sliding_attention" else None


@dataclass(frozen=True)
class RopeFacts:
    type: str
    theta: float
    factor: float
    original_max_position_embeddings: int | None
    beta_fast: float | None
    beta_slow: float | None
    attention_factor: float  # resolved: multiplies cos and sin
    layout: str = "rotate_half"
    inv_freq_initializer: str = "model.rotary_emb.inv_freq"


# The Linear modules of a layer that int4 artifacts hold quantized (AutoAWQ's and AutoGPTQ's choice for
# Qwen2); embeddings, norms, lm_head, the MoE router and the shared-expert gate keep their float type.
QUANTIZED_PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# A sparse (routed) layer: attention, the shared expert's MLP, and the stacked experts ([E, out, in] each).
QUANTIZED_SPARSE = (*QUANTIZED_PROJECTIONS[:4], "mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj",
                    "mlp.shared_expert.down_proj")
QUANTIZED_EXPERTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


def quantized_weights(num_layers: int, sparse_layers: tuple[int, ...]) -> tuple[list[str], list[str]]:
    """The parameter names an int4 artifact holds quantized: (2-D Linear weights, stacked expert tensors)."""
    linears = [f"model.layers.{i}.{p}.weight" for i in range(num_layers)
               for p in (QUANTIZED_SPARSE if i in sparse_layers else QUANTIZED_PROJECTIONS)]
    return linears, [f"model.layers.{i}.{p}" for i in sparse_layers for p in QUANTIZED_EXPERTS]


@dataclass(frozen=True)
class QuantFacts:
    """An int4 artifact: how its projection weights were quantized and how the portable graph holds them."""

    method: str  # "awq", "gptq" (the checkpoint's codes, repacked) or "rtn" (quantized at export)
    bits: int
    group_size: int
    weights: str = "DequantizeLinear"  # int4 codes, scales and zero points, blocked along the inputs
    symmetric: bool = False  # int4 codes in [-8, 7] and no zero points; else uint4 codes and zero points
    projections: tuple[str, ...] = QUANTIZED_PROJECTIONS  # the modules held in int4 (of each layer that has them)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> "QuantFacts":
        return cls(**{**raw, "projections": tuple(raw.get("projections", QUANTIZED_PROJECTIONS))})


@dataclass(frozen=True)
class TokenFacts:
    vocab_size: int  # ids the tokenizer can produce; embedding rows past it are padding
    special_tokens: dict[str, int]
    bos_token_id: int | None
    eos_token_id: int | list[int] | None
    pad_token_id: int | None
    stop_token_ids: tuple[int, ...]
    has_chat_template: bool
    add_bos_token: bool
    file: str = TOKENIZER_FILE


@dataclass(frozen=True)
class HeadFacts:
    """A classification artifact's head: its labels by id, transformers' problem_type (multi-label scores are
    sigmoids, else softmax), and the pad id whose rightmost other token a text-classification graph reads
    (None: the last token, so a batch holds rows of one length)."""

    labels: tuple[str, ...]
    problem_type: str | None
    pad_token_id: int | None


@dataclass(frozen=True)
class PassCount:
    name: str
    fired: int
    expected: int


@dataclass(frozen=True)
class GraphEntry:
    """One graph of the artifact and the contract a session loop must follow to drive it."""

    name: str
    file: str
    target: str  # "any" (standard ONNX) or the device it was optimized for
    files: dict[str, FileRecord]  # every file the graph reads, relative to the artifact
    opset: int
    kv_layout: str  # CONCAT: present = concat(past, new); SHARED_BUFFER: one buffer bound as past and present
    padding: str  # LEFT (mask 0 on leading pads, explicit position_ids) or RIGHT (positions implied by the mask)
    logits: str  # ALL_POSITIONS or LAST_TOKEN ([batch, 1, vocab], each row's last real token), always fp32
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    activation_dtype: str | None = None  # KV and activations, when they differ from the artifact's dtype
    token_candidates: int = 0  # K of the CANDIDATE_OUTPUTS (0: the graph has none)
    passes: tuple[PassCount, ...] = ()

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(spec.name for spec in self.inputs)

    def to_json(self) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "name": self.name, "file": self.file, "target": self.target,
            "files": records_json(self.files),
            "opset": self.opset,
            "kv_cache": {"layout": self.kv_layout, "order": "key, value per layer", "dims": KV_DIMS[self.kv_layout]},
            "padding": self.padding, "logits": self.logits,
        }
        if TOTAL_SEQUENCE_LENGTH in self.input_names:
            entry[TOTAL_SEQUENCE_LENGTH] = "attention_mask width"
        if self.token_candidates:
            entry["token_candidates"] = {"k": self.token_candidates, "outputs": list(CANDIDATE_OUTPUTS)}
        if self.activation_dtype is not None:
            entry["activation_dtype"] = self.activation_dtype
        if self.passes:
            entry["passes"] = [{"pass": p.name, "fired": p.fired, "expected": p.expected} for p in self.passes]
        entry["inputs"] = [spec.to_json() for spec in self.inputs]
        entry["outputs"] = [spec.to_json() for spec in self.outputs]
        return entry

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> "GraphEntry":
        return cls(
            name=raw["name"], file=raw["file"], target=raw["target"],
            files=records_from_json(raw["files"]),
            opset=raw["opset"], kv_layout=raw["kv_cache"]["layout"], padding=raw["padding"], logits=raw["logits"],
            inputs=tuple(TensorSpec.from_json(s) for s in raw["inputs"]),
            outputs=tuple(TensorSpec.from_json(s) for s in raw["outputs"]),
            activation_dtype=raw.get("activation_dtype"),
            token_candidates=raw.get("token_candidates", {}).get("k", 0),
            passes=tuple(PassCount(p["pass"], p["fired"], p["expected"]) for p in raw.get("passes", ())),
        )


@dataclass(frozen=True)
class Manifest:
    """manifest.json, typed. `write_manifest` and `read_manifest` are its only writer and reader."""

    architecture: str
    model_type: str
    dtype: str  # weights, activations and KV of the portable graph
    model: ModelFacts
    rope: RopeFacts
    graphs: tuple[GraphEntry, ...]
    tokenizer: TokenFacts
    files: dict[str, FileRecord] = field(default_factory=dict)  # the checkpoint files copied in, genai_config.json
    quantization: QuantFacts | None = None
    producer: str = PRODUCER
    task: str = TEXT_GENERATION
    head: HeadFacts | None = None  # the classification tasks

    def graph(self, name: str) -> GraphEntry | None:
        return next((g for g in self.graphs if g.name == name), None)

    def with_graph(self, entry: GraphEntry) -> "Manifest":
        """This manifest with `entry` added, replacing a graph of the same name."""
        return replace(self, graphs=tuple(g for g in self.graphs if g.name != entry.name) + (entry,))

    def to_json(self) -> dict[str, Any]:
        model = {**self.model.__dict__, "layer_types": list(self.model.layer_types),
                 "moe": None if self.model.moe is None else {**self.model.moe.__dict__,
                                                              "sparse_layers": list(self.model.moe.sparse_layers)}}
        tokens = self.tokenizer
        return {
            "format": FORMAT, "format_version": FORMAT_VERSION, "producer": self.producer,
            "architecture": self.architecture, "model_type": self.model_type, "dtype": self.dtype,
            "model": model, "rope": dict(self.rope.__dict__),
            "graphs": [g.to_json() for g in self.graphs],
            "tokenizer": {"file": tokens.file, "vocab_size": tokens.vocab_size, "special_tokens": tokens.special_tokens,
                          "bos_token_id": tokens.bos_token_id, "eos_token_id": tokens.eos_token_id,
                          "pad_token_id": tokens.pad_token_id, "stop_token_ids": list(tokens.stop_token_ids),
                          "has_chat_template": tokens.has_chat_template, "add_bos_token": tokens.add_bos_token},
            "files": records_json(self.files),
            "quantization": None if self.quantization is None else dict(self.quantization.__dict__),
            "task": self.task,
            "head": None if self.head is None else {**self.head.__dict__, "labels": list(self.head.labels)},
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> "Manifest":
        model = dict(raw["model"])
        moe = model.pop("moe")
        tokens = dict(raw["tokenizer"])
        return cls(
            architecture=raw["architecture"], model_type=raw["model_type"], dtype=raw["dtype"],
            model=ModelFacts(**{**model, "layer_types": tuple(model["layer_types"]),
                                "moe": None if moe is None else MoeFacts(**{**moe, "sparse_layers": tuple(moe["sparse_layers"])})}),
            rope=RopeFacts(**raw["rope"]),
            graphs=tuple(GraphEntry.from_json(g) for g in raw["graphs"]),
            tokenizer=TokenFacts(**{**tokens, "stop_token_ids": tuple(tokens["stop_token_ids"])}),
            files=records_from_json(raw.get("files", {})),
            quantization=None if raw.get("quantization") is None else QuantFacts.from_json(raw["quantization"]),
            producer=raw.get("producer", PRODUCER),
            task=raw.get("task", TEXT_GENERATION),
            head=None if raw.get("head") is None else HeadFacts(**{**raw["head"], "labels": tuple(raw["head"]["labels"])}),
        )


def write_manifest(artifact: Path, manifest: Manifest) -> Path:
    """Write ARTIFACT/manifest.json under a temporary name, then rename it into place, so a reader never
    sees half of it."""
    path = Path(artifact) / MANIFEST_FILE
    partial = path.with_name(MANIFEST_FILE + ".partial")
    partial.write_text(json.dumps(manifest.to_json(), indent=2) + "\n")
    os.replace(partial, path)
    return path


class NotAJsonObject(ValueError):
    """A file that is not UTF-8 JSON holding an object; the message names the file and what is wrong."""


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in `path` (config, tokenizer config, manifest, index files of every stage);
    NotAJsonObject when it is not UTF-8, not JSON or not an object; OSError passes through."""
    try:
        value = json.loads(Path(path).read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise NotAJsonObject(f"{path} is not valid JSON ({error})") from error
    if not isinstance(value, dict):
        raise NotAJsonObject(f"{path} holds a JSON {type(value).__name__}, not a JSON object")
    return value


def read_manifest(artifact: str | Path) -> Manifest:
    """Parse ARTIFACT/manifest.json; raises ArtifactError when it is missing, malformed or of another
    format or version."""
    path = Path(artifact) / MANIFEST_FILE
    if not path.is_file():
        raise ArtifactError(f"{path} not found: pass an artifact folder written by `qwen2-onnx export`")
    try:
        raw = read_json_object(path)
    except NotAJsonObject as error:
        raise ArtifactError(f"{error}; re-export the artifact") from error
    if raw.get("format") != FORMAT or raw.get("format_version") not in READABLE_VERSIONS:
        raise ArtifactError(f"{path} is format {raw.get('format')!r} version {raw.get('format_version')!r}; this "
                            f"version of qwen2-onnx reads {FORMAT!r} versions {list(READABLE_VERSIONS)} (re-export with it)")
    try:
        manifest = Manifest.from_json(raw)
        check_types(manifest, Manifest, "manifest")
    except (KeyError, TypeError, AttributeError, ValueError) as error:
        raise ArtifactError(f"{path} lacks or mangles a field ({error}); re-export the artifact") from error
    counts = manifest.model
    sizes = (counts.vocab_size, counts.hidden_size, counts.num_hidden_layers, counts.num_attention_heads,
             counts.num_key_value_heads, counts.head_dim, counts.context_length)
    if not all(1 <= size < 2**31 for size in sizes) or len(counts.layer_types) != counts.num_hidden_layers:
        raise ArtifactError(f"{path} describes an impossible model ({counts}); re-export the artifact")
    tokens = manifest.tokenizer
    eos = tokens.eos_token_id if isinstance(tokens.eos_token_id, list) else [tokens.eos_token_id]
    ids = [tokens.bos_token_id, *eos, tokens.pad_token_id, *tokens.stop_token_ids, *tokens.special_tokens.values(),
           manifest.head.pad_token_id if manifest.head else None]
    strays = [i for i in ids if i is not None and not 0 <= i < counts.vocab_size]
    if strays:
        raise ArtifactError(f"{path} names token ids outside the model's {counts.vocab_size} embedding rows "
                            f"({strays[:3]}); re-export the artifact")
    return manifest


def check_types(value: Any, hint: Any, where: str) -> None:
    """Raise TypeError naming the field when `value` does not have the (dataclass field) type `hint`."""
    origin, arguments = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, hint):
            raise TypeError(f"{where} must be an object")
        hints = typing.get_type_hints(hint)
        for item in dataclasses.fields(hint):
            check_types(getattr(value, item.name), hints[item.name], f"{where}.{item.name}")
    elif origin in (typing.Union, types.UnionType):
        errors = []
        for option in arguments:
            try:
                return check_types(value, option, where)
            except TypeError as error:
                errors.append(error)
        raise errors[-1]
    elif origin in (tuple, list):
        if not isinstance(value, origin):
            raise TypeError(f"{where} must be a list")
        for index, item in enumerate(value):
            check_types(item, arguments[0] if arguments[-1] is Ellipsis or origin is list else arguments[index], f"{where}[{index}]")
    elif origin is dict:
        if not isinstance(value, dict):
            raise TypeError(f"{where} must be an object")
        for key, item in value.items():
            check_types(key, arguments[0], f"{where} key")
            check_types(item, arguments[1], f"{where}[{key!r}]")
    elif hint is type(None):
        if value is not None:
            raise TypeError(f"{where} must be null")
    elif hint is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise TypeError(f"{where}={value!r} must be a number")
    elif not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise TypeError(f"{where}={value!r} must be of type {hint.__name__}")
