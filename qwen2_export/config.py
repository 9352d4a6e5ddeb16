"""Qwen2 / Qwen2-MoE configuration: one frozen dataclass built by one function from config.json.

Reads both the transformers 4.x layout published on the hub (`rope_theta` + `rope_scaling` with `type`)
and the transformers 5.x layout (`rope_parameters` with `rope_type`, `layer_types`). Every value the
model needs is resolved here once; anything missing, unknown or inconsistent raises ConfigError naming
the key and what is supported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from artifact import contract

from .errors import ConfigError

ARCHITECTURES = {"Qwen2ForCausalLM": "qwen2", "Qwen2MoeForCausalLM": "qwen2_moe",
                 "Qwen2ForSequenceClassification": "qwen2", "Qwen2MoeForSequenceClassification": "qwen2_moe",
                 "Qwen2ForTokenClassification": "qwen2", "Qwen2MoeForTokenClassification": "qwen2_moe",
                 "Qwen2Model": "qwen2", "Qwen2MoeModel": "qwen2_moe"}
# what each architecture's graph computes (contract.TASKS); export's --task may choose another
TASK_OF_ARCHITECTURE = {name: contract.TEXT_GENERATION if name.endswith("ForCausalLM") else
                        contract.TEXT_CLASSIFICATION if name.endswith("ForSequenceClassification") else
                        contract.TOKEN_CLASSIFICATION if name.endswith("ForTokenClassification") else
                        contract.FEATURE_EXTRACTION for name in ARCHITECTURES}
ROPE_TYPES = ("default", "linear", "yarn")
LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters, normalised across transformers 4.x and 5.x spellings."""

    rope_type: str
    theta: float
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True


@dataclass(frozen=True)
class MoeConfig:
    """Sparse MLP parameters of Qwen2-MoE (routed experts plus a sigmoid-gated shared expert)."""

    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    shared_expert_intermediate_size: int
    norm_topk_prob: bool
    decoder_sparse_step: int
    mlp_only_layers: tuple[int, ...]


@dataclass(frozen=True)
class QuantConfig:
    """Int4 projections (qwen2_export/int4.py), groups along the input: an AWQ or GPTQ checkpoint's own, or
    round to nearest at export ("rtn", `--quantize int4`)."""

    method: str  # "awq", "gptq" or "rtn"
    bits: int
    group_size: int
    symmetric: bool = False  # rtn only: int4 codes without zero points


@dataclass(frozen=True)
class HeadConfig:
    """A classification head (`score`) on the last hidden state: transformers' Qwen2ForSequenceClassification
    (no bias, read at each row's last token that is not `pad_token_id`) and Qwen2ForTokenClassification
    (bias unless token_classification_bias is false, every position)."""

    num_labels: int
    labels: tuple[str, ...]  # id2label, by id
    problem_type: str | None  # "single_label_classification", "multi_label_classification", "regression" or None
    pad_token_id: int | None
    bias: bool


@dataclass(frozen=True)
class Qwen2Config:
    """Everything the model definition, the loader and the exporter need to know about a checkpoint."""

    architecture: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    qkv_bias: bool
    rope: RopeConfig
    layer_types: tuple[str, ...]
    sliding_window: int | None
    moe: MoeConfig | None = None
    quantization: QuantConfig | None = None
    torch_dtype: str | None = None
    task: str = contract.TEXT_GENERATION
    head: HeadConfig | None = None  # the classification tasks
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def is_moe(self) -> bool:
        return self.moe is not None

    @property
    def sparse_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_hidden_layers) if self.is_sparse_layer(i))

    def is_sparse_layer(self, layer: int) -> bool:
        """True when layer `layer` has a routed MoE MLP (transformers' Qwen2MoeDecoderLayer rule)."""
        moe = self.moe
        if moe is None or moe.num_experts == 0:
            return False
        return layer not in moe.mlp_only_layers and (layer + 1) % moe.decoder_sparse_step == 0

    @property
    def context_length(self) -> int:
        """Longest sequence the model is meant for: YaRN stretches the original context by `factor`
        (Qwen's recipe keeps max_position_embeddings at 32768 and reaches 131072 with factor 4)."""
        rope = self.rope
        if rope.rope_type == "yarn" and rope.original_max_position_embeddings:
            return max(self.max_position_embeddings, int(rope.factor * rope.original_max_position_embeddings))
        return self.max_position_embeddings

    def window_of_layer(self, layer: int) -> int | None:
        """The sliding window of `layer`, or None for full attention."""
        return self.sliding_window if self.layer_types[layer] == "sliding_attention" else None


