import json
import pickle
import shutil

import pytest
import torch

from qwen2_export.checkpoint import CheckpointError, list_tensors, load_model, read_chunks
from qwen2_export.config import load_config
from qwen2_export.synthetic import write_checkpoint, tiny_config


def copy_checkpoint(source, destination):
    shutil.copytree(source, destination)
    return destination


def test_every_tensor_is_consumed_and_expert_slices_land_in_place(tiny_checkpoint):
    folder = tiny_checkpoint("moe_shared")
    model = load_model(folder, load_config(folder))
    entries = {e.name: e for e in list_tensors(folder)}

    def tensor(name):
        entry = entries[name]
        return torch.cat([chunk for _, chunk in read_chunks(entry)]).view(entry.shape)

    experts = model.model.layers[1].mlp.experts
    intermediate = experts.down_proj.shape[-1]
    torch.testing.assert_close(experts.gate_up_proj[5, :intermediate], tensor("model.layers.1.mlp.experts.5.gate_proj.weight"))
    torch.testing.assert_close(experts.gate_up_proj[5, intermediate:], tensor("model.layers.1.mlp.experts.5.up_proj.weight"))
    torch.testing.assert_close(experts.down_proj[7], tensor("model.layers.1.mlp.experts.7.down_proj.weight"))


def test_chunked_reads_reassemble_the_tensor(tiny_checkpoint):
    entry = max(list_tensors(tiny_checkpoint("dense_tied")), key=lambda e: e.numel)
    whole = torch.cat([chunk for _, chunk in read_chunks(entry)])
    pieces = list(read_chunks(entry, chunk_bytes=1000))
    assert len(pieces) > 1 and [offset for offset, _ in pieces][1] == 250
    torch.testing.assert_close(torch.cat([chunk for _, chunk in pieces]), whole)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_sources_load_and_cast(tmp_path, dtype):
    half = write_checkpoint(tmp_path / "half", tiny_config("dense_tied"), dtype=dtype)
    full = write_checkpoint(tmp_path / "full", tiny_config("dense_tied"), dtype=torch.float32)
    config = load_config(full)
    ours = load_model(half, config).state_dict()
    expected = load_model(full, config).state_dict()
    for name, value in expected.items():
        torch.testing.assert_close(ours[name], value.to(dtype).float(), rtol=0, atol=0)


def test_missing_shard_is_named(tiny_checkpoint, tmp_path):
    folder = copy_checkpoint(tiny_checkpoint("dense_untied_sharded"), tmp_path / "ckpt")
    (folder / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model-00002-of-00003\.safetensors"):
        list_tensors(folder)


def test_missing_tensor_and_unknown_tensor_are_listed(tiny_checkpoint, tmp_path):
    folder = tiny_checkpoint("dense_untied_sharded")
    config = load_config(folder)
    bigger = json.loads((folder / "config.json").read_text())
    with pytest.raises(CheckpointError, match=r"parameters missing from the checkpoint: model\.layers\.3\."):
        load_model(folder, load_config_from(tmp_path / "bigger", {**bigger, "num_hidden_layers": 4}))
    with pytest.raises(CheckpointError, match=r"not used by Qwen2ForCausalLM: model\.layers\.2\."):
        load_model(folder, load_config_from(tmp_path / "smaller", {**bigger, "num_hidden_layers": 2}))
    with pytest.raises(CheckpointError, match="shape disagrees"):
        load_model(folder, load_config_from(tmp_path / "wider", {**bigger, "intermediate_size": 96}))
    assert load_model(folder, config) is not None


def load_config_from(folder, config_json):
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config_json))
    return load_config(folder)


def test_pickle_weights_are_refused_and_never_unpickled(tmp_path, monkeypatch):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(tiny_config("dense_tied")))
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"x": 1}))
    unpickled = []
    monkeypatch.setattr(pickle, "load", lambda *a, **k: unpickled.append(a))
    monkeypatch.setattr(torch, "load", lambda *a, **k: unpickled.append(a))
    with pytest.raises(CheckpointError, match="pickle weights"):
        list_tensors(folder)
    assert not unpickled


def test_no_weights_and_corrupt_files(tmp_path, tiny_checkpoint):
    with pytest.raises(CheckpointError, match="no weights"):
        list_tensors(tmp_path)
    folder = copy_checkpoint(tiny_checkpoint("dense_tied"), tmp_path / "cut")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        list_tensors(folder)
    (folder / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(CheckpointError, match="weight_map"):
        list_tensors(folder)
