"""Which weight layout onnxruntime's CUDA GEMMs read faster at Qwen2 shapes (runs on the lent GPU).

For every projection of a shape (packed q/k/v, o_proj, packed gate/up, down_proj, lm_head) and a
few row counts (1 = a decode step, 8 = batch-8 decode, 512 = a prefill chunk), one fp16 graph of
`copies` GEMMs with different weights (together larger than L2) runs through onnxruntime on CUDA:

    in_out:  MatMul(x, W [in, out])                                  (the layout graphs/ writes)
    out_in:  com.microsoft FusedMatMul(x, W^T [out, in], transB=1)   (the layout torch's F.linear reads)

GPU time per GEMM comes from CUPTI (torch.profiler), so launch gaps do not count; decode rows are
also given as effective read bandwidth. torch's F.linear (cuBLAS through torch, [out, in]) runs the
same shapes as a reference. The summary adds the projections up to one decode step per layout.
On the H100 (tools/gpu_notes.md) cuBLAS picked the same kernels for both, out_in 3% slower per
decode step and an end-to-end graph with it slower too, so graphs/ keeps [in, out].

    PYTHONPATH=/root/ortgpu/site:$PWD python3 tools/bench_gemm_layout.py --shapes qwen2-0.5b,qwen2-7b --out $OUT
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
from onnx import TensorProto, helper

from bench_gpu.prepare import SHAPES
from bench_gpu.profiles import kernel_profile
from qwen2_export.config import parse_config

LAYOUTS = ("in_out", "out_in")
L2_BEATING_BYTES = 512e6  # weights of one graph together; H100/H200 L2 is 50-60 MB


def projections(config_json: dict) -> dict[str, tuple[int, int]]:
    """(in, out) of each GEMM a layer runs as one node after our packing passes, and the lm_head."""
    c = parse_config(config_json)
    d, dh = c.hidden_size, c.head_dim
    return {"qkv": (d, (c.num_attention_heads + 2 * c.num_key_value_heads) * dh),
            "o_proj": (c.num_attention_heads * dh, d), "gate_up": (d, 2 * c.intermediate_size),
            "down_proj": (c.intermediate_size, d), "lm_head": (d, c.vocab_size)}


def gemm_graph(layout: str, rows: int, k: int, n: int, copies: int) -> bytes:
    """x [1, rows, k] times `copies` weights given as inputs (bound on the GPU: no 2 GB protobuf limit)."""
    fp16 = TensorProto.FLOAT16
    weight_shape = [k, n] if layout == "in_out" else [n, k]
    nodes, inputs, outputs = [], [helper.make_tensor_value_info("x", fp16, [1, rows, k])], []
    for i in range(copies):
        inputs.append(helper.make_tensor_value_info(f"w{i}", fp16, weight_shape))
        outputs.append(helper.make_tensor_value_info(f"y{i}", fp16, [1, rows, n]))
        if layout == "in_out":
            nodes.append(helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"]))
        else:
            nodes.append(helper.make_node("FusedMatMul", ["x", f"w{i}"], [f"y{i}"], domain="com.microsoft", transB=1))
    graph = helper.make_graph(nodes, f"{layout}_{rows}x{k}x{n}", inputs, outputs)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10).SerializeToString()


def bind(binding, name: str, tensor: torch.Tensor, output: bool = False) -> None:
    method = binding.bind_output if output else binding.bind_input
    method(name, "cuda", 0, np.float16, list(tensor.shape), tensor.data_ptr())


def time_case(rows: int, k: int, n: int) -> dict:
    import onnxruntime as ort

    copies = max(2, min(16, math.ceil(L2_BEATING_BYTES / (2 * k * n))))
    torch.manual_seed(0)
    x = torch.randn(1, rows, k, device="cuda", dtype=torch.float16)
    weights = [torch.randn(k, n, device="cuda", dtype=torch.float16) * 0.02 for _ in range(copies)]
    result: dict = {"rows": rows, "in": k, "out": n, "copies": copies}
    outputs = {}
    for layout in LAYOUTS:
        stored = weights if layout == "in_out" else [w.t().contiguous() for w in weights]
        session = ort.InferenceSession(gemm_graph(layout, rows, k, n, copies), providers=["CUDAExecutionProvider"])
        binding = session.io_binding()
        bind(binding, "x", x)
        ys = [torch.empty(1, rows, n, device="cuda", dtype=torch.float16) for _ in range(copies)]
        for i in range(copies):
            bind(binding, f"w{i}", stored[i])
            bind(binding, f"y{i}", ys[i], output=True)
        profile = kernel_profile(lambda session=session, binding=binding: session.run_with_iobinding(binding), 10)
        result[layout] = {"us": profile["gpu_us"] / copies, "kernels_per_gemm": profile["kernels"] / copies,
                          "top": [name for name, _, _ in profile["top_us"][:3]]}
        outputs[layout] = ys[0].float()
    reference = weights[0].t().contiguous()
    profile = kernel_profile(lambda: torch.nn.functional.linear(x, reference), 10)
    result["torch_linear_us"] = profile["gpu_us"]
    result["layouts_max_abs_diff"] = float((outputs["in_out"] - outputs["out_in"]).abs().max())
    bytes_read = 2 * k * n
    for layout in LAYOUTS:
        result[layout]["tb_s"] = bytes_read / (result[layout]["us"] * 1e-6) / 1e12
    result["out_in_speedup"] = result["in_out"]["us"] / result["out_in"]["us"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="qwen2-0.5b,qwen2-7b")
    parser.add_argument("--rows", default="1,8,512")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    report: dict = {"gpu": torch.cuda.get_device_name()}
    for shape in filter(None, args.shapes.split(",")):
        config_json = SHAPES[shape]
        cases = {f"{name}/{rows}": time_case(rows, k, n)
                 for name, (k, n) in projections(config_json).items() for rows in map(int, args.rows.split(","))}
        layers = config_json["num_hidden_layers"]
        step = {layout: sum(case[layout]["us"] * (1 if name.startswith("lm_head") else layers)
                            for name, case in cases.items() if name.endswith("/1")) / 1e3 for layout in LAYOUTS}
        report[shape] = {"cases": cases, "decode_step_gemm_ms": step}
        print(f"\n{shape} on {report['gpu']}: projection/rows | in_out us (TB/s) | out_in us (TB/s) | speedup | torch F.linear us")
        for name, case in cases.items():
            print(f"  {name:16s} | {case['in_out']['us']:8.1f} ({case['in_out']['tb_s']:.2f}) | "
                  f"{case['out_in']['us']:8.1f} ({case['out_in']['tb_s']:.2f}) | {case['out_in_speedup']:.2f}x | "
                  f"{case['torch_linear_us']:.1f}   kernels {case['in_out']['top'][:2]} vs {case['out_in']['top'][:2]}")
        print(f"  decode step GEMMs (one row, {layers} layers + lm_head): in_out {step['in_out']:.3f} ms, out_in {step['out_in']:.3f} ms")
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_gemm_layout.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