def load_config(checkpoint_dir: str | Path, task: str | None = None) -> Qwen2Config:
    """Read `checkpoint_dir/config.json` into a Qwen2Config (`task` instead of the architecture's, e.g. the
    embeddings of a causal LM); raises ConfigError with the fix."""
    path = Path(checkpoint_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path} not found: a Hugging Face checkpoint folder needs config.json")
    try:
        raw = contract.read_json_object(path)
    except contract.NotAJsonObject as error:
        raise ConfigError(f"{error}; fix or re-download config.json") from error
    return parse_config(raw, task)


def parse_config(raw: dict[str, Any], task: str | None = None) -> Qwen2Config:
    """Build a Qwen2Config from the parsed config.json dict."""
    architecture = _architecture(raw)
    if task is not None and task not in contract.TASKS:
        raise ConfigError(f"--task {task!r} is not one of {list(contract.TASKS)}")
    hidden_act = raw.get("hidden_act", "silu")
    if hidden_act != "silu":
        raise ConfigError(f"hidden_act={hidden_act!r} is not supported; Qwen2 uses 'silu'")

    hidden_size = _positive_int(raw, "hidden_size")
    num_heads = _positive_int(raw, "num_attention_heads")
    num_kv_heads = _positive_int(raw, "num_key_value_heads") if "num_key_value_heads" in raw else num_heads
    if num_heads % num_kv_heads:
        raise ConfigError(
            f"num_attention_heads={num_heads} is not a multiple of num_key_value_heads={num_kv_heads}; "
            "grouped-query attention needs whole groups"
        )
    head_dim = _positive_int(raw, "head_dim") if raw.get("head_dim") is not None else hidden_size // num_heads
    if raw.get("head_dim") is None and hidden_size % num_heads:
        raise ConfigError(
            f"hidden_size={hidden_size} is not divisible by num_attention_heads={num_heads}; set head_dim"
        )
    if head_dim % 2:
        raise ConfigError(f"head_dim={head_dim} must be even for rotary embeddings")

    num_layers = _positive_int(raw, "num_hidden_layers")
    intermediate_size = _positive_int(raw, "intermediate_size")
    max_positions = _positive_int(raw, "max_position_embeddings")
    layer_types, sliding_window = _attention_layout(raw, num_layers)
    moe = _moe(raw, num_layers) if ARCHITECTURES[architecture] == "qwen2_moe" else None
    task = task or TASK_OF_ARCHITECTURE[architecture]
    return Qwen2Config(
        architecture=architecture,
        model_type=ARCHITECTURES[architecture],
        vocab_size=_positive_int(raw, "vocab_size"),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_positions,
        rms_norm_eps=_positive_float(raw, "rms_norm_eps", default=1e-6),
        tie_word_embeddings=_bool(raw, "tie_word_embeddings", default=False),
        qkv_bias=_bool(raw, "qkv_bias", default=True),
        rope=_rope(raw, max_positions),
        layer_types=layer_types,
        sliding_window=sliding_window,
        moe=moe,
        quantization=_quantization(raw, architecture, (hidden_size, num_heads * head_dim, num_kv_heads * head_dim,
                                                       intermediate_size) + (() if moe is None else (
                                       moe.moe_intermediate_size, moe.shared_expert_intermediate_size))),
        torch_dtype=raw.get("torch_dtype") or raw.get("dtype"),
        task=task,
        head=_head(raw, task),
        raw=raw,
    )


PROBLEM_TYPES = ("single_label_classification", "multi_label_classification", "regression")


