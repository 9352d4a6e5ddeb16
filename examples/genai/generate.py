"""A qwen2-onnx artifact as an onnxruntime-genai model: the folder as it is (export and optimize write its
genai_config.json), the chat template from the artifact's tokenizer_config.json.

    pip install onnxruntime-genai
    python examples/genai/generate.py ART --prompt "Hello"          # chat template, text streamed out
    python examples/genai/generate.py ART --ids 456,40,300          # greedy ids in, ids out (JSON)
    python examples/genai/generate.py ART --graph optimized-cuda    # another graph (onnxruntime-genai-cuda)

genai_config.json drives the CPU-optimized graph when the artifact has one, else the portable graph, on
the CPU; `--graph NAME` overlays genai/NAME.json, which names that graph, and for a graph optimized for
CUDA asks genai's API for the CUDA provider with its CUDA graph (an overlay cannot). Like the project's runtime, this
script never picks ids past the tokenizer (rows of padding in published Qwen2 embeddings: manifest.json's
tokenizer.vocab_size against model.vocab_size): it sets their logits to -inf before each choice, which
genai itself has no option for.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Iterator

import numpy as np
import onnxruntime_genai as og


def generate(model: og.Model, prompt_ids: list[int], new_tokens: int, greedy: bool, vocab: int) -> Iterator[int]:
    """Token ids after `prompt_ids`, one at a time, none of them `vocab` or above; greedy, or the artifact's
    sampling defaults."""
    params = og.GeneratorParams(model)
    length = len(prompt_ids) + new_tokens
    if greedy:  # exactly new_tokens ids, stop tokens included, as the tests compare
        params.set_search_options(do_sample=False, max_length=length, min_length=length, repetition_penalty=1.0)
    else:
        params.set_search_options(max_length=length)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt_ids)
    while not generator.is_done():
        logits = generator.get_logits()
        logits[..., vocab:] = -np.inf
        generator.set_logits(logits)
        generator.generate_next_token()
        yield int(generator.get_next_tokens()[0])


def graph_config(artifact: Path, graph: str | None) -> og.Config:
    """genai's config for `graph` (None: genai_config.json's), on CUDA with genai's CUDA graph when the
    graph was optimized for CUDA (manifest.json says)."""
    config = og.Config(str(artifact))
    if graph is None:
        return config
    config.overlay((artifact / "genai" / f"{graph}.json").read_text())
    graphs = json.loads((artifact / "manifest.json").read_text())["graphs"]
    if next(g for g in graphs if g["name"] == graph)["target"] == "cuda":
        config.clear_providers()
        config.append_provider("cuda")
        config.set_provider_option("cuda", "enable_cuda_graph", "1")
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact")
    parser.add_argument("--prompt", help="a user message, put through the chat template")
    parser.add_argument("--ids", help="comma-separated token ids, generated from greedily")
    parser.add_argument("--new-tokens", type=int, default=20)
    parser.add_argument("--graph", help="a graph of manifest.json (portable, optimized-cpu, optimized-cuda)")
    args = parser.parse_args()
    model = og.Model(graph_config(Path(args.artifact), args.graph))
    vocab = json.loads((Path(args.artifact) / "manifest.json").read_text())["tokenizer"]["vocab_size"]
    if args.ids is not None:
        ids = [int(i) for i in args.ids.split(",")]
        print(json.dumps({"output_ids": list(generate(model, ids, args.new_tokens, True, vocab))}))
        return
    tokenizer = og.Tokenizer(model)
    messages = json.dumps([{"role": "user", "content": args.prompt}])
    text = tokenizer.apply_chat_template(messages=messages, add_generation_prompt=True)
    stream = tokenizer.create_stream()
    for token in generate(model, list(tokenizer.encode(text)), args.new_tokens, False, vocab):
        print(stream.decode(token), end="", flush=True)
    print()


if __name__ == "__main__":
    main()
