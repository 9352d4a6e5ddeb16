"""How far int4 graphs move the logits, on the tiny seeded checkpoints the tests use (CPU, fp32).

For each case: the last-token logits of a 14-token prompt from a graph of the artifact, against
transformers fp32 holding (a) the float checkpoint and (b) the weights the checkpoint's int4 codes
stand for; printed as max |difference| / max |logit|. AWQ and GPTQ checkpoints are exact by
construction, so (b) is the graph's own error; `--quantize int4` is measured against both.
Random weights have no structure for int4 to keep, so (a) is far worse than on a trained model:
read it as an upper bound of the rounding, not as a quality figure.

    python tools/int4_error.py --workdir /tmp/int4-error
"""

from __future__ import annotations

import argparse
import json
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
    feeds = {"input_ids": IDS, "attention_mask": np.ones_like(IDS), "position_ids": np.arange(IDS.shape[1])[None],
             "total_sequence_length": np.array(IDS.shape[1], np.int32)}
    for name in contract.kv_names(model.num_hidden_layers, contract.PAST):
        feeds[name] = np.zeros((1, model.num_key_value_heads, 0, model.head_dim), np.float32)
    wanted = {i.name for i in session.get_inputs()}
    logits = session.run([contract.LOGITS], {k: v for k, v in feeds.items() if k in wanted})[0]
    return logits[0, -1]


def reference_logits(config: dict, weights: dict[str, torch.Tensor]) -> np.ndarray:
    config = {k: v for k, v in config.items() if k != "quantization_config"}
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**config, attn_implementation="eager")).float().eval()
    model.load_state_dict(weights, strict=False)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True)
    args = parser.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    float_checkpoint = args.workdir / "float"
    write_checkpoint(float_checkpoint, tiny_config("sliding_window"), seed=0, dtype=torch.float16)
    from safetensors.torch import load_file

    float_weights = {k: v.float() for k, v in load_file(float_checkpoint / "model.safetensors").items()}
    config = json.loads((float_checkpoint / "config.json").read_text())
    cases = [("awq", None, False), ("gptq", None, False), ("rtn", 32, False), ("rtn", 32, True), ("rtn", 64, False)]
    print(f"{'case':<26}{'graph':<16}{'vs its int4 weights':>20}{'vs the float model':>20}")
    for method, block, symmetric in cases:
        name = f"{method}" + (f" block {block}" + (" symmetric" if symmetric else "") if block else "")
        folder = args.workdir / name.replace(" ", "-")
        if method == "rtn":
            artifact = export_checkpoint(float_checkpoint, folder / "artifact", quantize="int4", block_size=block, symmetric=symmetric)
            exact = reference_logits(config, {**float_weights, **stored_weights(artifact)})
            unquantized = reference_logits(config, float_weights)
        else:
            weights = write_int4_checkpoint(folder / "checkpoint", method, variant="sliding_window", group_size=32)
            artifact = export_checkpoint(folder / "checkpoint", folder / "artifact")
            exact, unquantized = reference_logits(config, weights), None
        for level in (1, 4):
            optimize_artifact(artifact, "cpu", int4_accuracy=level)
            for graph in (contract.PORTABLE_GRAPH, contract.optimized_graph_name("cpu")) if level == 1 else (contract.optimized_graph_name("cpu"),):
                ours = graph_logits(artifact, graph)
                label = graph if graph == contract.PORTABLE_GRAPH else f"cpu, level {level}"
                against_float = f"{relative(ours, unquantized):>20.2e}" if unquantized is not None else f"{'exact (construction)':>20}"
                print(f"{name:<26}{label:<16}{relative(ours, exact):>20.2e}{against_float}")


if __name__ == "__main__":
    main()
