"""Issue 15's measurements (`--hosts`): what computing the total length inside the optimized graph costs
our runtime, and onnxruntime-genai driving our CUDA graph beside its own build.

- ours before/after: the CUDA graph as optimize now writes it (total length from the mask's shape, three
  host nodes) against the same graph taking `total_sequence_length` as an input, as optimize wrote it
  before (a sibling artifact sharing every weight file); batch-1 CUDA-graph decode and prompt prefill,
  the two loaded side by side and timed in turns.
- genai on our artifact: `og.Config(ARTIFACT)` with the genai/optimized-cuda.json overlay and the CUDA
  provider with enable_cuda_graph (examples/genai's graph_config), timed as genai's own fp16 build is (peers.genai_timings); its greedy
  tokens against ours with the tokenizer rule both apply (examples/genai).

    PYTHONPATH=. python -m tools.bench_gpu --workdir /tmp/bench --out $OUT --shapes qwen2-0.5b,qwen2-7b --hosts
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import statistics
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx

from artifact import contract

from .measure import DEVICE, GREEDY
from .ours import ours_timings
from .peers import genai_generate_timings, genai_timings
from .prepare import prepare

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
CUDA = contract.optimized_graph_name("cuda")


def total_length_input_variant(artifact: Path) -> Path:
    """A sibling of `artifact` whose CUDA graph takes `total_sequence_length` as an input instead of the
    host nodes that compute it; every other file is a hard link to `artifact`'s."""
    folder = artifact.with_name(f"{artifact.name}-total-length-input")
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(artifact, folder, copy_function=os.link)
    graph_path = folder / contract.graph_file("cuda")
    model = onnx.load(str(graph_path), load_external_data=False)
    host = [node for node in model.graph.node if node.name.startswith(contract.HOST_SHAPE_NODES)]
    total = next(node for node in host if node.name.endswith("total_length")).output[0]
    for node in host:
        model.graph.node.remove(node)
    for node in model.graph.node:
        node.input[:] = [contract.TOTAL_SEQUENCE_LENGTH if name == total else name for name in node.input]
    model.graph.input.append(onnx.helper.make_tensor_value_info(contract.TOTAL_SEQUENCE_LENGTH, onnx.TensorProto.INT32, []))
    graph_path.unlink()  # a link: the original stays as it is
    onnx.save_model(model, str(graph_path))
    manifest = contract.read_manifest(folder)
    entry = manifest.graph(CUDA)
    entry = replace(entry, inputs=(*entry.inputs, contract.TensorSpec(contract.TOTAL_SEQUENCE_LENGTH, "int32", ())),
                    files={**entry.files, contract.graph_file("cuda"): contract.FileRecord.of(graph_path)})
    (folder / contract.MANIFEST_FILE).unlink()
    contract.write_manifest(folder, manifest.with_graph(entry))
    return folder


def ours_side_by_side(builds: dict[str, Path], prompt: list[int], new_tokens: int, rounds: int = 3) -> dict:
    """Each build loaded with CUDA graphs, timed in turns (`rounds` times, 2 runs each): median decode ms/token
    and prefill ms, and whether every build gave the first build's tokens."""
    from runtime import Model

    models = {name: Model.load(path, device=DEVICE, cuda_graph=True) for name, path in builds.items()}
    runs: dict[str, list[dict]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            runs[name].append(ours_timings(model, [prompt], new_tokens, runs=2, **GREEDY))
    report = {name: {key: statistics.median(r[key] for r in results) for key in ("decode_ms_per_token", "prefill_ms")}
              for name, results in runs.items()}
    first = next(iter(runs.values()))[-1]["tokens"]
    report["same_tokens"] = all(results[-1]["tokens"] == first for results in runs.values())
    return report


def genai_on_artifact(artifact: Path, prompt: list[int], new_tokens: int, ours_tokens: list[int]) -> dict:
    """onnxruntime-genai on our CUDA graph through its overlay: timed as a caller would drive it, then
    greedy with examples/genai's tokenizer rule against our tokens."""
    import onnxruntime_genai as og

    spec = importlib.util.spec_from_file_location("genai_example", EXAMPLES / "genai" / "generate.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    model = og.Model(example.graph_config(artifact, CUDA))
    result = genai_generate_timings(model, prompt, new_tokens)
    result.pop("tokens")
    vocab = contract.read_manifest(artifact).tokenizer.vocab_size
    theirs = list(example.generate(model, prompt, len(ours_tokens), True, vocab))
    result["same_tokens_as_ours"] = theirs == ours_tokens
    result["first_difference"] = next((i for i, (a, b) in enumerate(zip(theirs, ours_tokens)) if a != b), None)
    return result


def hosts_speed(workdir: Path, shape: str, prompt_tokens: int, new_tokens: int, genai: bool) -> dict:
    from runtime import Model

    checkpoint, artifact = prepare(workdir, shape)
    prompt = np.random.default_rng(0).integers(0, 400, size=prompt_tokens).tolist()
    before = total_length_input_variant(artifact)
    report = {"shape": shape, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
              "ours": ours_side_by_side({"total_length_in_graph": artifact, "total_length_input": before}, prompt, new_tokens)}
    shutil.rmtree(before)
    print("ours:", report["ours"], flush=True)
    if genai:
        ours_tokens = Model.load(artifact, device=DEVICE, cuda_graph=True).generate(prompt, max_new_tokens=32, **GREEDY).output_ids
        report["genai_on_our_cuda_graph"] = genai_on_artifact(artifact, prompt, new_tokens, ours_tokens)
        print("genai on ours:", report["genai_on_our_cuda_graph"], flush=True)
        report["genai_own_build"] = genai_timings(checkpoint, workdir, prompt, new_tokens)
        shutil.rmtree(workdir / f"{checkpoint.name}-genai-fp16", ignore_errors=True)
    return report
