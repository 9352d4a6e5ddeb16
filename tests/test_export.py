import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

import qwen2_export.export as export_module
from artifact.contract import sha256_of
from qwen2_export.checkpoint import list_tensors, load_model, read_chunks
from qwen2_export.config import load_config
from qwen2_export.export import ExportError, export_checkpoint
from qwen2_onnx.cli import main

from conftest import VARIANTS
from helpers import empty_cache, greedy, load_reference, open_session, prefill_and_decode, reference_greedy, run_step

ONNX_TOLERANCE = 1e-4  # fp32 onnxruntime CPU vs our torch model
FP16_LOGIT_TOLERANCE = 0.1  # fp16 graph vs fp32 torch; observed about 0.02 at logit scale 15


def run_onnx_steps(session, manifest, ids: np.ndarray, prefill: int) -> list[np.ndarray]:
    batch, total = ids.shape
    logits, cache = run_step(session, empty_cache(manifest, batch), ids[:, :prefill],
                             np.ones((batch, prefill), np.int64), np.tile(np.arange(prefill), (batch, 1)))
    steps = [logits]
    for position in range(prefill, total):
        logits, cache = run_step(session, cache, ids[:, position : position + 1],
                                 np.ones((batch, position + 1), np.int64), np.full((batch, 1), position, np.int64))
        steps.append(logits)
    return steps


@pytest.mark.parametrize("variant", VARIANTS)
def test_onnx_prefill_and_decode_match_torch(tiny_checkpoint, tiny_artifact, variant):
    folder = tiny_checkpoint(variant)
    config = load_config(folder)
    session, manifest = open_session(tiny_artifact(variant))
    ids = torch.randint(0, 456, (2, 12), generator=torch.Generator().manual_seed(5))
    expected = prefill_and_decode(load_model(folder, config), config, ids, prefill=9)
    for ours, reference in zip(run_onnx_steps(session, manifest, ids.numpy(), prefill=9), expected, strict=True):
        np.testing.assert_allclose(ours, reference.numpy(), rtol=0, atol=ONNX_TOLERANCE)


@pytest.mark.parametrize("variant", VARIANTS)
def test_24_greedy_onnx_tokens_equal_transformers(tiny_checkpoint, tiny_artifact, variant):
    prompt = [456, 40, 300, 17, 250, 99, 3]
    session, manifest = open_session(tiny_artifact(variant))
    tokens, rows = greedy(session, manifest, prompt, steps=24)
    assert tokens == reference_greedy(load_reference(tiny_checkpoint(variant)), prompt, steps=24)
    margins = [np.sort(row)[-1] - np.sort(row)[-2] for row in rows]
    assert min(margins) > 1e-3, "random weights too flat: greedy choices are near-ties"


def test_left_padded_batch_through_onnx(tiny_artifact):
    session, manifest = open_session(tiny_artifact("moe_shared"))
    long = np.array([[5, 80, 300, 41, 7, 99, 260, 12]])
    short = long[:, 3:]
    ids = np.concatenate([long, np.concatenate([np.zeros((1, 3), np.int64), short], 1)])
    mask = np.array([[1] * 8, [0] * 3 + [1] * 5])
    positions = np.clip(mask.cumsum(-1) - 1, 0, None)
    padded, _ = run_step(session, empty_cache(manifest, 2), ids, mask, positions)
    alone, _ = run_step(session, empty_cache(manifest, 1), short, np.ones((1, 5), np.int64), np.arange(5)[None])
    np.testing.assert_allclose(padded[1, 3:], alone[0], rtol=0, atol=ONNX_TOLERANCE)


