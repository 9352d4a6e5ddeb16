"""AWQ and GPTQ checkpoints: the int4 codes repacked bit for bit into a standard-ONNX portable graph, which
equals a float model holding the dequantized weights (transformers, fp32) in logits and greedy tokens."""

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
from qwen2_export.int4 import awq_words_to_uint4, gptq_words_to_uint4, gptq_zeros_to_uint4
from qwen2_export.synthetic_int4 import pack_awq, pack_columns, pack_rows, write_int4_checkpoint
from runtime import Model


@pytest.fixture(scope="module", params=["awq", "gptq"])
def int4(request, tmp_path_factory) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """(checkpoint, artifact, the float state dict equal to the checkpoint), untied so greedy tokens vary."""
    folder = tmp_path_factory.mktemp(request.param)
    reference = write_int4_checkpoint(folder / "checkpoint", request.param, variant="sliding_window", group_size=32)
    return folder / "checkpoint", export_checkpoint(folder / "checkpoint", folder / "artifact"), reference


def reference_model(checkpoint: Path, weights: dict[str, torch.Tensor]):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = json.loads((checkpoint / "config.json").read_text())
    config.pop("quantization_config")
    model = Qwen2ForCausalLM(Qwen2Config(**config, attn_implementation="eager")).float().eval()  # as tests/helpers.py
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not missing and not unexpected
    return model


def onnx_uint4(codes: torch.Tensor) -> bytes:
    """Codes [R, N] as ONNX packs uint4: row-major, two per byte, the lower index in the low nibble."""
    return (codes[:, 0::2] | codes[:, 1::2] << 4).to(torch.uint8).numpy().tobytes()


def test_repacking_gives_onnx_uint4_in_natural_order():
    codes = torch.randint(0, 16, (16, 32))
    assert awq_words_to_uint4(pack_awq(codes)) == onnx_uint4(codes)
    assert gptq_words_to_uint4(pack_rows(codes), 32) == onnx_uint4(codes)
    zeros = torch.randint(0, 15, (2, 32))  # GPTQ stores z - 1; z = 16 cannot be carried
    assert gptq_zeros_to_uint4(pack_columns(zeros), "qzeros") == onnx_uint4(zeros + 1)
    with pytest.raises(CheckpointError, match="zero point of 16"):
        gptq_zeros_to_uint4(pack_columns(torch.full((2, 32), 15)), "qzeros")


def test_the_portable_graph_holds_the_codes_as_standard_onnx(int4):
    _, artifact, _ = int4
    graph = onnx.load(str(artifact / "onnx/model.onnx"), load_external_data=False).graph
    dequantize = [node for node in graph.node if node.op_type == "DequantizeLinear"]
    assert len(dequantize) == 7 * 2 and all(node.domain in ("", "ai.onnx") for node in graph.node)
    # identical zero points (GPTQ's are all 8) may be stored once: onnxscript deduplicates small initializers
    types = {init.name: init.data_type for init in graph.initializer}
    assert all(types[node.input[0]] == types[node.input[2]] == onnx.TensorProto.UINT4 for node in dequantize)
    assert len({node.input[0] for node in dequantize}) == len(dequantize)
    manifest = contract.read_manifest(artifact)
    assert manifest.quantization.bits == 4 and manifest.quantization.group_size == 32


def test_greedy_tokens_equal_the_dequantized_model(int4):
    checkpoint, artifact, weights = int4
    prompt = [1, 5, 9, 33, 100, 7, 250, 18]
    model = Model.load(artifact)
    ours = model.generate(prompt, max_new_tokens=16, greedy=True, repetition_penalty=1.0, ignore_eos=True)
    reference = reference_model(checkpoint, weights)
    vocab = model.manifest.tokenizer.vocab_size  # the runtime never picks the embedding's padding rows
    with torch.no_grad():
        expected = reference.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, repetition_penalty=1.0,
                                      eos_token_id=None, pad_token_id=0,
                                      suppress_tokens=list(range(vocab, reference.config.vocab_size)))[0, len(prompt):]
    assert ours.output_ids == expected.tolist()


@pytest.mark.parametrize("optimize", [True, False])
def test_logits_equal_the_dequantized_model_fused_or_not(int4, optimize):
    """onnxruntime's own optimizations turn DequantizeLinear + MatMul into MatMulNBits; the runtime's
    session settings keep its activations in float, so the logits stay those of the float model."""
    checkpoint, artifact, weights = int4
    ids = np.array([[1, 5, 9, 33, 100, 7]])
    model = Model.load(artifact, optimize=optimize)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(6)[None]}
    feeds.update({name: np.zeros((1, 2, 0, 16), np.float32) for name in model.session.graph.input_names
                  if name.startswith(contract.PAST)})
    ours = model.session.session.run([contract.LOGITS], feeds)[0]
    with torch.no_grad():
        expected = reference_model(checkpoint, weights)(torch.from_numpy(ids)).logits.numpy()
    assert np.abs(ours - expected).max() <= 1e-4 * np.abs(expected).max()


def test_optimize_refuses_int4_artifacts_with_the_way_out(int4, tmp_path):
    artifact = Path(shutil.copytree(int4[1], tmp_path / "artifact"))
    with pytest.raises(GraphError, match="portable graph"):
        optimize_artifact(artifact, "cpu")


def test_a_missing_quantized_tensor_is_named(int4, tmp_path):
    from safetensors.torch import load_file, save_file

    checkpoint = Path(shutil.copytree(int4[0], tmp_path / "checkpoint"))
    tensors = load_file(checkpoint / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.scales"]
    save_file(tensors, checkpoint / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.layers.1.mlp.down_proj.weight"):
        export_checkpoint(checkpoint, tmp_path / "out")


def test_export_with_targets_says_int4_has_only_the_portable_graph(int4, tmp_path, capsys):
    from qwen2_onnx.cli import main

    assert main(["export", str(int4[0]), "-o", str(tmp_path / "out"), "--target", "cpu"]) == 0
    assert "only the portable graph" in capsys.readouterr().err
    assert [g.name for g in contract.read_manifest(tmp_path / "out").graphs] == [contract.PORTABLE_GRAPH]