def _head(raw: dict[str, Any], task: str) -> HeadConfig | None:
    """The classification head's facts from config.json, as transformers' PretrainedConfig reads them."""
    if task not in (contract.TEXT_CLASSIFICATION, contract.TOKEN_CLASSIFICATION):
        return None
    id2label = raw.get("id2label")
    if id2label is None:
        count = _positive_int(raw, "num_labels") if "num_labels" in raw else 2
        labels = tuple(f"LABEL_{i}" for i in range(count))
    elif isinstance(id2label, dict) and {str(key) for key in id2label} == {str(i) for i in range(len(id2label))} \
            and all(isinstance(label, str) for label in id2label.values()):
        by_id = {int(key): label for key, label in id2label.items()}
        labels = tuple(by_id[i] for i in range(len(by_id)))
    else:
        raise ConfigError(f"id2label={id2label!r} must map every id 0..N-1 to a label name")
    if "num_labels" in raw and raw["num_labels"] != len(labels):
        raise ConfigError(f"num_labels={raw['num_labels']!r} disagrees with id2label's {len(labels)} labels")
    problem_type = raw.get("problem_type")
    if problem_type is not None and problem_type not in PROBLEM_TYPES:
        raise ConfigError(f"problem_type={problem_type!r} is not one of {list(PROBLEM_TYPES)}")
    pad = raw.get("pad_token_id")
    if pad is not None and (not isinstance(pad, int) or isinstance(pad, bool) or pad < 0):
        raise ConfigError(f"pad_token_id={pad!r} must be a token id or null")
    bias = task == contract.TOKEN_CLASSIFICATION and _bool(raw, "token_classification_bias", default=True)
    return HeadConfig(len(labels), labels, problem_type, pad, bias)


def _architecture(raw: dict[str, Any]) -> str:
    architectures = raw.get("architectures")
    if not isinstance(architectures, list) or len(architectures) != 1:
        raise ConfigError(
            f"architectures={architectures!r}: expected one of {sorted(ARCHITECTURES)} as a one-element list"
        )
    (architecture,) = architectures
    if not isinstance(architecture, str) or architecture not in ARCHITECTURES:
        raise ConfigError(
            f"architectures=[{architecture!r}] is not supported; supported: {sorted(ARCHITECTURES)}"
        )
    model_type = raw.get("model_type", ARCHITECTURES[architecture])
    if model_type != ARCHITECTURES[architecture]:
        raise ConfigError(
            f"model_type={model_type!r} does not match architectures=[{architecture!r}] "
            f"(expected {ARCHITECTURES[architecture]!r})"
        )
    return architecture


INT4_BLOCK_SIZES = (16, 32, 64, 128, 256)  # MatMulNBits takes powers of two from 16


def round_to_nearest(config: Qwen2Config, block_size: int, symmetric: bool) -> Qwen2Config:
    """The config of an export that quantizes every projection to int4 itself, block by block."""
    if config.quantization is not None:
        raise ConfigError(f"the checkpoint is already {config.quantization.method.upper()} int4; export it without --quantize")
    if block_size not in INT4_BLOCK_SIZES:
        raise ConfigError(f"--block-size {block_size} is not supported; choose one of {list(INT4_BLOCK_SIZES)}")
    inputs = {config.hidden_size, config.num_attention_heads * config.head_dim}
    inputs |= {config.intermediate_size} if len(config.sparse_layers) < config.num_hidden_layers else set()
    if config.moe is not None and config.sparse_layers:
        inputs |= {config.moe.moe_intermediate_size, config.moe.shared_expert_intermediate_size}
    if any(size % block_size for size in inputs):
        raise ConfigError(f"--block-size {block_size} does not divide every projection's input size {sorted(inputs)}; "
                          "choose a smaller block")
    return replace(config, quantization=QuantConfig("rtn", 4, block_size, symmetric))


