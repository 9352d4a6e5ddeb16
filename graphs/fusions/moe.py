"""Routed experts of a Qwen2-MoE layer -> com.microsoft::MoE.

Before (modules model.layers.{i}.mlp.gate and .mlp.experts):

    x [B, S, D] --MatMul Wgᵀ--> logits --Softmax fp32--> TopK(k) --(renormalise)--> Scatter --> weights [B, S, E]
    x --MatMul gate_up[e]ᵀ--> silu(gate)·up --MatMul down[e]ᵀ--> Σ_e weights[..., e] · out_e   (every expert)

After:

    MoE(x [B, S, D], Reshape(logits, [-1, E]), fc1 = interleave(gate_up) [E, 2I, D], "", fc2 = down [E, D, I],
        k, activation_type="swiglu", swiglu_fusion=1, normalize_routing_weights=norm_topk_prob)

Int4 experts (--quantize int4 or a GPTQ MoE checkpoint: blocked DequantizeLinear of the two stacks along
their inputs, the last axis) become com.microsoft::QMoE
with the same routing and layout: codes packed two a byte along the inputs (fc1 [E, 2I, D/2] rows
interleaved, fc2 [E, D, I/2]), scales [E, rows, K/G] and zero points packed along the blocks. CPU QMoE
renormalizes the top-k weights whatever normalize_routing_weights says, so without norm_topk_prob the
mixing weights come as router_weights = Softmax(logits) (ort-contrib-ops.md §6).

The op applies the softmax over all experts itself and takes the top-k of those probabilities, exactly
as transformers does (ort-contrib-ops.md §5). Only interleaved SwiGLU (swiglu_fusion=1) is used: CPU
supports nothing else, and the other layouts swapped gate and up on CUDA. The shared expert and its
sigmoid gate stay as ordinary nodes. The op takes 3-D tokens (its output keeps their shape) but 2-D
router logits; the reshape has a constant target, so no shape arithmetic enters the graph.
Legend: B batch, S tokens, D hidden, E experts, I expert intermediate.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from artifact import contract, uint4

from ..build import MS_DOMAIN, add_initializer, add_node, constant, replace_value
from ..facts import PassFacts
from ..fusion import Fusion
from ..regions import Region, initializers_of, nodes_in_scope, region_of
from .int4_matmul import unsigned

NAME = "MoE"


@dataclass(frozen=True)
class Experts:
    layer: int
    input: ir.Value
    router_logits: ir.Value
    gate_up: ir.Value  # [E, 2I, D], gate rows then up rows: an initializer, or DequantizeLinear's output
    down: ir.Value  # [E, D, I]
    output: ir.Value


def interleave_gate_up(gate_up: np.ndarray) -> np.ndarray:
    """[E, 2I, D] with gate rows then up rows -> rows g0, u0, g1, u1, ... (MoE's swiglu_fusion=1)."""
    experts, rows, hidden = gate_up.shape
    gate, up = gate_up[:, : rows // 2], gate_up[:, rows // 2 :]
    return np.stack([gate, up], axis=2).reshape(experts, rows, hidden)


def find(graph: ir.Graph, facts: PassFacts) -> list[tuple[int, Region, Region]]:
    found = []
    for layer in facts.model.sparse_layers:
        experts = nodes_in_scope(graph, f"model.layers.{layer}.mlp.experts")
        router = nodes_in_scope(graph, f"model.layers.{layer}.mlp.gate")
        if experts and router:
            found.append((layer, region_of(experts), region_of(router)))
    return found


def check(graph: ir.Graph, candidate: tuple[int, Region, Region], facts: PassFacts) -> Experts | str:
    layer, experts, router = candidate
    stacked = [w for w in initializers_of(experts.nodes) if w.shape is not None and len(w.shape) == 3]
    stacked += [v for v in experts.inputs if dequantized(v) is not None and len(v.shape) == 3]
    if len(stacked) != 2:
        return f"layer {layer}: expected the two stacked expert tensors, found {len(stacked)}"
    gate_up, down = sorted(stacked, key=lambda w: stack_name(w).endswith("down_proj"))
    experts_count, rows, hidden = gate_up.shape
    if (dequantized(gate_up) is None) != (dequantized(down) is None):
        return f"layer {layer}: one expert stack is int4 and the other is not"
    if list(down.shape) != [experts_count, hidden, rows // 2] or not stack_name(gate_up).endswith("gate_up_proj"):
        return f"layer {layer}: expert tensors {gate_up.name} {list(gate_up.shape)} / {down.name} {list(down.shape)} do not pair up"
    matmuls = [n for n in router.nodes if n.op_type in ("MatMul", "Gemm") and any(v is not None and v.is_initializer() for v in n.inputs)]
    if len(matmuls) != 1:
        return f"layer {layer}: router logits MatMul not found"
    logits_node = matmuls[0]
    x = logits_node.inputs[0]
    if x not in experts.inputs or len(experts.outputs) != 1:
        return f"layer {layer}: experts and router do not read the same tokens, or the experts have several outputs"
    return Experts(layer, x, logits_node.outputs[0], gate_up, down, experts.outputs[0])


def dequantized(value: ir.Value) -> ir.Node | None:
    """The DequantizeLinear of initializers, blocked along the last axis, that produces `value`, if any."""
    node = value.producer()
    if node is None or node.op_type != "DequantizeLinear" or not all(v is None or v.is_initializer() for v in node.inputs):
        return None
    axis = node.attributes.get("axis")
    return node if axis is not None and axis.value == len(node.inputs[0].shape) - 1 else None


def stack_name(value: ir.Value) -> str:
    """The stacked parameter's name; int4 stacks are read from their codes ("{parameter}.int4")."""
    node = dequantized(value)
    return value.name if node is None else node.inputs[0].name.removesuffix(".int4")


def build(graph: ir.Graph, found: list[Experts], facts: PassFacts) -> PassFacts:
    for experts in found:
        layer, gate_up = experts.layer, experts.gate_up
        rows_shape = constant(graph, f"layers.{layer}/mlp/moe/router_rows", np.array([-1, gate_up.shape[0]], np.int64))
        (router_rows,) = add_node(graph, "Reshape", [experts.router_logits, rows_shape], name=f"layers.{layer}/mlp/router_rows")
        attributes = {"k": facts.model.experts_per_token, "activation_type": "swiglu", "swiglu_fusion": 1,
                      "normalize_routing_weights": int(facts.model.normalize_routing), "activation_alpha": 1.0,
                      "activation_beta": 0.0}
        if dequantized(gate_up) is None:
            fc1 = add_initializer(graph, f"layers.{layer}/mlp/moe/fc1", gate_up.dtype, tuple(gate_up.shape),
                                  lambda w=gate_up: interleave_gate_up(w.const_value.numpy()))
            (out,) = add_node(graph, "MoE", [experts.input, router_rows, fc1, None, experts.down], attributes,
                              name=f"layers.{layer}/mlp/MoE", domain=MS_DOMAIN)
        else:
            out = quantized_experts(graph, experts, router_rows, attributes, facts)
        replace_value(graph, experts.output, out)
    return facts


def uint4_rows(value: ir.Value) -> np.ndarray:
    """A 4-bit initializer [..., n] as uint4 bytes [..., ceil(n / 2)], each row packed on its own. An even n
    packs rows exactly as ONNX packs the whole tensor: its bytes are taken as they are (int4 codes shifted
    by 8, the zero point QMoE assumes without one, is a flip of each nibble's top bit), not unpacked."""
    if value.shape[-1] % 2:
        return uint4.pack(unsigned(value.const_value.numpy()))
    stored = io.BytesIO()  # tofile copies the bytes; tobytes would unpack and repack a 4-bit external tensor
    value.const_value.tofile(stored)
    raw = np.frombuffer(stored.getbuffer(), np.uint8).reshape(*value.shape[:-1], value.shape[-1] // 2)
    return raw ^ np.uint8(0x88) if value.dtype == ir.DataType.INT4 else raw


# onnxruntime's CUDA QMoE (int4, fp16/bf16; tools/gpu_notes.md, session 10): its CUTLASS weight tiles span
# 64 inputs, its blocks are 32 inputs or more, and it read zero points wrong where a row holds an odd number
# of blocks (the CPU kernel pads such a row's last byte; CUDA probably reads them unpadded)
CUDA_K_TILE = 64
CUDA_MIN_BLOCK = 32


def cuda_qmoe_refusal(manifest: contract.Manifest) -> str | None:
    """Why an int4 MoE artifact can have no CUDA graph, or None when it can (or has no int4 experts)."""
    moe, quant = manifest.model.moe, manifest.quantization
    if moe is None or quant is None:
        return None
    hidden, inter, block = manifest.model.hidden_size, moe.moe_intermediate_size, quant.group_size
    if hidden % CUDA_K_TILE or inter % CUDA_K_TILE:
        return (f"int4 experts run on CUDA only when the hidden size ({hidden}) and the expert width ({inter}) are "
                f"multiples of {CUDA_K_TILE} (onnxruntime's CUDA QMoE); run this artifact on the CPU")
    if block < CUDA_MIN_BLOCK:
        return (f"int4 experts run on CUDA only in blocks of {CUDA_MIN_BLOCK} or more (onnxruntime's CUDA QMoE), this "
                f"artifact has {block}; re-export with --block-size {CUDA_MIN_BLOCK} or more, or run it on the CPU")
    if not quant.symmetric and (hidden // block % 2 or inter // block % 2):
        return (f"int4 experts with zero points run on CUDA only when the hidden size ({hidden}) and the expert width "
                f"({inter}) hold an even number of {block}-blocks (onnxruntime's CUDA QMoE); re-export with another "
                f"--block-size or --symmetric, or run it on the CPU")
    return None


def quantized_experts(graph: ir.Graph, experts: Experts, router_rows: ir.Value, attributes: dict, facts: PassFacts) -> ir.Value:
    """QMoE over the two int4 stacks: codes, scales and zero points re-laid as the op reads them."""
    name = f"layers.{experts.layer}/mlp/qmoe"
    fc = {}
    for index, (stack, order) in enumerate(((experts.gate_up, interleave_gate_up), (experts.down, lambda a: a)), start=1):
        node = dequantized(stack)
        codes, scales, zeros = (list(node.inputs) + [None])[:3]
        count, rows, k = codes.shape
        fc[index] = (
            add_initializer(graph, f"{name}/fc{index}", ir.DataType.UINT8, (count, rows, k // 2),
                            lambda c=codes, o=order: o(uint4_rows(c))),
            add_initializer(graph, f"{name}/fc{index}_scales", scales.dtype, tuple(scales.shape),
                            lambda s=scales, o=order: o(s.const_value.numpy())),
            None if zeros is None else add_initializer(
                graph, f"{name}/fc{index}_zero_points", ir.DataType.UINT8, (count, rows, (zeros.shape[2] + 1) // 2),
                lambda z=zeros, o=order: o(uint4_rows(z))),
        )
        block = node.attributes["block_size"].value
    # without norm_topk_prob the mixing weights are the softmax itself (CPU QMoE renormalizes otherwise)
    router_weights = None
    if not facts.model.normalize_routing:
        (router_weights,) = add_node(graph, "Softmax", [router_rows], {"axis": -1}, name=f"{name}/router_weights")
    (out,) = add_node(
        graph, "QMoE",
        [experts.input, router_rows, fc[1][0], fc[1][1], None, fc[2][0], fc[2][1], None, None, None, None,
         fc[1][2], fc[2][2], None, router_weights],
        {**attributes, "expert_weight_bits": 4, "block_size": block, "accuracy_level": facts.int4_accuracy,
         "weights_prepacked": 0},  # raw layout, as written here (the default lets the provider assume its own)
        name=f"layers.{experts.layer}/mlp/QMoE", domain=MS_DOMAIN,
    )
    return out


FUSION = Fusion(NAME, lambda facts: len(facts.model.sparse_layers), find, check, build)
