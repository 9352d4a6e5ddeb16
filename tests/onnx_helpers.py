"""Drive a portable graph with plain onnxruntime, as a host in another language would."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort

NUMPY_TYPES = {"float32": np.float32, "float16": np.float16}


def open_session(artifact: Path) -> tuple[ort.InferenceSession, dict]:
    """CPU session with onnxruntime's own graph rewrites off, so nothing hides what we exported."""
    manifest = json.loads((artifact / "manifest.json").read_text())
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    graph = artifact / manifest["graphs"][0]["file"]
    return ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"]), manifest


def empty_cache(manifest: dict, batch: int) -> dict[str, np.ndarray]:
    model = manifest["model"]
    dtype = NUMPY_TYPES[manifest["dtype"]]
    shape = (batch, model["num_key_value_heads"], 0, model["head_dim"])
    return {
        f"past_key_values.{i}.{kind}": np.zeros(shape, dtype)
        for i in range(model["num_hidden_layers"])
        for kind in ("key", "value")
    }


def run_step(session, cache: dict, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray):
    """One graph call; returns (logits, the next step's cache built from present.*). Graphs without a
    position_ids input (GroupQueryAttention derives positions) simply do not get it; optimized graphs
    also take total_sequence_length, the mask's width."""
    feed = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids, **cache,
            "total_sequence_length": np.array(attention_mask.shape[1], np.int32)}
    wanted = {i.name for i in session.get_inputs()}
    feed = {name: value for name, value in feed.items() if name in wanted}
    names = [o.name for o in session.get_outputs()]
    outputs = dict(zip(names, session.run(None, feed), strict=True))
    next_cache = {name.replace("present", "past_key_values"): value for name, value in outputs.items()
                  if name.startswith("present.")}
    return outputs["logits"], next_cache


def greedy(session, manifest: dict, prompt: list[int], steps: int) -> tuple[list[int], list[np.ndarray]]:
    """Batch-1 greedy decoding with the KV cache; returns the new tokens and each step's logits row."""
    ids = np.array([prompt], dtype=np.int64)
    cache = empty_cache(manifest, 1)
    position = np.arange(len(prompt), dtype=np.int64)[None]
    tokens, rows = [], []
    for _ in range(steps):
        total = cache["past_key_values.0.key"].shape[2] + ids.shape[1]
        logits, cache = run_step(session, cache, ids, np.ones((1, total), np.int64), position)
        rows.append(logits[0, -1].astype(np.float32))
        tokens.append(int(rows[-1].argmax()))
        ids = np.array([[tokens[-1]]], dtype=np.int64)
        position = np.array([[total]], dtype=np.int64)
    return tokens, rows
