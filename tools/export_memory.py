"""Peak memory and wall time of `qwen2-onnx export` on large random checkpoints.

Synthesises a checkpoint with published shapes in the hub layout (streamed to disk, never held in
memory), exports it in a child process and reports the child's peak RSS beside the checkpoint size.

    python tools/export_memory.py --shape qwen2-7b --workdir /tmp/memcheck
    python tools/export_memory.py --shape qwen2-57b-a14b --layers 4 --workdir /tmp/memcheck
    python tools/export_memory.py --shape qwen2-7b --quantize int4 --target cpu --workdir /tmp/memcheck

Needs free disk for the checkpoint and the artifact (about 31 GB for Qwen2-7B in bf16). Folders are
removed afterwards unless --keep.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from qwen2_export.staging import folder_bytes
from qwen2_export.synthetic import QWEN2_7B, QWEN2_57B_A14B, write_checkpoint

SHAPES = {"qwen2-7b": QWEN2_7B, "qwen2-57b-a14b": QWEN2_57B_A14B}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def compare_with_torch(checkpoint: Path, artifact: Path) -> float:
    """Last-position logits of an 8-token prompt: onnxruntime on the artifact vs our fp32 torch model."""
    import numpy as np
    import onnxruntime as ort

    from qwen2_export.checkpoint import load_model
    from qwen2_export.config import load_config

    config = load_config(checkpoint)
    session = ort.InferenceSession(str(artifact / "onnx/model.onnx"), providers=["CPUExecutionProvider"])
    ids = np.arange(100, 108, dtype=np.int64)[None]
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(8)[None]}
    for inp in session.get_inputs()[3:]:
        dtype = np.float16 if "float16" in inp.type else np.float32
        feed[inp.name] = np.zeros((1, config.num_key_value_heads, 0, config.head_dim), dtype)
    onnx_logits = session.run(["logits"], feed)[0][0, -1].astype(np.float32)
    del session
    model = load_model(checkpoint, config)
    past = [torch.zeros(1, config.num_key_value_heads, 0, config.head_dim)] * (2 * config.num_hidden_layers)
    with torch.no_grad():
        torch_logits = model(*(torch.from_numpy(feed[k]) for k in ("input_ids", "attention_mask", "position_ids")), *past)[0]
    return float(np.abs(onnx_logits - torch_logits[0, -1].numpy()).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen2-7b")
    parser.add_argument("--layers", type=int, help="cut the model to this many layers (default: all)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="checkpoint and export dtype")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--quantize", choices=["int4"], help="export with --quantize int4 (round to nearest)")
    parser.add_argument("--block-size", type=int, default=32, help="--quantize: inputs per scale")
    parser.add_argument("--target", action="append", default=[], choices=["cpu", "cuda"],
                        help="also write this optimized graph (part of the measured export)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint and artifact folders")
    parser.add_argument("--check", action="store_true", help="afterwards run the artifact on onnxruntime CPU "
                        "against the torch model (fp16/fp32 only; needs about 3x the checkpoint in memory)")
    args = parser.parse_args()

    config = dict(SHAPES[args.shape])
    if args.layers:
        config["num_hidden_layers"] = config["max_window_layers"] = args.layers
    name = f"{args.shape}-{config['num_hidden_layers']}l-{args.dtype}"
    suffix = f"-int4-b{args.block_size}" if args.quantize else ""
    checkpoint, artifact = args.workdir / f"{name}-checkpoint", args.workdir / f"{name}{suffix}-artifact"
    args.workdir.mkdir(parents=True, exist_ok=True)
    try:
        if not (checkpoint / "config.json").is_file():
            started = time.monotonic()
            write_checkpoint(checkpoint, config, seed=0, dtype=DTYPES[args.dtype], shards=args.shards)
            print(f"synthesised {checkpoint} in {time.monotonic() - started:.0f}s", file=sys.stderr)
        started = time.monotonic()
        command = [sys.executable, "-m", "qwen2_onnx", "export", str(checkpoint), "-o", str(artifact),
                   "--dtype", args.dtype, "--force", *(f"--target={t}" for t in args.target)]
        if args.quantize:
            command += ["--quantize", args.quantize, "--block-size", str(args.block_size)]
        subprocess.run(command, check=True)
        wall = time.monotonic() - started
        peak_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux reports KiB
        report = {
            "shape": args.shape,
            "layers": config["num_hidden_layers"],
            "dtype": args.dtype,
            "quantize": f"{args.quantize} block {args.block_size}" if args.quantize else None,
            "targets": args.target,
            "checkpoint_gb": round(folder_bytes(checkpoint) / 1e9, 2),
            "artifact_gb": round(folder_bytes(artifact) / 1e9, 2),
            "export_peak_rss_gib": round(peak_rss / 2**30, 2),
            "export_wall_s": round(wall, 1),
        }
        if args.check:
            report["onnx_vs_torch_max_abs_diff"] = compare_with_torch(checkpoint, artifact)
        print(json.dumps(report))
    finally:
        if not args.keep:
            shutil.rmtree(checkpoint, ignore_errors=True)
            shutil.rmtree(artifact, ignore_errors=True)


if __name__ == "__main__":
    main()
