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
from graphs.fusions.int4_matmul import EXACT, INT8_ACTIVATIONS
from qwen2_export.errors import CheckpointError
from qwen2_export.export import export_checkpoint
from qwen2_export.int4 import awq_words_to_uint4, gptq_words_to_uint4, gptq_zeros_to_uint4, round_to_nearest
from qwen2_export.synthetic import tiny_config, write_checkpoint
from qwen2_export.synthetic_int4 import pack_awq, pack_columns, pack_rows, write_int4_checkpoint
from runtime import Model

from helpers import last_logits_per_step, load_reference, load_reference_model, open_session
from tools.int4_error import stored_weights

PROMPT = [1, 5, 9, 33, 100, 7, 250, 18]


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
    prompt = PROMPT
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


@pytest.fixture(scope="module", params=[EXACT, INT8_ACTIVATIONS])
def optimized(request, int4, tmp_path_factory) -> tuple[Path, Path, dict[str, torch.Tensor], int]:
    """An int4 artifact with its CPU graph at one MatMulNBits accuracy level."""
    checkpoint, artifact, weights = int4
    copy = Path(shutil.copytree(artifact, tmp_path_factory.mktemp("optimized") / "artifact"))
    optimize_artifact(copy, "cpu", int4_accuracy=request.param)
    return checkpoint, copy, weights, request.param


def test_the_cpu_graph_runs_packed_matmulnbits(optimized):
    _, artifact, _, level = optimized
    graph = onnx.load(str(artifact / "onnx/model_cpu.onnx"), load_external_data=False).graph
    nbits = [node for node in graph.node if node.op_type == "MatMulNBits"]
    # per layer: packed q/k/v, o_proj, packed gate/up, down_proj; lm_head and embeddings stay float
    assert len(nbits) == 2 * 4 and not [node for node in graph.node if node.op_type == "DequantizeLinear"]
    attributes = [{a.name: onnx.helper.get_attribute_value(a) for a in node.attribute} for node in nbits]
    assert {(a["bits"], a["block_size"], a["accuracy_level"]) for a in attributes} == {(4, 32, level)}
    assert sorted(a["N"] for a in attributes) == sorted([64 + 2 * 32, 64, 2 * 128, 64] * 2)


def test_the_cpu_graph_equals_the_dequantized_model(optimized):
    """Accuracy level 1: the float model's logits to rounding and its 32 greedy tokens. Level 4 (int8
    activations per block): logits within 3% of their range, every greedy token in the reference's top 3."""
    checkpoint, artifact, weights, level = optimized
    reference = reference_model(checkpoint, weights)
    session, manifest = open_session(artifact, graph=1)
    ids = np.random.default_rng(5).integers(0, 456, size=(1, 14))
    ours = np.stack(last_logits_per_step(session, manifest, ids, prefill=10))[:, 0]
    with torch.no_grad():
        expected = reference(torch.from_numpy(ids)).logits.numpy()[0, 9:]
    error = np.abs(ours - expected).max() / np.abs(expected).max()
    assert error <= (1e-5 if level == EXACT else 3e-2), error

    prompt = PROMPT
    model = Model.load(artifact)
    assert model.session.graph.name == contract.optimized_graph_name("cpu")
    tokens = model.generate(prompt, max_new_tokens=32, greedy=True, repetition_penalty=1.0, ignore_eos=True).output_ids
    with torch.no_grad():
        rows = reference(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1]
    rows = rows[:, : model.manifest.tokenizer.vocab_size]
    if level == EXACT:
        assert tokens == rows.argmax(-1).tolist()
    else:  # teacher-forced on our own tokens: each is among the reference's three best there
        assert all(token in top for token, top in zip(tokens, rows.topk(3).indices.tolist(), strict=True))


