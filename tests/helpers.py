"""What several test modules share: transformers as the reference (test-only), plain onnxruntime
driving a graph as a host in another language would, prompts, a synchronous stand-in for the CUDA
stream, and the repo's host examples run as a user would. Test modules import this, never each other."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import transformers

from artifact import contract
from qwen2_export.synthetic import tiny_config, write_checkpoint

PROMPTS = [[456, 40, 300, 17, 250, 99, 3], [12, 7, 310], [5, 80, 300, 41, 7]]


# ---- transformers, the reference ----
def load_reference(checkpoint) -> torch.nn.Module:
    """transformers' model on the same weights, eager attention (the plain math we compare with)."""
    return transformers.AutoModelForCausalLM.from_pretrained(
        checkpoint, attn_implementation="eager", dtype=torch.float32
    ).eval()


def load_reference_model(checkpoint: Path, int4_weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    """transformers' float model (fp32, CPU) of an int4 checkpoint's config, holding its float tensors and
    `int4_weights` (the dequantized ones, tools/int4_error.stored_weights) for the quantized parameters."""
    from safetensors.torch import load_file

    config = json.loads((checkpoint / "config.json").read_text())
    config.pop("quantization_config", None)
    moe = config["model_type"] == "qwen2_moe"
    classes = (transformers.Qwen2MoeForCausalLM, transformers.Qwen2MoeConfig) if moe else (
        transformers.Qwen2ForCausalLM, transformers.Qwen2Config)
    reference = classes[0](classes[1](**config)).float().eval()
    names = reference.state_dict()
    floats = {name: tensor.float() for path in sorted(checkpoint.glob("*.safetensors"))
              for name, tensor in load_file(path).items() if tensor.dtype.is_floating_point and name in names}
    missing = reference.load_state_dict({**floats, **int4_weights}, strict=False).missing_keys
    assert not missing, missing
    return reference


@torch.no_grad()
def reference_greedy(model, prompt: list[int], steps: int) -> list[int]:
    """transformers' generate, plain greedy (the checkpoint's sampling defaults and repetition
    penalty would otherwise be merged in), never stopping early."""
    model.generation_config = transformers.GenerationConfig(do_sample=False, eos_token_id=None, pad_token_id=0)
    output = model.generate(
        torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long), max_new_tokens=steps
    )
    return output[0, len(prompt):].tolist()