def _quantization(raw: dict[str, Any], architecture: str, linear_sizes: tuple[int, ...]) -> QuantConfig | None:
    """`quantization_config` of an int4 checkpoint: AutoAWQ "gemm" with zero points, or GPTQ ("gptq"
    format, desc_act false); both with groups that divide every projection's input size."""
    quantization = raw.get("quantization_config")
    if quantization is None:
        return None
    where = "quantization_config"
    method = quantization.get("quant_method") if isinstance(quantization, dict) else None
    if method not in ("awq", "gptq"):
        raise ConfigError(f"{where}.quant_method={method!r} is not supported; export an unquantized checkpoint "
                          "(AWQ and GPTQ int4 checkpoints are supported)")
    bits = quantization.get("bits", quantization.get("w_bit"))
    if bits != 4:
        raise ConfigError(f"{where}.bits={bits!r}: only 4-bit {method.upper()} is supported")
    if method == "awq":
        version = quantization.get("version", "gemm")
        if not isinstance(version, str) or version.lower() != "gemm":
            raise ConfigError(f"{where}.version={version!r}: only AutoAWQ's 'gemm' packing is supported")
        if _bool(quantization, "zero_point", default=True, where=where) is not True:
            raise ConfigError(f"{where}.zero_point=false: only AWQ with zero points is supported")
    else:
        if _bool(quantization, "desc_act", default=False, where=where):
            raise ConfigError(f"{where}.desc_act=true (act-order) is not supported; use a checkpoint quantized "
                              "with desc_act false, as Qwen publishes them")
        layout = quantization.get("checkpoint_format", "gptq")
        if layout != "gptq":
            raise ConfigError(f"{where}.checkpoint_format={layout!r}: only the 'gptq' format is supported")
    group_size = quantization.get("group_size", quantization.get("q_group_size"))
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size <= 0 or \
            any(size % group_size or size % 8 for size in linear_sizes):
        raise ConfigError(f"{where}.group_size={group_size!r} must divide every projection's input size "
                          f"{sorted(set(linear_sizes))} (and those must be multiples of 8)")
    if architecture != "Qwen2ForCausalLM" and method != "gptq":
        raise ConfigError(f"{method.upper()} checkpoints of {architecture} are not supported yet; export the "
                          "unquantized one (GPTQ ones are)")
    return QuantConfig(method, 4, group_size)


def _rope(raw: dict[str, Any], max_positions: int) -> RopeConfig:
    """Normalise `rope_parameters` (v5) or `rope_theta` + `rope_scaling` (v4) into a RopeConfig."""
    if raw.get("rope_parameters") is not None:
        key, params = "rope_parameters", _object(raw, "rope_parameters")
        if "rope_theta" not in params and "rope_theta" in raw:
            params["rope_theta"] = raw["rope_theta"]
    else:
        key, params = "rope_scaling", _object(raw, "rope_scaling")
        params["rope_theta"] = raw.get("rope_theta", 10000.0)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if not isinstance(rope_type, str) or rope_type not in ROPE_TYPES:
        raise ConfigError(f"{key}.rope_type={rope_type!r} is not supported; supported: {list(ROPE_TYPES)}")
    theta = _positive_float(params, "rope_theta", where=key)
    if rope_type == "default":
        return RopeConfig(rope_type="default", theta=theta)

    factor = params.get("factor")
    if rope_type == "linear":
        return RopeConfig(rope_type="linear", theta=theta, factor=_scaling_factor(key, factor))

    original = params.get("original_max_position_embeddings", max_positions)
    if not isinstance(original, int) or isinstance(original, bool) or original <= 0:
        raise ConfigError(f"{key}.original_max_position_embeddings={original!r} must be a positive integer")
    if factor is None:  # transformers 5.x derives it; 4.x requires it
        factor = max_positions / original
    return RopeConfig(
        rope_type="yarn",
        theta=theta,
        factor=_scaling_factor(key, factor),
        original_max_position_embeddings=original,
        # transformers uses `get(...) or default`, so 0 and null both mean the default
        beta_fast=_optional_float(params, "beta_fast", key) or 32.0,
        beta_slow=_optional_float(params, "beta_slow", key) or 1.0,
        attention_factor=_optional_float(params, "attention_factor", key),
        mscale=_optional_float(params, "mscale", key),
        mscale_all_dim=_optional_float(params, "mscale_all_dim", key),
        truncate=_bool(params, "truncate", default=True, where=key),
    )


def _scaling_factor(key: str, factor: Any) -> float:
    if not isinstance(factor, (int, float)) or isinstance(factor, bool) or not math.isfinite(factor) or factor < 1:
        raise ConfigError(f"{key}.factor={factor!r} must be a number >= 1 (e.g. 2.0 or 4.0 for YaRN)")
    return float(factor)


