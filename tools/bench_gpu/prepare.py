"""What every part of the GPU benchmark starts from: the shapes, the machine (environment, copy bandwidth),
random checkpoints at published shapes and their CUDA artifacts, and the floor of a decode step."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from artifact import contract
from graphs.artifact import optimize_artifact
from qwen2_export.checkpoint import expert_slot
from qwen2_export.config import parse_config
from qwen2_export.export import export_checkpoint
from qwen2_export.synthetic import QWEN2_0_5B, QWEN2_7B, QWEN2_57B_A14B, hub_tensor_shapes, write_checkpoint
from runtime.cuda_graph import CapturedSteps

SHAPES = {"qwen2-0.5b": QWEN2_0_5B, "qwen2-7b": QWEN2_7B,
          "qwen2-57b-a14b-4l": {**QWEN2_57B_A14B, "num_hidden_layers": 4, "max_window_layers": 4}}
# other ways to load ours (Model.load options), timed beside the default with --variants
VARIANTS = {"unpipelined_decode": {"load": {"steps": CapturedSteps}}}  # captured steps without the pipelined pair


def environment() -> dict:
    import onnxruntime as ort
    import transformers

    try:
        import onnxruntime_genai

        genai = onnxruntime_genai.__version__
    except ImportError:
        genai = None
    return {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "transformers": transformers.__version__,
            "onnxruntime": ort.__version__, "onnxruntime_genai": genai, "providers": ort.get_available_providers()}


def bandwidth() -> dict:
    source = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_()
    target = torch.empty_like(source)
    for _ in range(3):
        target.copy_(source)
    torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        target.copy_(source)
    stop.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(stop) / 1e3 / 20
    return {"copy_tb_s": 2 * source.numel() / seconds / 1e12}


def build_artifact(checkpoint: Path, folder: Path, dtype: str) -> Path:
    """Export and optimize for CUDA, unless an earlier call of this run (or --prepare) did already."""
    if (folder / "onnx" / "model_cuda.onnx").is_file():
        return folder
    artifact = export_checkpoint(checkpoint, folder, dtype=dtype, force=True)
    optimize_artifact(artifact, "cuda", {"fp16": "float16", "bf16": "bfloat16"}[dtype])
    return artifact


def prepare(workdir: Path, shape: str) -> tuple[Path, Path]:
    """Random checkpoint at the shape (bf16, 4 shards) and its fp16 CUDA artifact; CPU work only."""
    checkpoint = workdir / f"{shape}-checkpoint"
    if not (checkpoint / "config.json").is_file():
        write_checkpoint(checkpoint, SHAPES[shape], seed=0, dtype=torch.bfloat16, shards=4)
    return checkpoint, build_artifact(checkpoint, workdir / f"{shape}-fp16", "fp16")


def yarn_artifact(workdir: Path) -> Path:
    """The Qwen2-7B checkpoint's weights (linked, not copied) under a config with YaRN factor 4."""
    base = workdir / "qwen2-7b-checkpoint"
    if not (base / "config.json").is_file():
        write_checkpoint(base, SHAPES["qwen2-7b"], seed=0, dtype=torch.bfloat16, shards=4)
    checkpoint = workdir / "qwen2-7b-yarn4-checkpoint"
    checkpoint.mkdir(exist_ok=True)
    for item in base.iterdir():
        if item.name != "config.json" and not (checkpoint / item.name).exists():
            (checkpoint / item.name).symlink_to(item)
    config = {**SHAPES["qwen2-7b"], "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}}
    (checkpoint / "config.json").write_text(json.dumps(config))
    return build_artifact(checkpoint, workdir / "qwen2-7b-yarn4-fp16", "fp16")


def decode_read_bytes(config_json: dict, int4_block: int | None = None) -> int:
    """Bytes of fp16 weights one batch-1 decode step must read: every tensor but the embedding table
    (one row is gathered; a tied lm_head reads it whole), and k of E routed experts. With `int4_block`,
    the quantized projections (contract.quantized_weights) read half a byte per weight, an fp16 scale
    and a 4-bit zero point per block."""
    config = parse_config(config_json)
    linears, stacks = contract.quantized_weights(config.num_hidden_layers, config.sparse_layers)
    quantized = set(linears) | set(stacks)
    total = 0
    for name, shape in hub_tensor_shapes(config):
        count = int(np.prod(shape))
        size = 2 * count
        expert = expert_slot(name, config)  # a routed expert's Linear is a slice of its layer's stack
        if int4_block and (name in quantized or (expert is not None and expert.parameter in quantized)):
            size = count // 2 + count // int4_block * 2 + count // int4_block // 2
        if name == "model.embed_tokens.weight" and not config.tie_word_embeddings:
            continue
        if ".mlp.experts." in name:
            size = size * config.moe.num_experts_per_tok // config.moe.num_experts
        total += size
    return total


def placement(graph: Path) -> dict[str, list[str]]:
    """Where onnxruntime places each node of `graph` in a CUDA session (the CPU EP beside it): node names
    by execution provider, as the runtime's load-time check sees them (runtime/session.py)."""
    import onnxruntime as ort

    from runtime.session import PROVIDERS

    options = ort.SessionOptions()
    options.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    session = ort.InferenceSession(str(graph), options, providers=[PROVIDERS["cuda"], PROVIDERS["cpu"]])
    placed: dict[str, list[str]] = {}
    for subgraph in session.get_provider_graph_assignment_info():
        placed.setdefault(subgraph.ep_name, []).extend(node.name for node in subgraph.get_nodes())
    return placed
