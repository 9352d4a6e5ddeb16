"""What other hosts read from an artifact, derived from the manifest (docs: hosts.md, as tried here), so that
the folder is their model as it is: onnxruntime-genai's genai_config.json, and transformers.js's block in
config.json. Both drive the portable graph: it takes the growing cache they feed, and the optimized graphs
read `total_sequence_length`, an input neither feeds.

onnxruntime-genai: `og.Model(ARTIFACT)`. Its parser refuses keys it does not know and model types it does not list (`qwen2` serves
Qwen2-MoE too); it feeds a cache that grows by concatenation, which is the portable graph's contract
(`past_present_share_buffer` false); the ids and search defaults come from generation_config.json.

transformers.js: `AutoModelForCausalLM.from_pretrained(ARTIFACT)`. config.json gains "transformers.js_config":
which file, and that its weights are in one external-data file (the browser cannot find it otherwise).
Standard library only, like contract.py.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from . import contract

MODEL_TYPE = "qwen2"


def genai_config(manifest: contract.Manifest, generation: dict[str, Any]) -> dict[str, Any]:
    """genai_config.json for the portable graph: sizes and names from the manifest, the special ids and
    search defaults from generation_config.json (the tokenizer's ids where it has none)."""
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
                "filename": contract.graph_file(),
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
            "past_present_share_buffer": False,
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
    """Write genai_config.json and config.json's transformers.js block into `artifact` (a finished export:
    its generation_config.json, if any, is read from there); the manifest returned records both files."""
    generation_path = artifact / contract.GENERATION_CONFIG_FILE
    generation = json.loads(generation_path.read_text()) if generation_path.is_file() else {}
    genai_path = artifact / contract.GENAI_CONFIG_FILE
    genai_path.write_text(json.dumps(genai_config(manifest, generation), indent=2) + "\n")
    config_path = artifact / contract.CONFIG_FILE
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, TRANSFORMERS_JS_KEY: transformers_js_config()}, indent=2) + "\n")
    records = {path.name: contract.FileRecord.of(path) for path in (genai_path, config_path)}
    return replace(manifest, files={**manifest.files, **records})