def _attention_layout(raw: dict[str, Any], num_layers: int) -> tuple[tuple[str, ...], int | None]:
    """Per-layer attention type and the window, following transformers' Qwen2Config.

    Published configs set `sliding_window` while `use_sliding_window` is false: the window is then inert.
    Without `layer_types`, layer i slides iff use_sliding_window and i >= max_window_layers.
    """
    use_sliding = _bool(raw, "use_sliding_window", default=False)
    window = raw.get("sliding_window") if use_sliding else None
    if use_sliding and (not isinstance(window, int) or isinstance(window, bool) or window <= 0):
        raise ConfigError(
            f"use_sliding_window is true but sliding_window={window!r}; set a positive window or turn it off"
        )
    layer_types = raw.get("layer_types")
    if layer_types is None:
        first_sliding = raw.get("max_window_layers", num_layers) if use_sliding else num_layers
        if not isinstance(first_sliding, int) or isinstance(first_sliding, bool) or first_sliding < 0:
            raise ConfigError(f"max_window_layers={first_sliding!r} must be a non-negative integer")
        return tuple(
            "sliding_attention" if i >= first_sliding else "full_attention" for i in range(num_layers)
        ), window
    if not isinstance(layer_types, list) or len(layer_types) != num_layers:
        raise ConfigError(f"layer_types must list {num_layers} entries (num_hidden_layers), got {layer_types!r}")
    unknown = sorted({repr(t) for t in layer_types if not isinstance(t, str) or t not in LAYER_TYPES})
    if unknown:
        raise ConfigError(f"layer_types has {unknown}; supported: {list(LAYER_TYPES)}")
    if "sliding_attention" in layer_types and not use_sliding:
        raise ConfigError(
            "layer_types marks sliding_attention layers but use_sliding_window is false; "
            "set use_sliding_window true with a sliding_window, or mark every layer full_attention"
        )
    return tuple(layer_types), window if "sliding_attention" in layer_types else None


def _moe(raw: dict[str, Any], num_layers: int) -> MoeConfig:
    num_experts = _positive_int(raw, "num_experts")
    top_k = _positive_int(raw, "num_experts_per_tok")
    if top_k > num_experts:
        raise ConfigError(f"num_experts_per_tok={top_k} exceeds num_experts={num_experts}")
    mlp_only = raw.get("mlp_only_layers") or []
    if not isinstance(mlp_only, list) or any(not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < num_layers
                                             for i in mlp_only):
        raise ConfigError(f"mlp_only_layers={mlp_only!r} must list layer indices in [0, {num_layers})")
    return MoeConfig(
        num_experts=num_experts,
        num_experts_per_tok=top_k,
        moe_intermediate_size=_positive_int(raw, "moe_intermediate_size"),
        shared_expert_intermediate_size=_positive_int(raw, "shared_expert_intermediate_size"),
        norm_topk_prob=_bool(raw, "norm_topk_prob", default=False),
        decoder_sparse_step=_positive_int(raw, "decoder_sparse_step") if "decoder_sparse_step" in raw else 1,
        mlp_only_layers=tuple(sorted(mlp_only)),
    )


def _positive_int(raw: dict[str, Any], key: str, where: str = "config.json") -> int:
    value = raw.get(key)
    most = MOST.get(key, MOST_ANY)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= most:
        raise ConfigError(f"{where}: {key}={value!r} must be a positive integer of at most {most:,}")
    return value


# upper bounds far past any published model, so a corrupt value is an error instead of an export that
# tries to build 10^18 layers; ONNX dims beyond int32 are not run by onnxruntime's kernels anyway
MOST_ANY = 2**31 - 1
MOST = {"num_hidden_layers": 4096, "num_experts": 65536, "num_experts_per_tok": 65536}


def _positive_float(raw: dict[str, Any], key: str, where: str = "config.json", default: float | None = None) -> float:
    value = raw.get(key, default)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{where}: {key}={value!r} must be a positive number")
    return float(value)


def _optional_float(raw: dict[str, Any], key: str, where: str) -> float | None:
    value = raw.get(key)
    return None if value is None else _positive_float(raw, key, where)


def _bool(raw: dict[str, Any], key: str, default: bool, where: str = "config.json") -> bool:
    value = raw.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: {key}={value!r} must be true or false")
    return value


def _object(raw: dict[str, Any], key: str) -> dict[str, Any]:
    """A JSON object (a copy), {} when absent or null."""
    value = raw.get(key) or {}
    if not isinstance(value, dict):
        raise ConfigError(f"config.json: {key}={value!r} must be a JSON object")
    return dict(value)
