"""AWQ checkpoints: the int4 codes repacked bit for bit into a standard-ONNX portable graph, which equals a
float model holding the dequantized weights (transformers, fp32) in logits and greedy tokens."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from artifact import contract
from graphs.artifact import optimize_artifact
from graphs.errors import GraphError
from qwen2_export.errors import CheckpointError
from qwen2_export.export import export_checkpoint
from qwen2_export.int4 import awq_words_to_uint4
from qwen2_export.synthetic_awq import pack_awq, write_awq_checkpoint
from runtime import Model


@pytest.fixture(scope="module")
def awq(tmp_path_factory) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """(checkpoint, artifact, the float state dict equal to the checkpoint)."""
    folder = tmp_path_factory.mktemp("awq")
    reference = write_awq_checkpoint(folder / "checkpoint", variant="sliding_window", group_size=32)  # untied: varied tokens
    return folder / "checkpoint", export_checkpoint(folder / "checkpoint", folder / "artifact"), reference


def reference_model(checkpoint: Path, weights: dict[str, torch.Tensor]):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = json.loads((checkpoint / "config.json").read_text())
    config.pop("quantization_config")
    model = Qwen2ForCausalLM(Qwen2Config(**config)).float().eval()
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not missing and not unexpected
    return model


def test_repacking_awq_words_gives_onnx_uint4_in_natural_order():
    codes = torch.randint(0, 16, (6, 32))
    expected = (codes[:, 0::2] | codes[:, 1::2] << 4).to(torch.uint8).numpy().tobytes()  # low nibble first
    assert awq_words_to_uint4(pack_awq(codes)) == expected


def test_the_portable_graph_holds_the_codes_as_standard_onnx(awq):
    _, artifact, _ = awq
    graph = onnx.load(str(artifact / "onnx/model.onnx"), load_external_data=False).graph
    dequantize = [node for node in graph.node if node.op_type == "DequantizeLinear"]
    assert len(dequantize) == 7 * 2 and all(node.domain in ("", "ai.onnx") for node in graph.node)
    codes = {init.name: init.data_type for init in graph.initializer if init.name.endswith((".int4", ".zero_points"))}
    assert len(codes) == 2 * len(dequantize) and set(codes.values()) == {onnx.TensorProto.UINT4}
    manifest = contract.read_manifest(artifact)
    assert manifest.quantization == contract.QuantFacts("awq", 4, 32)


def test_greedy_tokens_equal_the_dequantized_model(awq):
    checkpoint, artifact, weights = awq
    prompt = [1, 5, 9, 33, 100, 7, 250, 18]
    ours = Model.load(artifact).generate(prompt, max_new_tokens=16, greedy=True, repetition_penalty=1.0, ignore_eos=True)
    with torch.no_grad():
        expected = reference_model(checkpoint, weights).generate(
            torch.tensor([prompt]), max_new_tokens=16, do_sample=False, repetition_penalty=1.0, eos_token_id=None,
            pad_token_id=0)[0, len(prompt):]
    assert ours.output_ids == expected.tolist()


@pytest.mark.parametrize("optimize", [True, False])
def test_logits_equal_the_dequantized_model_fused_or_not(awq, optimize):
    """onnxruntime's own optimizations turn DequantizeLinear + MatMul into MatMulNBits; the runtime's
    session settings keep its activations in float, so the logits stay those of the float model."""
    checkpoint, artifact, weights = awq
    ids = np.array([[1, 5, 9, 33, 100, 7]])
    model = Model.load(artifact, optimize=optimize)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(6)[None]}
    feeds.update({name: np.zeros((1, 2, 0, 16), np.float32) for name in model.session.graph.input_names
                  if name.startswith(contract.PAST)})
    ours = model.session.session.run([contract.LOGITS], feeds)[0]
    with torch.no_grad():
        expected = reference_model(checkpoint, weights)(torch.from_numpy(ids)).logits.numpy()
    assert np.abs(ours - expected).max() <= 1e-4 * np.abs(expected).max()


def test_optimize_refuses_int4_artifacts_with_the_way_out(awq, tmp_path):
    artifact = Path(shutil.copytree(awq[1], tmp_path / "artifact"))
    with pytest.raises(GraphError, match="portable graph"):
        optimize_artifact(artifact, "cpu")


def test_a_missing_quantized_tensor_is_named(awq, tmp_path):
    from safetensors.torch import load_file, save_file

    checkpoint = Path(shutil.copytree(awq[0], tmp_path / "checkpoint"))
    tensors = load_file(checkpoint / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.qzeros"]
    save_file(tensors, checkpoint / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.layers.1.mlp.down_proj.weight"):
        export_checkpoint(checkpoint, tmp_path / "out")


def test_export_with_targets_says_int4_has_only_the_portable_graph(awq, tmp_path, capsys):
    from qwen2_onnx.cli import main

    assert main(["export", str(awq[0]), "-o", str(tmp_path / "out"), "--target", "cpu"]) == 0
    assert "only the portable graph" in capsys.readouterr().err
    assert [g.name for g in contract.read_manifest(tmp_path / "out").graphs] == [contract.PORTABLE_GRAPH]
