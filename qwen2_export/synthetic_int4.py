"""Seeded int4 checkpoints from a tiny random model, AWQ or GPTQ layout, and their exact dequantization.

AWQ follows AutoAWQ's `WQLinear_GEMM.from_linear` (per group of inputs: scale from the range, integer
zero point, `q = round(w / s + z)` clamped to 0..15; code 8c + ORDER[i] in nibble i of word c). GPTQ
follows AutoGPTQ's symmetric quantizer and its `QuantLinear.pack` (zero point 8; codes packed along
the inputs, row 8r + j in nibble j of word r; zero points packed along the outputs and stored minus
one; `g_idx` = k // G). The dequantized weights `(q - z) * s` (exact in fp32) are the parity
reference: what a float model must compute to equal the int4 checkpoint.
"""

from __future__ import annotations

import json
import math
import zlib
from functools import partial
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .checkpoint import expert_slot, quantized_parameters
from .config import Qwen2Config, parse_config
from .int4 import ORDER
from .synthetic import TensorSource, random_tensors, tiny_config, write_checkpoint


def pack_awq(codes: torch.Tensor) -> torch.Tensor:
    """Codes [R, N] in 0..15 -> int32 words [R, N/8] in AutoAWQ's nibble order."""
    words = sum(codes[:, ORDER[i]::8].to(torch.int64) << (4 * i) for i in range(8))
    return torch.from_numpy(np.ascontiguousarray(np.asarray(words.numpy(), dtype=np.uint32).view(np.int32)))