@torch.no_grad()
def reference_logits(model, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Full recomputation without a cache: what every cached step must reproduce."""
    return model(input_ids=ids, attention_mask=attention_mask).logits


@torch.no_grad()
def transformers_generate(checkpoint, prompts, steps, generation_config, tokenizer_vocab):
    """transformers' greedy generate on a left-padded batch, ids past the tokenizer suppressed as we do."""
    reference = load_reference(checkpoint)
    pad = generation_config["pad_token_id"]
    longest = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (longest - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    reference.generation_config = transformers.GenerationConfig(
        **{**generation_config, "do_sample": False},
        suppress_tokens=list(range(tokenizer_vocab, reference.config.vocab_size)),
    )
    out = reference.generate(ids, attention_mask=mask, max_new_tokens=steps)[:, longest:].tolist()
    stops = set(generation_config["eos_token_id"])
    return [row[: next((i + 1 for i, t in enumerate(row) if t in stops), len(row))] for row in out]



# ---- our torch model ----
def empty_past(config, batch):
    shape = (batch, config.num_key_value_heads, 0, config.head_dim)
    return [torch.zeros(shape)] * (2 * config.num_hidden_layers)


@torch.no_grad()
def prefill_and_decode(model, config, ids: torch.Tensor, prefill: int) -> list[torch.Tensor]:
    """Logits of the prefill, then of each single-token step reusing present.* as past."""
    batch, total = ids.shape
    logits, *past = model(ids[:, :prefill], torch.ones(batch, prefill, dtype=torch.long),
                          torch.arange(prefill)[None].expand(batch, -1), *empty_past(config, batch))
    steps = [logits]
    for position in range(prefill, total):
        logits, *past = model(ids[:, position : position + 1], torch.ones(batch, position + 1, dtype=torch.long),
                              torch.full((batch, 1), position), *past)
        steps.append(logits)
    return steps



# ---- plain onnxruntime on a graph of the artifact ----
NUMPY_TYPES = {"float32": np.float32, "float16": np.float16}


def open_session(artifact: Path, graph: int = 0) -> tuple[ort.InferenceSession, dict]:
    """CPU session for the manifest's graph number `graph` (0: portable) with onnxruntime's own graph
    rewrites off, so nothing hides what we exported."""
    manifest = json.loads((artifact / contract.MANIFEST_FILE).read_text())
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    graph = artifact / manifest["graphs"][graph]["file"]
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
    position_ids input (GroupQueryAttention derives positions) simply do not get it."""
    feed = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids, **cache}
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


def last_logits_per_step(session, manifest, ids: np.ndarray, prefill: int) -> list[np.ndarray]:
    """Batch-1 prefill then single-token steps, feeding present.* back as past (both graphs accept it)."""
    past_type = next(i.type for i in session.get_inputs() if i.name.startswith("past"))
    cache = {name: value.astype(np.float16 if "float16" in past_type else np.float32)
             for name, value in empty_cache(manifest, 1).items()}
    logits, cache = run_step(session, cache, ids[:, :prefill], np.ones((1, prefill), np.int64), np.arange(prefill)[None])
    rows = [logits[:, -1]]
    for position in range(prefill, ids.shape[1]):
        logits, cache = run_step(session, cache, ids[:, position : position + 1], np.ones((1, position + 1), np.int64),
                                 np.array([[position]]))
        rows.append(logits[:, -1])
    return [row.astype(np.float32) for row in rows]


def pipelined(session, graph, device, stream: "SyncStream | None" = None):
    """Pipelined steps on the CPU (onnxruntime's CPU provider ignores the graph ids and runs synchronously)."""
    from runtime.cuda_graph import PipelinedSteps

    return PipelinedSteps(session, graph, device, stream or SyncStream())


class SyncStream:
    """cuda_stream.DeviceStream's interface on the CPU, where onnxruntime runs synchronously: writes are
    immediate and events already complete. Drives the pipelined decode loop in CPU tests."""

    handle = None

    def write(self, target: ort.OrtValue, data: np.ndarray) -> None:  # the buffer's first bytes, as on CUDA
        SyncStream.write_rows(self, target, 0, np.ascontiguousarray(data).reshape(1, -1), 0)

    def write_rows(self, target: ort.OrtValue, offset: int, rows: np.ndarray, pitch: int) -> None:
        data = target.numpy().view(np.uint8).copy()
        width = rows.shape[1] * rows.itemsize
        for index, row in enumerate(np.ascontiguousarray(rows)):
            start = offset + index * pitch
            data[start : start + width] = row.view(np.uint8)
        target.update_inplace(data.view(target.numpy().dtype))

    def copy_rows(self, target: ort.OrtValue, pitch: int, source: ort.OrtValue, source_pitch: int, width: int,
                  height: int) -> None:
        data = source.numpy().view(np.uint8)
        rows = np.stack([data[row * source_pitch : row * source_pitch + width] for row in range(height)])
        SyncStream.write_rows(self, target, 0, rows, pitch)

    def record(self) -> None:
        return None

    def wait(self, event: None) -> None:
        pass


def counting_steps(lengths: list[int]):
    """A step-runner factory (Model.load's `steps`) of plain steps that records each step's token count."""
    from runtime.steps import PlainSteps

    class CountingSteps(PlainSteps):
        def step(self, inputs, cache, next_mask=None):
            lengths.append(inputs.input_ids.shape[1])
            return super().step(inputs, cache, next_mask)

    return CountingSteps


def with_stop_tokens(model, ids: tuple[int, ...]):
    """The same model whose manifest names other stop tokens."""
    tokens = dataclasses.replace(model.manifest.tokenizer, stop_token_ids=ids)
    return dataclasses.replace(model, manifest=dataclasses.replace(model.manifest, tokenizer=tokens))


# ---- other hosts, through the repo's examples ----
EXAMPLES = Path(__file__).parent.parent / "examples"
CHROMIUM = "/usr/bin/chromium-headless-shell"
HOST_NEW_TOKENS = 20


def ours(artifact, graph: str | None = None, new_tokens: int = HOST_NEW_TOKENS, **load) -> list[int]:
    """Our runtime's greedy tokens after PROMPTS[0], stop tokens ignored, as the examples are run."""
    from runtime import Model

    model = Model.load(artifact, **load) if graph is None else Model.load(artifact, graph=graph, **load)
    return model.generate(PROMPTS[0], max_new_tokens=new_tokens, greedy=True, repetition_penalty=1.0,
                          ignore_eos=True).output_ids


def run_example(example: str, artifact, *options: str, script: str = "generate", new_tokens: int = HOST_NEW_TOKENS) -> list[int]:
    """Run examples/{example}/{script} (.py with this interpreter, .mjs with Node.js) on PROMPTS[0]'s ids;
    its output_ids."""
    import pytest

    folder = EXAMPLES / example
    if (folder / f"{script}.py").is_file():
        pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is a test dependency: pip install -e '.[test]'")
        program = [sys.executable, str(folder / f"{script}.py")]
    else:
        if shutil.which("node") is None or not (EXAMPLES / "node_modules").is_dir():
            pytest.skip("Node.js or the examples' packages are missing: npm ci --ignore-scripts --prefix examples")
        program = ["node", str(folder / f"{script}.mjs")]
    command = [*program, str(artifact), "--ids", ",".join(map(str, PROMPTS[0])), "--new-tokens", str(new_tokens), *options]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])["output_ids"]


# ---- classification and embedding checkpoints (issue 17) -------------------------------------------------
LABELS = {"0": "negative", "1": "neutral", "2": "positive"}
PAD = 0  # the tiny tokenizer's <|endoftext|>
BASES = {"dense": "dense_untied_sharded", "moe": "moe_shared"}
HEADS = {"sequence": "ForSequenceClassification", "token": "ForTokenClassification"}


def classification_checkpoint(folder, base: str, head: str, **config):
    """A tiny checkpoint of `base` (a TINY_VARIANTS name) with a `head` classification head."""
    family = "Qwen2Moe" if base == "moe_shared" else "Qwen2"
    raw = {**tiny_config(base), "architectures": [family + HEADS[head]], "id2label": LABELS,
           "label2id": {v: int(k) for k, v in LABELS.items()}, "pad_token_id": PAD, **config}
    return write_checkpoint(folder, {k: v for k, v in raw.items() if v is not None}, seed=3)


def classification_reference(checkpoint, head: str):
    classes = {"sequence": transformers.AutoModelForSequenceClassification,
               "token": transformers.AutoModelForTokenClassification}
    return classes[head].from_pretrained(checkpoint, dtype=torch.float32).eval()


def padded(prompts: list[list[int]], side: str) -> tuple[np.ndarray, np.ndarray]:
    longest = max(map(len, prompts))
    ids, mask = np.full((len(prompts), longest), PAD, np.int64), np.zeros((len(prompts), longest), np.int64)
    for row, prompt in enumerate(prompts):
        columns = slice(0, len(prompt)) if side == "right" else slice(longest - len(prompt), longest)
        ids[row, columns], mask[row, columns] = prompt, 1
    return ids, mask