def test_a_missing_quantized_tensor_is_named(int4, tmp_path):
    from safetensors.torch import load_file, save_file

    checkpoint = Path(shutil.copytree(int4[0], tmp_path / "checkpoint"))
    tensors = load_file(checkpoint / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.scales"]
    save_file(tensors, checkpoint / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.layers.1.mlp.down_proj.weight"):
        export_checkpoint(checkpoint, tmp_path / "out")


def test_export_with_targets_writes_the_int4_graphs(int4, tmp_path, capsys):
    from qwen2_onnx.cli import main

    assert main(["export", str(int4[0]), "-o", str(tmp_path / "out"), "--target", "cpu", "--target", "cuda",
                 "--int4-accuracy-level", "1"]) == 0
    assert "MatMulNBits x14" in capsys.readouterr().err
    graphs = contract.read_manifest(tmp_path / "out").graphs
    assert [g.name for g in graphs] == [contract.PORTABLE_GRAPH, "optimized-cpu", "optimized-cuda"]
    assert main(["inspect", str(tmp_path / "out")]) == 0
    method = contract.read_manifest(tmp_path / "out").quantization.method
    assert f"int4 weights ({method}, blocks of 32, zero points): self_attn.q_proj" in capsys.readouterr().out


# ---- --quantize int4: round to nearest while streaming ----
@pytest.mark.parametrize("symmetric", [False, True])
def test_round_to_nearest_is_within_half_a_step(symmetric):
    weight = torch.randn(6, 64) * torch.linspace(0.1, 3, 64)
    weight[0, :32] = 0  # an all-zero block keeps its zeros
    band = round_to_nearest(weight.to(torch.float16), 32, symmetric, torch.float16)
    scales = band.scales.float().repeat_interleave(32, dim=1)
    zeros = 0 if symmetric else torch.from_numpy(band.zeros).float().repeat_interleave(32, dim=1)
    codes = torch.from_numpy(band.codes.astype(np.float32))
    assert codes.min() >= (-8 if symmetric else 0) and codes.max() <= (7 if symmetric else 15)
    error = (weight.half().float() - (codes - zeros) * scales).abs()
    # symmetric: the block's largest magnitude is exact at -8; its opposite, at +8, is clipped to 7 (one step)
    assert (error <= scales.abs() * (1.0 if symmetric else 0.5) + 1e-3).all()
    assert error[0, :32].max() == 0


@pytest.fixture(scope="module", params=[("sliding_window", 32, False), ("sliding_window", 16, True),
                                        ("moe_shared", 16, False), ("moe_mlp_only_norm", 32, True)],
                ids=["block32", "block16-symmetric", "moe-block16", "moe-norm-block32-symmetric"])
def rtn(request, tmp_path_factory) -> tuple[Path, Path]:
    """A float fp16 checkpoint and its --quantize int4 export with an exact CPU graph (MoE: QMoE experts)."""
    folder = tmp_path_factory.mktemp("rtn")
    variant, block, symmetric = request.param
    write_checkpoint(folder / "checkpoint", tiny_config(variant), seed=0, dtype=torch.float16)
    artifact = export_checkpoint(folder / "checkpoint", folder / "artifact", quantize="int4", block_size=block,
                                 symmetric=symmetric)
    optimize_artifact(artifact, "cpu", int4_accuracy=EXACT)
    return folder / "checkpoint", artifact


def test_rtn_graphs_compute_exactly_the_codes_they_hold(rtn):
    """Both graphs against transformers holding the weights dequantized from the stored codes."""
    checkpoint, artifact = rtn
    manifest = contract.read_manifest(artifact)
    assert (manifest.quantization.method, manifest.quantization.group_size) in {("rtn", 32), ("rtn", 16)}
    reference = load_reference(checkpoint)
    stored = stored_weights(artifact)
    layers, moe = manifest.model.num_hidden_layers, manifest.model.moe
    # every layer: 4 attention + 3 MLP or shared-expert projections; a sparse layer also 2 expert stacks
    assert len(stored) == 7 * layers + (2 * len(moe.sparse_layers) if moe else 0)
    assert not reference.load_state_dict(stored, strict=False).unexpected_keys
    if moe:
        ops = [node.op_type for node in onnx.load(str(artifact / "onnx/model_cpu.onnx"), load_external_data=False).graph.node]
        assert ops.count("QMoE") == len(moe.sparse_layers) and "MoE" not in ops
        # CUDA QMoE's weight tiles span 64 inputs; these experts are 32 wide: refused, with the way out
        with pytest.raises(GraphError, match="multiples of 64"):
            optimize_artifact(artifact, "cuda")
    ids = np.random.default_rng(6).integers(0, 456, size=(1, 14))
    with torch.no_grad():
        expected = reference(torch.from_numpy(ids)).logits.numpy()[0, 9:]
    for graph in (0, 1):
        session, raw = open_session(artifact, graph=graph)
        ours = np.stack(last_logits_per_step(session, raw, ids, prefill=10))[:, 0]
        assert np.abs(ours - expected).max() <= 1e-5 * np.abs(expected).max()


def greedy_and_reference_rows(artifact: Path, reference, new_tokens: int) -> tuple[list[int], torch.Tensor]:
    """Our greedy tokens after a fixed prompt, and the reference's logits rows that predicted each."""
    model = Model.load(artifact)
    tokens = model.generate(PROMPT, max_new_tokens=new_tokens, greedy=True, repetition_penalty=1.0, ignore_eos=True).output_ids
    with torch.no_grad():
        rows = reference(torch.tensor([PROMPT + tokens])).logits[0, len(PROMPT) - 1 : -1, : model.manifest.tokenizer.vocab_size]
    return tokens, rows


def test_rtn_greedy_tokens_stay_in_the_float_models_top3(rtn):
    """Against the unquantized checkpoint, 32 greedy tokens teacher-forced: each among the float model's
    three best (MoE: 29 of 32, the rest in its best 8: int4 hidden states flip near-tied routing on random
    weights); the logits error (int4 on random weights) is bounded, not zero."""
    checkpoint, artifact = rtn
    tokens, rows = greedy_and_reference_rows(artifact, load_reference(checkpoint), 32)
    ranks = [int((row > row[token]).sum()) for row, token in zip(rows, tokens, strict=True)]
    if contract.read_manifest(artifact).model.moe is None:
        assert max(ranks) < 3, ranks
    else:
        assert sum(rank < 3 for rank in ranks) >= 29 and max(ranks) < 8, ranks
    ours = np.stack(last_logits_per_step(*open_session(artifact, graph=1), np.array([PROMPT + tokens]), prefill=8))[:, 0]
    error = np.abs(ours[:-1, : rows.shape[1]] - rows.numpy()).max() / rows.abs().max().item()
    assert 0 < error < 0.3, error


@pytest.mark.parametrize("case, message", [
    ("awq", "already AWQ int4"),
    ("block", "does not divide"),
])
def test_quantize_refusals_name_the_fix(case, message, int4, tmp_path):
    from qwen2_export.errors import ConfigError

    if case == "awq":
        checkpoint, block = int4[0], 32
        if "gptq" in str(checkpoint):
            message = "already GPTQ int4"
    else:
        checkpoint, block = tmp_path / "checkpoint", 256
        write_checkpoint(checkpoint, tiny_config("sliding_window"), seed=0)
    with pytest.raises(ConfigError, match=message):
        export_checkpoint(checkpoint, tmp_path / "out", quantize="int4", block_size=block)
    assert not (tmp_path / "out").exists()


# ---- GPTQ-Int4 Qwen2-MoE (as Qwen publishes Qwen2-57B-A14B-Instruct-GPTQ-Int4) ----
@pytest.fixture(scope="module", params=["moe_shared", "moe_mlp_only_norm"])
def gptq_moe(request, tmp_path_factory) -> tuple[Path, Path]:
    """(the GPTQ MoE export with an exact CPU graph, a float checkpoint holding its dequantized weights)."""
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("gptq-moe")
    weights = write_int4_checkpoint(folder / "checkpoint", "gptq", variant=request.param, group_size=32)
    reference = Path(shutil.copytree(folder / "checkpoint", folder / "reference"))
    save_file({name: tensor.contiguous() for name, tensor in weights.items()}, reference / "model.safetensors",
              metadata={"format": "pt"})
    config = json.loads((reference / "config.json").read_text())
    config.pop("quantization_config")
    (reference / "config.json").write_text(json.dumps(config))
    artifact = export_checkpoint(folder / "checkpoint", folder / "artifact")
    optimize_artifact(artifact, "cpu", int4_accuracy=EXACT)
    return artifact, reference


def test_gptq_moe_experts_are_repacked_into_qmoe_exactly(gptq_moe):
    """Experts and shared expert int4 (each expert's codes re-laid as rows of the stacks), router and
    shared-expert gate float: both graphs equal transformers on the dequantized weights, logits and 32
    greedy tokens, in both routing modes."""
    artifact, reference_checkpoint = gptq_moe
    graph = onnx.load(str(artifact / "onnx/model_cpu.onnx"), load_external_data=False).graph
    moe = contract.read_manifest(artifact).model.moe
    assert [node.op_type for node in graph.node].count("QMoE") == len(moe.sparse_layers)
    reference = load_reference(reference_checkpoint)
    ids = np.random.default_rng(7).integers(0, 456, size=(1, 14))
    with torch.no_grad():
        expected = reference(torch.from_numpy(ids)).logits.numpy()[0, 9:]
    for number in (0, 1):
        ours = np.stack(last_logits_per_step(*open_session(artifact, graph=number), ids, prefill=10))[:, 0]
        assert np.abs(ours - expected).max() <= 1e-5 * np.abs(expected).max()
    tokens, rows = greedy_and_reference_rows(artifact, reference, 32)
    assert tokens == rows.argmax(-1).tolist()


def test_awq_moe_is_refused_with_the_way_out(tmp_path):
    from qwen2_export.errors import ConfigError

    with pytest.raises(ConfigError, match="AWQ checkpoints of Qwen2MoeForCausalLM are not supported"):
        write_int4_checkpoint(tmp_path / "checkpoint", "awq", variant="moe_shared", group_size=32)


def test_cuda_qmoe_limits_are_refused_with_the_reason(gptq_moe):
    """onnxruntime's CUDA QMoE (one H200, tools/gpu_notes.md session 10): 64-wide weight tiles, blocks of
    32 or more, zero points only with an even number of blocks a row; anything else is refused by name."""
    from dataclasses import replace

    from graphs.fusions.moe import cuda_qmoe_refusal

    manifest = contract.read_manifest(gptq_moe[0])
    model, quant = manifest.model, manifest.quantization

    def refusal(hidden=256, width=128, block=64, symmetric=False):
        wider = replace(model, hidden_size=hidden, moe=replace(model.moe, moe_intermediate_size=width))
        return cuda_qmoe_refusal(replace(manifest, model=wider, quantization=replace(quant, group_size=block, symmetric=symmetric)))

    assert refusal() is None and refusal(block=128, symmetric=True) is None
    assert "multiples of 64" in refusal(hidden=64, width=32)  # this fixture's own shapes
    assert "multiples of 64" in refusal(width=96)
    assert "blocks of 32 or more" in refusal(block=16, symmetric=True)
    assert "even number of 128-blocks" in refusal(hidden=384, block=128)
    assert refusal(hidden=384, block=128, symmetric=True) is None
    assert cuda_qmoe_refusal(replace(manifest, quantization=None)) is None


def test_a_random_gptq_checkpoint_streams_and_exports_exactly(tmp_path):
    """The writer the whole-57B run uses (random codes, no float model) makes a checkpoint our export takes;
    the CPU graph equals transformers holding the weights its codes stand for, 16 greedy tokens."""
    from qwen2_export.synthetic_int4 import write_random_gptq_checkpoint

    config = {**tiny_config("moe_shared"), "moe_intermediate_size": 64, "shared_expert_intermediate_size": 128}
    checkpoint = write_random_gptq_checkpoint(tmp_path / "checkpoint", config, group_size=32, shards=2)
    assert (checkpoint / "model.safetensors.index.json").is_file()
    artifact = export_checkpoint(checkpoint, tmp_path / "artifact")
    optimize_artifact(artifact, "cpu", int4_accuracy=EXACT)
    reference = load_reference_model(checkpoint, stored_weights(artifact))
    tokens, rows = greedy_and_reference_rows(artifact, reference, 16)
    assert tokens == rows.argmax(-1).tolist()


def test_the_space_check_counts_int4_weights_as_stored(rtn):
    """Export refuses a disk too small for the artifact before any work; for int4 it must count half a
    byte a weight (a 57B-A14B GPTQ export was refused asking for 117 GB, 3.7x its 31.5 GB)."""
    from qwen2_export.config import load_config
    from qwen2_export.config import round_to_nearest as quantized_config
    from qwen2_export.export import weight_bytes
    from qwen2_export.model import build_model

    checkpoint, artifact = rtn
    quant = contract.read_manifest(artifact).quantization
    config = quantized_config(load_config(checkpoint), quant.group_size, quant.symmetric)
    estimate = weight_bytes(dict(build_model(config, torch.float32, "meta").named_parameters()), config)
    stored = (artifact / "onnx" / contract.data_file()).stat().st_size
    assert 0.95 * stored <= estimate <= 1.3 * stored, (estimate, stored)
