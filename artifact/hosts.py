"""What other hosts read from an artifact, derived from the manifest (docs: hosts.md, as tried here), so that
the folder is their model as it is: onnxruntime-genai's genai_config.json (and one overlay per graph), and
transformers.js's block in config.json.

onnxruntime-genai: `og.Model(ARTIFACT)` runs on the CPU: the CPU-optimized graph when the artifact has one,
else the portable graph. Any other graph: `config = og.Config(ARTIFACT)`, `config.overlay(<genai/NAME.json>)`,
`og.Model(config)`. The device is genai's API's to choose (`config.clear_providers()`,
`config.append_provider("cuda")`, `config.set_provider_option("cuda", "enable_cuda_graph", "1")`): in 0.18
an overlay's provider list neither adds nor removes a provider (the CUDA graph overlaid with one ran on
the CPU, on an H200), so no file names one. Its parser refuses keys it does not know and
model types it does not list (`qwen2` serves Qwen2-MoE too). It feeds a cache that grows by concatenation
to the portable graph (`past_present_share_buffer` false) and one shared buffer to the optimized graphs,
which compute their total length from the mask as genai's own builder does; the ids and search defaults
come from generation_config.json.

transformers.js: `AutoModelForCausalLM.from_pretrained(ARTIFACT)`. config.json gains "transformers.js_config":
which file, and that its weights are in one external-data file (the browser cannot find it otherwise).
Standard library only, like contract.py.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from . import contract

MODEL_TYPE = "qwen2"


def genai_default_graph(manifest: contract.Manifest) -> contract.GraphEntry:
    """The graph genai_config.json drives: the CPU-optimized one when there is one, else the portable one."""
    return manifest.graph(contract.optimized_graph_name("cpu")) or manifest.graph(contract.PORTABLE_GRAPH)


def genai_graph_settings(graph: contract.GraphEntry) -> dict[str, Any]:
    """What differs between graphs in genai's config, as an overlay: the file and the cache layout."""
    return {"model": {"decoder": {"filename": graph.file}},
            "search": {"past_present_share_buffer": graph.kv_layout == contract.SHARED_BUFFER}}


def genai_config(manifest: contract.Manifest, generation: dict[str, Any]) -> dict[str, Any]:
    """genai_config.json for genai_default_graph: sizes and names from the manifest, the special ids and
    search defaults from generation_config.json (the tokenizer's ids where it has none)."""
    graph = genai_default_graph(manifest)
    model, tokens = manifest.model, manifest.tokenizer
    eos = generation.get("eos_token_id", tokens.eos_token_id)
    eos = list(eos) if isinstance(eos, list) else [eos]
    pad = generation.get("pad_token_id", tokens.pad_token_id)
    past_key, past_value = (f"{contract.PAST}.%d.{kind}" for kind in ("key", "value"))
    present_key, present_value = (f"{contract.PRESENT}.%d.{kind}" for kind in ("key", "value"))
    return {
        "model": {
            "bos_token_id": generation.get("bos_token_id", tokens.bos_token_id if tokens.bos_token_id is not None else eos[0]),
            "eos_token_id": eos,
            "pad_token_id": eos[0] if pad is None else pad,
            "context_length": model.context_length,
            "vocab_size": model.vocab_size,
            "type": MODEL_TYPE,
            "decoder": {
                "filename": graph.file,
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "head_size": model.head_dim,
                "hidden_size": model.hidden_size,
                "num_attention_heads": model.num_attention_heads,
                "num_hidden_layers": model.num_hidden_layers,
                "num_key_value_heads": model.num_key_value_heads,
                "inputs": {"input_ids": contract.INPUT_IDS, "attention_mask": contract.ATTENTION_MASK,
                           "position_ids": contract.POSITION_IDS, "past_key_names": past_key,
                           "past_value_names": past_value},
                "outputs": {"logits": contract.LOGITS, "present_key_names": present_key,
                            "present_value_names": present_value},
            },
        },
        "search": {
            "do_sample": bool(generation.get("do_sample", False)),
            "max_length": model.context_length,
            "min_length": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": graph.kv_layout == contract.SHARED_BUFFER,
            "repetition_penalty": float(generation.get("repetition_penalty", 1.0)),
            "temperature": float(generation.get("temperature", 1.0)),
            "top_k": int(generation.get("top_k", 1) or 1),
            "top_p": float(generation.get("top_p", 1.0)),
        },
    }


TRANSFORMERS_JS_KEY = "transformers.js_config"


def transformers_js_config() -> dict[str, Any]:
    """dtype "fp32" names the file (onnx/model.onnx, no suffix) whatever the weights' type: transformers.js
    takes the cache's element type from the graph's inputs."""
    return {"dtype": "fp32", "use_external_data_format": {contract.graph_file().split("/")[-1]: 1}}


def write_host_configs(artifact: Path, manifest: contract.Manifest) -> contract.Manifest:
    """Write genai_config.json, an overlay per graph (contract.genai_overlay_file) and config.json's
    transformers.js block into `artifact`, whose generation_config.json, if any, is read from there; returns
    `manifest` recording them. Each file is written whole under a temporary name, then all are renamed."""
    generation_path = artifact / contract.GENERATION_CONFIG_FILE
    generation = json.loads(generation_path.read_text()) if generation_path.is_file() else {}
    config = json.loads((artifact / contract.CONFIG_FILE).read_text())
    if manifest.task != contract.TEXT_GENERATION:  # onnxruntime-genai generates text only; transformers.js's
        return manifest                             # block describes a generation graph's cache
    documents = {contract.GENAI_CONFIG_FILE: genai_config(manifest, generation),
                 contract.CONFIG_FILE: {**config, TRANSFORMERS_JS_KEY: transformers_js_config()},
                 **{contract.genai_overlay_file(graph.name): genai_graph_settings(graph) for graph in manifest.graphs}}
    partials = {}
    for name, document in documents.items():
        path = artifact / name
        path.parent.mkdir(exist_ok=True)
        partials[path] = path.with_name(path.name + ".partial")
        partials[path].write_text(json.dumps(document, indent=2) + "\n")
    for path, partial in partials.items():
        os.replace(partial, path)
    records = {name: contract.FileRecord.of(artifact / name) for name in documents}
    return replace(manifest, files={**manifest.files, **records})