@pytest.mark.parametrize("variant", ["dense_tied", "moe_mlp_only_norm"])
def test_fp16_export_on_onnxruntime_cpu(tiny_checkpoint, tiny_artifact, variant):
    """fp16 weights and activations (softmax and norm statistics in fp32) against the fp32 torch model."""
    folder = tiny_checkpoint(variant)
    config = load_config(folder)
    session, manifest = open_session(tiny_artifact(variant, "fp16"))
    assert manifest["dtype"] == "float16" and session.get_outputs()[0].type == "tensor(float)"  # logits stay fp32
    assert session.get_outputs()[1].type == "tensor(float16)"
    ids = torch.randint(0, 456, (2, 10), generator=torch.Generator().manual_seed(6))
    expected = prefill_and_decode(load_model(folder, config), config, ids, prefill=8)
    for ours, reference in zip(run_onnx_steps(session, manifest, ids.numpy(), prefill=8), expected, strict=True):
        np.testing.assert_allclose(ours.astype(np.float32), reference.numpy(), rtol=0, atol=FP16_LOGIT_TOLERANCE)


def initializer_bytes(artifact, name) -> tuple[bytes, list[int], str]:
    graph = onnx.load(str(artifact / "onnx/model.onnx"), load_external_data=False)
    (tensor,) = [t for t in graph.graph.initializer if t.name == name]
    where = {entry.key: entry.value for entry in tensor.external_data}
    with open(artifact / "onnx" / where["location"], "rb") as f:
        f.seek(int(where["offset"]))
        return f.read(int(where["length"])), list(tensor.dims), tensor.doc_string


@pytest.mark.parametrize("dtype, torch_dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_weights_in_the_data_file_are_the_checkpoint_cast(tiny_checkpoint, tiny_artifact, dtype, torch_dtype):
    """bf16 cannot run on onnxruntime CPU, so its artifact is checked byte for byte instead."""
    folder, artifact = tiny_checkpoint("dense_untied_sharded"), tiny_artifact("dense_untied_sharded", dtype)
    onnx.checker.check_model(str(artifact / "onnx/model.onnx"))
    for entry in list_tensors(folder):
        tensor = torch.cat([chunk for _, chunk in read_chunks(entry)]).view(entry.shape).to(torch_dtype)
        stored, dims, note = initializer_bytes(artifact, entry.name)
        if "transposed" in note:
            tensor = tensor.t()
        assert dims == list(tensor.shape), entry.name
        assert stored == tensor.contiguous().view(torch.uint8).numpy().tobytes(), entry.name


def test_portable_graph_uses_standard_onnx_ops_only(tiny_artifact):
    for variant in ("moe_shared", "sliding_window"):
        graph = onnx.load(str(tiny_artifact(variant) / "onnx/model.onnx"), load_external_data=False)
        assert {node.domain for node in graph.graph.node} <= {"", "ai.onnx"}
        assert {o.domain: o.version for o in graph.opset_import}.get("", 0) >= 23
        weight_transposes = [n for n in graph.graph.node if n.op_type == "Transpose" and n.input[0].endswith("proj.weight")]
        assert not weight_transposes, "2-D weights should be stored transposed, not transposed at load"


def test_artifact_is_self_describing(tiny_artifact):
    artifact = tiny_artifact("moe_mlp_only_norm")
    manifest = json.loads((artifact / "manifest.json").read_text())
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "onnx/model.onnx", "onnx/model.onnx_data"):
        assert (artifact / name).is_file(), name
    (graph,) = manifest["graphs"]
    for path, facts in graph["files"].items():
        assert sha256_of(artifact / path) == facts["sha256"] and (artifact / path).stat().st_size == facts["bytes"]
    model = manifest["model"]
    assert (model["num_hidden_layers"], model["num_key_value_heads"], model["head_dim"], model["vocab_size"]) == (3, 2, 16, 512)
    assert model["moe"]["sparse_layers"] == [0, 2] and model["moe"]["norm_topk_prob"] is True
    tokens = manifest["tokenizer"]
    assert tokens["special_tokens"] == {"<|endoftext|>": 456, "<|im_start|>": 457, "<|im_end|>": 458}
    assert tokens["stop_token_ids"] == [456, 458] and tokens["vocab_size"] == 459
    session, _ = open_session(artifact)
    assert [(i.name, i.shape) for i in session.get_inputs()] == [(s["name"], s["dims"]) for s in graph["inputs"]]
    assert [(o.name, o.shape) for o in session.get_outputs()] == [(s["name"], s["dims"]) for s in graph["outputs"]]