def quantize_awq(weight: torch.Tensor, group_size: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """A Linear weight [N, K] -> ({qweight, qzeros, scales}, the dequantized weight [N, K] in fp32)."""
    n, k = weight.shape
    groups = weight.float().t().reshape(k // group_size, group_size, n)  # [K/G, G, N]
    low, high = groups.amin(dim=1), groups.amax(dim=1)
    scales = ((high - low).clamp(min=1e-5) / 15).half()
    s = scales.float()
    zeros = torch.round(-low / s).clamp(0, 15)
    codes = torch.round(groups / s[:, None] + zeros[:, None]).clamp(0, 15)  # [K/G, G, N]
    dequantized = ((codes - zeros[:, None]) * s[:, None]).reshape(k, n).t().contiguous()
    parts = {"qweight": pack_awq(codes.reshape(k, n).to(torch.int64)), "qzeros": pack_awq(zeros.to(torch.int64)),
             "scales": scales}
    return parts, dequantized


def pack_rows(codes: torch.Tensor) -> torch.Tensor:
    """Codes [K, N] -> int32 words [K/8, N], row 8r + j in nibble j of word r (GPTQ's qweight)."""
    words = sum(codes[j::8].to(torch.int64) << (4 * j) for j in range(8))
    return torch.from_numpy(np.ascontiguousarray(np.asarray(words.numpy(), dtype=np.uint32).view(np.int32)))


def pack_columns(codes: torch.Tensor) -> torch.Tensor:
    """Codes [R, N] -> int32 words [R, N/8], column 8c + j in nibble j of word c (GPTQ's qzeros)."""
    words = sum(codes[:, j::8].to(torch.int64) << (4 * j) for j in range(8))
    return torch.from_numpy(np.ascontiguousarray(np.asarray(words.numpy(), dtype=np.uint32).view(np.int32)))


def quantize_gptq(weight: torch.Tensor, group_size: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """A Linear weight [N, K] -> ({qweight, qzeros, scales, g_idx}, the dequantized weight [N, K] in fp32)."""
    n, k = weight.shape
    groups = weight.float().t().reshape(k // group_size, group_size, n)  # [K/G, G, N]
    scales = (2 * groups.abs().amax(dim=1).clamp(min=1e-5) / 15).half()  # symmetric: zero point 8
    s = scales.float()
    codes = torch.round(groups / s[:, None] + 8).clamp(0, 15)
    dequantized = ((codes - 8) * s[:, None]).reshape(k, n).t().contiguous()
    parts = {"qweight": pack_rows(codes.reshape(k, n).to(torch.int64)),
             "qzeros": pack_columns(torch.full((k // group_size, n), 8 - 1, dtype=torch.int64)),
             "scales": scales, "g_idx": (torch.arange(k) // group_size).to(torch.int32)}
    return parts, dequantized


def random_gptq_tensors(config: Qwen2Config, group_size: int, seed: int) -> list[TensorSource]:
    """Every tensor of a GPTQ-Int4 checkpoint of `config` (quantization_config set), drawn without a float
    model, so that one of any size streams to disk: random codes, zero point 8, one scale that keeps
    activations at the scale of the float weights; float tensors (embeddings, norms, router) in fp16."""
    quantized = quantized_parameters(config)
    tensors = []
    for tensor in random_tensors(config, seed, torch.float16):
        expert = expert_slot(tensor.name, config)
        if tensor.name not in quantized and (expert is None or expert.parameter not in quantized):
            tensors.append(tensor)
            continue
        (n, k), prefix = tensor.shape, tensor.name.removesuffix(".weight")
        groups = k // group_size
        generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(tensor.name.encode()))
        scale = 1 / (4.6 * math.sqrt(k))  # codes uniform in 0..15 around 8: std 4.6
        tensors += [
            TensorSource(f"{prefix}.qweight", (k // 8, n), torch.int32, partial(random_words, k // 8 * n, generator)),
            TensorSource(f"{prefix}.qzeros", (groups, n // 8), torch.int32,
                         partial(filled, groups * n // 8, torch.int32, 0x77777777)),  # z - 1 = 7 in every nibble
            TensorSource(f"{prefix}.scales", (groups, n), torch.float16, partial(filled, groups * n, torch.float16, scale)),
            TensorSource(f"{prefix}.g_idx", (k,), torch.int32, lambda k=k: iter([(torch.arange(k) // group_size).int()])),
        ]
    return tensors


def random_words(count: int, generator: torch.Generator, step: int = 1 << 22) -> Iterator[torch.Tensor]:
    for begin in range(0, count, step):
        size = min(step, count - begin)
        yield torch.randint(0, 256, (4 * size,), dtype=torch.uint8, generator=generator).view(torch.int32)


def filled(count: int, dtype: torch.dtype, value: float, step: int = 1 << 22) -> Iterator[torch.Tensor]:
    for begin in range(0, count, step):
        yield torch.full((min(step, count - begin),), value, dtype=dtype)


def write_random_gptq_checkpoint(out_dir: str | Path, config_json: dict[str, Any], group_size: int = 128,
                                 shards: int = 8, seed: int = 0) -> Path:
    """A GPTQ-Int4 checkpoint of `config_json`'s shapes (as Qwen publishes: desc_act false, symmetric),
    written tensor by tensor: a Qwen2-57B-A14B one is ~31 GB, and nothing larger than a chunk is held."""
    config_json = {**config_json, "torch_dtype": "float16",
                   "quantization_config": {**QUANTIZATION_CONFIGS["gptq"], "group_size": group_size}}
    tensors = random_gptq_tensors(parse_config(config_json), group_size, seed)
    return write_checkpoint(out_dir, config_json, seed=seed, shards=shards, tensors=tensors)


QUANTIZERS = {"awq": quantize_awq, "gptq": quantize_gptq}
QUANTIZATION_CONFIGS = {
    "awq": {"quant_method": "awq", "bits": 4, "zero_point": True, "version": "gemm"},
    "gptq": {"quant_method": "gptq", "bits": 4, "desc_act": False, "sym": True},
}


def write_int4_checkpoint(out_dir: str | Path, method: str, variant: str = "sliding_window", group_size: int = 32,
                          seed: int = 0, overrides: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """A tiny int4 checkpoint (float tensors in fp16, as published; GPTQ also for the MoE variants, experts
    and shared expert quantized, router and shared-expert gate not, as Qwen's GPTQ-Int4 MoE); returns the
    float state dict that equals it exactly (hub names, dequantized projections, every tensor in fp32).
    `overrides`: config.json values that replace the variant's (e.g. wider experts)."""
    out = Path(out_dir)
    config_json = {**tiny_config(variant), **(overrides or {}), "torch_dtype": "float16",
                   "quantization_config": {**QUANTIZATION_CONFIGS[method], "group_size": group_size}}
    write_checkpoint(out, config_json, seed=seed, dtype=torch.float16)
    config = parse_config(config_json)
    quantized = quantized_parameters(config)
    floats = load_file(out / "model.safetensors")
    stored, reference = {}, {}
    for name, tensor in floats.items():
        expert = expert_slot(name, config)  # Qwen2-MoE: each expert's Linear is quantized on its own
        if name in quantized or (expert is not None and expert.parameter in quantized):
            parts, reference[name] = QUANTIZERS[method](tensor, group_size)
            prefix = name.removesuffix(".weight")
            stored.update({f"{prefix}.{part}": value for part, value in parts.items()})
        else:
            stored[name], reference[name] = tensor.contiguous(), tensor.float()
    save_file(stored, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config_json, indent=2))
    return reference
