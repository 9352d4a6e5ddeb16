"""How far int4 graphs move the logits, on the tiny seeded checkpoints the tests use (CPU, fp32).

For each case: the last-token logits of a 14-token prompt from a graph of the artifact, against
transformers fp32 holding (b) the weights its int4 codes stand for (dequantized from the portable graph
by ONNX's rule; tests/test_int4.py checks that these are the AWQ and GPTQ checkpoints' own) and, for
`--quantize int4`, (a) the float checkpoint; printed as max |difference| / max |logit|.
Random weights have no structure for int4 to keep, so (a) is far worse than on a trained model:
read it as an upper bound of the rounding, not as a quality figure.

    python tools/int4_error.py --workdir /tmp/int4-error
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import transformers

from artifact import contract
from graphs.artifact import optimize_artifact
from qwen2_export.export import export_checkpoint
from qwen2_export.synthetic import tiny_config, write_checkpoint
from qwen2_export.synthetic_int4 import write_int4_checkpoint

IDS = np.random.default_rng(5).integers(0, 456, size=(1, 14))


def graph_logits(artifact: Path, graph: str) -> np.ndarray:
    manifest = contract.read_manifest(artifact)
    entry = manifest.graph(graph)
    options = ort.SessionOptions()
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")  # as runtime/session.py does
    session = ort.InferenceSession(str(artifact / entry.file), options, providers=["CPUExecutionProvider"])
    model = manifest.model
    feeds = {"input_ids": IDS, "attention_mask": np.ones_like(IDS), "position_ids": np.arange(IDS.shape[1])[None]}
    for name in contract.kv_names(model.num_hidden_layers, contract.PAST):
        feeds[name] = np.zeros((1, model.num_key_value_heads, 0, model.head_dim), np.float32)
    wanted = {i.name for i in session.get_inputs()}
    logits = session.run([contract.LOGITS], {k: v for k, v in feeds.items() if k in wanted})[0]
    return logits[0, -1]


def reference_logits(float_checkpoint: Path, weights: dict[str, torch.Tensor] | None = None) -> np.ndarray:
    """transformers fp32 on the float checkpoint, with `weights` (int4 ones, dequantized) put in its place."""
    model = transformers.AutoModelForCausalLM.from_pretrained(float_checkpoint, dtype=torch.float32,
                                                              attn_implementation="eager").eval()
    if weights:
        assert not model.load_state_dict(weights, strict=False).unexpected_keys
    with torch.no_grad():
        return model(torch.from_numpy(IDS)).logits[0, -1].numpy()


def stored_weights(artifact: Path) -> dict[str, torch.Tensor]:
    """The int4 weights as the portable graph holds them, dequantized by ONNX's rule, in transformers'
    layout: Linear weights [out, in] (stored [in, out]), expert stacks [E, out, in] as stored."""
    import onnx_ir as ir

    weights = {}
    for node in ir.load(artifact / contract.graph_file()).graph:
        if node.op_type == "DequantizeLinear":
            codes, scales, zeros = (list(node.inputs) + [None])[:3]
            block, axis = node.attributes["block_size"].value, node.attributes["axis"].value
            z = 0 if zeros is None else np.repeat(zeros.const_value.numpy().astype(np.float64), block, axis=axis)
            s = np.repeat(scales.const_value.numpy().astype(np.float64), block, axis=axis)
            weight = (codes.const_value.numpy().astype(np.float64) - z) * s
            weights[codes.name.removesuffix(".int4")] = torch.from_numpy((weight.T if weight.ndim == 2 else weight).astype(np.float32))
    return weights


def relative(ours: np.ndarray, reference: np.ndarray) -> float:
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


CASES = (  # (variant, method, block size, symmetric)
    ("sliding_window", "awq", 32, False), ("sliding_window", "gptq", 32, False), ("moe_shared", "gptq", 32, False),
    ("sliding_window", "rtn", 32, False), ("sliding_window", "rtn", 32, True), ("sliding_window", "rtn", 64, False),
    ("moe_shared", "rtn", 32, False),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True)
    args = parser.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    print(f"{'case':<42}{'graph':<16}{'vs its int4 weights':>20}{'vs the float model':>20}")
    for variant, method, block, symmetric in CASES:
        name = f"{variant} {method} block {block}" + (" symmetric" if symmetric else "")
        folder = args.workdir / name.replace(" ", "-")
        float_checkpoint = folder / "float"  # the same seed gives an int4 checkpoint its float tensors
        write_checkpoint(float_checkpoint, tiny_config(variant), seed=0, dtype=torch.float16)
        if method == "rtn":
            artifact = export_checkpoint(float_checkpoint, folder / "artifact", quantize="int4", block_size=block,
                                         symmetric=symmetric)
            unquantized = reference_logits(float_checkpoint)
        else:
            write_int4_checkpoint(folder / "checkpoint", method, variant=variant, group_size=block)
            artifact = export_checkpoint(folder / "checkpoint", folder / "artifact")
            unquantized = None  # the checkpoint is int4: there is no float model to compare with
        exact = reference_logits(float_checkpoint, stored_weights(artifact))
        for level in (1, 4):
            optimize_artifact(artifact, "cpu", int4_accuracy=level)
            graphs = (contract.PORTABLE_GRAPH, contract.optimized_graph_name("cpu")) if level == 1 else (contract.optimized_graph_name("cpu"),)
            for graph in graphs:
                ours = graph_logits(artifact, graph)
                label = graph if graph == contract.PORTABLE_GRAPH else f"cpu, level {level}"
                against_float = f"{relative(ours, unquantized):>20.2e}" if unquantized is not None else f"{'-':>20}"
                print(f"{name:<42}{label:<16}{relative(ours, exact):>20.2e}{against_float}")


if __name__ == "__main__":
    main()
