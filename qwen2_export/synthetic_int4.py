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
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .checkpoint import expert_slot, quantized_parameters
from .config import parse_config
from .int4 import ORDER
from .synthetic import tiny_config, write_checkpoint


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


QUANTIZERS = {"awq": quantize_awq, "gptq": quantize_gptq}
QUANTIZATION_CONFIGS = {
    "awq": {"quant_method": "awq", "bits": 4, "zero_point": True, "version": "gemm"},
    "gptq": {"quant_method": "gptq", "bits": 4, "desc_act": False, "sym": True},
}


def write_int4_checkpoint(out_dir: str | Path, method: str, variant: str = "sliding_window", group_size: int = 32,
                          seed: int = 0) -> dict[str, torch.Tensor]:
    """A tiny int4 checkpoint (float tensors in fp16, as published; GPTQ also for the MoE variants, experts
    and shared expert quantized, router and shared-expert gate not, as Qwen's GPTQ-Int4 MoE); returns the
    float state dict that equals it exactly (hub names, dequantized projections, every tensor in fp32)."""
    out = Path(out_dir)
    config_json = {**tiny_config(variant), "torch_dtype": "float16",
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