def test_yarn_facts_in_manifest_and_graph(tiny_checkpoint, tiny_artifact):
    artifact = tiny_artifact("yarn")
    rope = json.loads((artifact / "manifest.json").read_text())["rope"]
    assert rope["type"] == "yarn" and rope["factor"] == 4.0 and rope["original_max_position_embeddings"] == 64
    assert rope["attention_factor"] == pytest.approx(0.1 * np.log(4) + 1)
    stored, dims, _ = initializer_bytes(artifact, rope["inv_freq_initializer"])
    expected = load_model(tiny_checkpoint("yarn"), load_config(tiny_checkpoint("yarn"))).model.rotary_emb.inv_freq
    assert dims == [8] and np.array_equal(np.frombuffer(stored, np.float32), expected.numpy())


def test_existing_artifact_needs_force_and_force_replaces_only_artifacts(tiny_checkpoint, tmp_path):
    out = tmp_path / "artifact"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    for force in (False, True):  # a folder of the user's is never replaced
        with pytest.raises(ExportError, match="--force"):
            export_checkpoint(tiny_checkpoint("dense_tied"), out, force=force)
        assert (out / "keep.txt").read_text() == "mine"
    artifact = tmp_path / "ours"
    export_checkpoint(tiny_checkpoint("dense_tied"), artifact)
    (artifact / "stale.txt").write_text("old export")
    export_checkpoint(tiny_checkpoint("dense_tied"), artifact, force=True)
    assert (artifact / "manifest.json").is_file() and not (artifact / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact", "ours"]


def test_interrupted_export_leaves_nothing(tiny_checkpoint, tmp_path, monkeypatch):
    """Interrupted while tracing, after the staging folder was made: it goes, nothing else is left."""
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(export_module, "trace_to_onnx", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_checkpoint(tiny_checkpoint("dense_tied"), tmp_path / "artifact")
    assert list(tmp_path.iterdir()) == []


def test_missing_tokenizer_and_bad_dtype(tiny_checkpoint, tmp_path):
    import shutil

    folder = shutil.copytree(tiny_checkpoint("dense_tied"), tmp_path / "ckpt")
    (folder / "tokenizer.json").unlink()
    with pytest.raises(Exception, match="tokenizer.json"):
        export_checkpoint(folder, tmp_path / "out")
    with pytest.raises(ExportError, match="fp16"):
        export_checkpoint(tiny_checkpoint("dense_tied"), tmp_path / "out", dtype="int8")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_cli_reports_errors_with_exit_code_2(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    assert main(["export", str(tmp_path), "-o", str(tmp_path / "out")]) == 2
    assert "architectures" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_command_reports_a_bad_artifact_in_one_line(tmp_path):
    """The module entry point, in a process of its own (CI also runs the installed wheel's console script
    from another folder, export and generate included: .ci/run)."""
    result = subprocess.run([sys.executable, "-m", "qwen2_onnx", "inspect", str(tmp_path)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and result.stderr.startswith("qwen2-onnx inspect: error: ")
    assert len(result.stderr.strip().splitlines()) == 1 and "manifest.json not found" in result.stderr


def test_a_reader_that_stops_reading_is_not_an_error(tiny_artifact):
    """`qwen2-onnx inspect ARTIFACT | head -3` under pipefail (as .ci/run runs it): the pipe closed before
    the report is written gives status 0 and nothing on stderr."""
    process = subprocess.Popen([sys.executable, "-m", "qwen2_onnx", "inspect", str(tiny_artifact("dense_tied"))],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()  # before the first line is written
    assert process.wait(120) == 0
    assert process.stderr.read() == b""
