"""Reads an artifact's manifest.json: the only description of the graphs the runtime trusts."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import RuntimeInputError

FORMAT = "qwen2-onnx-artifact"
# names in the optimized graphs' contract (graphs/attention_inputs.py, graphs/fusions/token_candidates.py)
TOTAL_LENGTH_INPUT = "total_sequence_length"  # int32 scalar in host memory: the attention mask's width
CANDIDATE_OUTPUTS = ("top_logits", "top_ids")  # each row's K best logits and their ids
SUPPORTED_VERSIONS = (1,)


@dataclass(frozen=True)
class GraphInfo:
    """One graph of the artifact and the contract its session loop must follow."""

    name: str
    path: Path
    target: str
    kv_layout: str
    padding: str
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    activation_dtype: str | None = None  # KV and activations, when it differs from the artifact's dtype
    token_candidates: int = 0  # K of the top_logits / top_ids outputs (0: the graph has none)


@dataclass(frozen=True)
class Manifest:
    artifact: Path
    dtype: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    context_length: int
    graphs: tuple[GraphInfo, ...]
    stop_token_ids: tuple[int, ...]
    pad_token_id: int
    tokenizer_vocab_size: int
    raw: dict[str, Any]

    def graph_for(self, device: str, name: str | None = None) -> GraphInfo:
        """The graph called `name`, else the one made for `device`, else the portable one."""
        if name is not None:
            for graph in self.graphs:
                if graph.name == name:
                    return graph
            raise RuntimeInputError(f"{self.artifact} has no graph {name!r}; it has {[g.name for g in self.graphs]}")
        for graph in self.graphs:
            if graph.target == device:
                return graph
        for graph in self.graphs:
            if graph.target == "any":
                return graph
        raise RuntimeInputError(f"{self.artifact} has no graph for {device!r}; targets: {[g.target for g in self.graphs]}")


def load_manifest(artifact: str | Path) -> Manifest:
    """Parse ARTIFACT/manifest.json; raises RuntimeInputError when it is missing or of another format."""
    artifact = Path(artifact)
    path = artifact / "manifest.json"
    if not path.is_file():
        raise RuntimeInputError(f"{path} not found: pass an artifact folder written by `qwen2-onnx export`")
    raw = json.loads(path.read_text())
    if raw.get("format") != FORMAT or raw.get("format_version") not in SUPPORTED_VERSIONS:
        raise RuntimeInputError(
            f"{path} is format {raw.get('format')!r} version {raw.get('format_version')!r}; this runtime reads "
            f"{FORMAT!r} versions {list(SUPPORTED_VERSIONS)} (re-export with this version of qwen2-onnx)"
        )
    model, tokens = raw["model"], raw["tokenizer"]
    graphs = tuple(
        GraphInfo(
            name=g["name"],
            path=artifact / g["file"],
            target=g["target"],
            kv_layout=g["kv_cache"]["layout"],
            padding=g["padding"],
            input_names=tuple(spec["name"] for spec in g["inputs"]),
            output_names=tuple(spec["name"] for spec in g["outputs"]),
            activation_dtype=g.get("activation_dtype"),
            token_candidates=g.get("token_candidates", {}).get("k", 0),
        )
        for g in raw["graphs"]
    )
    pad = tokens.get("pad_token_id")
    return Manifest(
        artifact=artifact,
        dtype=raw["dtype"],
        num_layers=model["num_hidden_layers"],
        num_kv_heads=model["num_key_value_heads"],
        head_dim=model["head_dim"],
        vocab_size=model["vocab_size"],
        context_length=model["context_length"],
        graphs=graphs,
        stop_token_ids=tuple(tokens["stop_token_ids"]),
        pad_token_id=pad if pad is not None else (tokens["stop_token_ids"] or [0])[0],
        tokenizer_vocab_size=tokens["vocab_size"],
        raw=raw,
    )
