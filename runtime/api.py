"""The Python API: load an artifact, generate, stream, chat.

    from runtime import Model
    model = Model.load("qwen2-7b-onnx", device="cpu")
    print(model.generate("Tell me a story", max_new_tokens=64).text)
    for piece in model.stream([{"role": "user", "content": "Hi"}], max_new_tokens=64):
        print(piece, end="", flush=True)
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator, Union

import numpy as np

from artifact import contract, files

from .chat import ChatTemplate, Message, TemplateLimits, load_chat_template, read_json
from .classify import LabelScore, TokenLabel, classification_logits, embeddings, ranked, scores
from .errors import RuntimeInputError
from .generate import DecodeLoop, Generation, Timings, pad_token_id
from .kv_cache import KVCache
from .sampling import SAMPLING_OPTIONS, SamplingConfig, sampling_from_generation_config
from .session import GraphSession, StepsFactory
from .stream import TextStream
from .tokenizer import TextTokenizer, utf8_size

Prompt = Union[str, list[Message], list[int]]  # raw text, chat messages, or token ids
WARM_UP_LIMIT = 8192  # onnxruntime's MoE kernel treats larger token counts like 8,192
CUDA_ONLY_TYPES = ("bfloat16",)  # element types onnxruntime's CPU kernels lack
LOOP_OPTIONS = ("max_new_tokens", "stop_strings", "greedy", "prefill_chunk", "ignore_eos")


@dataclass(kw_only=True)
class ModelText:
    """An artifact's text side without its graph: manifest, tokenizer, chat template and generation
    defaults; prompts in, token ids out. The server's front process holds only this (runtime/engine.py
    runs the graph in a process of its own)."""

    manifest: contract.Manifest
    artifact: Path
    tokenizer: TextTokenizer
    chat_template: ChatTemplate | None
    generation_config: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def open(cls, artifact: str | Path, chat_template: str | Path | None = None,
             template_limits: TemplateLimits = TemplateLimits()) -> "ModelText":
        """Read the artifact's manifest, tokenizer, chat template (`chat_template` overrides the checkpoint's,
        `template_limits` bound its rendering) and generation_config.json. Raises RuntimeInputError."""
        artifact = Path(artifact)
        try:
            manifest = contract.read_manifest(artifact)
            files.check_contained(artifact)
        except contract.ArtifactError as error:
            raise RuntimeInputError(str(error)) from error
        return cls(manifest=manifest, artifact=artifact, tokenizer=TextTokenizer(artifact / contract.TOKENIZER_FILE),
                   chat_template=load_chat_template(artifact, chat_template, template_limits),
                   generation_config=read_json(artifact / contract.GENERATION_CONFIG_FILE, required=False))

    def sampling(self, greedy: bool = False, **overrides: Any) -> SamplingConfig:
        """generation_config.json's defaults with `overrides` (temperature, top_k, top_p, min_p,
        repetition_penalty, seed, do_sample) applied; `greedy` turns sampling off."""
        unknown = sorted(set(overrides) - set(SAMPLING_OPTIONS))
        if unknown:
            raise RuntimeInputError(f"unknown generation option(s) {unknown}; the options are "
                                    f"{sorted(LOOP_OPTIONS + SAMPLING_OPTIONS)}")
        if greedy:
            overrides["do_sample"] = False
        return sampling_from_generation_config(self.generation_config, **overrides)

    def encode(self, prompt: Prompt, tools: list[dict] | None = None) -> list[int]:
        """Token ids of a prompt: ids as given, text tokenized, messages rendered with the chat template.
        Text that cannot fit the context is refused from its size, before it is tokenized."""
        if isinstance(prompt, str):
            return self.tokenizer.encode(self.fitting(prompt))
        if prompt and all(isinstance(item, int) for item in prompt):
            return list(prompt)
        if self.chat_template is None:
            raise RuntimeInputError(
                "this checkpoint has no chat template (tokenizer_config.json has no chat_template); "
                "pass one with --chat-template FILE (Model.load(..., chat_template=FILE))"
            )
        text = self.chat_template.render(prompt, tools=tools, add_generation_prompt=True)
        return self.tokenizer.encode(self.fitting(text), add_special_tokens=False)

    def fitting(self, text: str) -> str:
        """`text`, unless even its fewest possible tokens leave no room for one new token."""
        self.check_prompt_size(utf8_size(text))
        return text

    def check_prompt_size(self, utf8_bytes: int) -> None:
        """Refuse a prompt of this many bytes when it cannot fit the context whatever its tokens."""
        context, fewest = self.manifest.model.context_length, self.tokenizer.fewest_tokens(utf8_bytes)
        if fewest >= context:
            raise RuntimeInputError(f"the prompt ({utf8_bytes:,} bytes) is at least {fewest:,} tokens, past the "
                                    f"model's context length {context:,}; shorten it")


@dataclass(kw_only=True)
class Model(ModelText):
    session: GraphSession
    last_timings: Timings = field(default_factory=Timings)

    @classmethod
    def load(cls, artifact: str | Path, device: str = "cpu", chat_template: str | Path | None = None,
             optimize: bool = True, graph: str | None = None, cuda_graph: bool = False,
             cpu_fallback: bool = False, steps: StepsFactory | None = None, verify: bool = False,
             template_limits: TemplateLimits = TemplateLimits()) -> "Model":
        """Open an exported artifact on `device` ("cpu" or "cuda"), using the graph optimized for that device
        when the artifact has one (`graph` names another, e.g. "portable"); `chat_template` overrides the
        checkpoint's; `optimize=False` switches onnxruntime's own graph rewrites off; `cuda_graph` captures
        steps once and replays them (CUDA only: decode steps, fresh batch-1 prompts padded to a bucket
        length, and batch-1 greedy decoding queued one step ahead); a graph optimized for CUDA must place
        every node on CUDA unless `cpu_fallback` allows onnxruntime to put some on the CPU. `steps` makes
        the step runner (runtime.steps, runtime.cuda_graph) instead of the choice from device and
        cuda_graph. Paths from the manifest are resolved inside the artifact and the graph's file sizes
        checked against it; `verify` also checks the sha256 of those and of the copied checkpoint files
        (a full read of the weights). `template_limits` bound the chat template's rendering. Raises RuntimeInputError for a
        bad artifact or option."""
        text = ModelText.open(artifact, chat_template, template_limits)
        try:
            chosen = choose_graph(text.manifest, device, graph)
            # the copied config files may be edited by hand (generation defaults); verify checks them too
            records = files.all_records(text.manifest, [chosen.name]) if verify else chosen.files
            files.check_files(text.artifact, records, checksums=verify)
            graph_path = files.inside(text.artifact, chosen.file)
        except contract.ArtifactError as error:
            raise RuntimeInputError(str(error)) from error
        session = GraphSession(text.manifest, graph_path, chosen, device, cuda_graph=cuda_graph,
                               cpu_fallback=cpu_fallback, optimize=optimize, steps=steps)
        return cls(**{f.name: getattr(text, f.name) for f in fields(ModelText)}, session=session)

    def decode_loop(self, prompts: list[Prompt], max_new_tokens: int = 128, stop_strings: tuple[str, ...] = (),
                    cache: KVCache | None = None, greedy: bool = False, prefill_chunk: int | None = None,
                    ignore_eos: bool = False, keep_cache: bool = False, **sampling: Any) -> DecodeLoop:
        """The loop of one request (runtime/generate.py), not yet started; generate and stream drive it."""
        if self.manifest.task != contract.TEXT_GENERATION:
            raise RuntimeInputError(f"this artifact's task is {self.manifest.task}: it classifies, it does not "
                                    "generate; use classify (qwen2-onnx classify ARTIFACT --text ...)")
        return DecodeLoop(self.session, self.manifest, self.tokenizer, [self.encode(p) for p in prompts],
                          self.sampling(greedy, **sampling), max_new_tokens, stop_strings, cache, prefill_chunk,
                          ignore_eos, keep_cache)

    def generate_batch(self, prompts: list[Prompt], **options: Any) -> list[Generation]:
        """Generate for several prompts at once (one batch, padded as the graph's manifest entry says)."""
        loop = self.decode_loop(prompts, **options)
        for _ in loop:
            pass
        self.last_timings = loop.timings
        return loop.generations

    def generate(self, prompt: Prompt, **options: Any) -> Generation:
        """One prompt; options: max_new_tokens, stop_strings, greedy, temperature, top_k, top_p, min_p,
        repetition_penalty, seed, prefill_chunk (prefill a long prompt this many tokens at a time),
        ignore_eos (run to max_new_tokens through stop tokens, for measurements)."""
        return self.generate_batch([prompt], **options)[0]

    def stream(self, prompt: Prompt, **options: Any) -> Iterator[str]:
        """Text pieces as they become final; they add up to generate(...).text."""
        loop = self.decode_loop([prompt], **options)
        yield from stream_text(loop, self.tokenizer)
        self.last_timings = loop.timings

    def warm_up(self, max_prompt_tokens: int | None = None) -> list[int]:
        """Prefill a prompt of each power-of-two length up to `max_prompt_tokens` (default: the context,
        at most WARM_UP_LIMIT), and of every captured prompt bucket up to it when prefill is captured,
        and decode one step after the first, discarding the results, so onnxruntime's first-use work
        for each prompt size happens here instead of inside a request. On CUDA that is the MoE
        kernel's GEMM tactic profiling, which runs once per MoE node for each power-of-two token count
        up to 8,192 (10.4 s for the first 4,096-token prompt at Qwen2-57B-A14B shapes with 4 layers),
        and each bucket's capture (0.1-1.2 s at 7B shapes). onnxruntime keeps its cuDNN attention plans
        per thread, so an uncaptured prompt (a batch, or past the captured buckets) is warm only on the
        thread that ran this. Returns the prompt lengths run."""
        context = self.manifest.model.context_length
        limit = min(context - 1, WARM_UP_LIMIT) if max_prompt_tokens is None else max_prompt_tokens
        if not 0 < limit < context:
            raise RuntimeInputError(f"warm-up length {limit} must be between 1 and the context length minus one "
                                    f"({context - 1}); pass the longest prompt you expect")
        # powers of two up to the one at or above the limit, none past the context
        lengths = list(dict.fromkeys(min(2**k, context - 1) for k in range(1, max(limit - 1, 1).bit_length() + 1)))
        lengths = sorted({*lengths, *self.session.steps.prompt_buckets(max(lengths), context)})
        timings = self.last_timings
        for index, length in enumerate(lengths):
            self.generate([pad_token_id(self.manifest)] * length, max_new_tokens=2 if index == 0 else 1,
                          greedy=True, ignore_eos=True)
        self.last_timings = timings  # the last request's, as before
        return lengths

    def classify(self, texts: list[Prompt], top_k: int | None = 1) -> list[list[LabelScore]] | list[list[TokenLabel]]:
        """A classification artifact's scores for each text (or ids), as one padded batch: the `top_k` best
        labels (None: all) of each text (text-classification), or each token's best label
        (token-classification). Scores: softmax, or sigmoid for a multi-label head (runtime/classify.py)."""
        if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
            raise RuntimeInputError(f"top_k={top_k!r} must be a positive number of labels, or None for all")
        prompts = self.encode_all(texts, "classify")
        logits = classification_logits(self.session, self.manifest, prompts)
        head = self.manifest.head
        if self.manifest.task == contract.TEXT_CLASSIFICATION:
            return [ranked(scores(row, head), head, top_k) for row in logits]
        results = []
        for prompt, rows in zip(prompts, logits):
            best = [ranked(scores(row, head), head, 1)[0] for row in rows]
            results.append([TokenLabel(token, self.tokenizer.decode([token], skip_special_tokens=False), b.label, b.score)
                            for token, b in zip(prompt, best)])
        return results

    def embed(self, texts: list[Prompt]) -> np.ndarray:
        """A feature-extraction artifact's embedding of each text (or ids), as one padded batch: [texts, hidden]
        float32, the last real token's final hidden state, L2-normalised (gte-Qwen2's pooling)."""
        return embeddings(self.session, self.manifest, self.encode_all(texts, "embed"))

    def encode_all(self, texts: list[Prompt], method: str) -> list[list[int]]:
        if isinstance(texts, str) or not isinstance(texts, list):
            raise RuntimeInputError(f"{method} takes a list of texts (or of token-id lists)")
        return [self.encode(text) for text in texts]

    def chat(self, system: str | None = None) -> "ChatSession":
        return ChatSession(self, [{"role": "system", "content": system}] if system else [])


def choose_graph(manifest: contract.Manifest, device: str, name: str | None = None) -> contract.GraphEntry:
    """The graph called `name`, else the one optimized for `device`, else the portable one; refused
    when its activations are of a type the device cannot run (onnxruntime has no bf16 CPU kernels)."""
    if name is not None:
        graph = manifest.graph(name)
        if graph is None:
            raise RuntimeInputError(f"the artifact has no graph {name!r}; it has {[g.name for g in manifest.graphs]}")
    else:
        graph = next((g for g in manifest.graphs if g.target == device), manifest.graph(contract.PORTABLE_GRAPH))
    if graph is None:
        raise RuntimeInputError(f"the artifact has no graph for {device!r}; targets: {[g.target for g in manifest.graphs]}")
    if device == "cpu" and (graph.activation_dtype or manifest.dtype) in CUDA_ONLY_TYPES:
        raise RuntimeInputError(
            f"graph {graph.name!r} computes in {graph.activation_dtype or manifest.dtype}, which onnxruntime cannot "
            "run on the CPU; add a CPU graph (qwen2-onnx optimize ARTIFACT --target cpu, or export with --target "
            "cpu) or export with --dtype fp32, or run it with --device cuda")
    return graph


def stream_text(loop: DecodeLoop, tokenizer: TextTokenizer) -> Iterator[str]:
    """Stream row 0 of a decode loop as text; special tokens (the stop token) are not shown."""
    stream = TextStream(tokenizer)
    for tokens in loop:
        if tokens[0] is not None and (piece := stream.push(tokens[0])):
            yield piece
    if tail := stream.finish():
        yield tail


@dataclass
class ChatSession:
    """A multi-turn conversation that reuses the KV cache across turns.

    The next prompt is built from the exact ids the model already saw (the last prompt and its reply,
    stop token included) plus the tokenized rest of the rendered conversation, so it extends the
    cached ids whenever the template renders earlier turns unchanged (ChatML does). Otherwise it is
    tokenized afresh and the cache is rebuilt.
    """

    model: Model
    messages: list[Message]
    cache: KVCache | None = None
    last_reply: Generation | None = None
    seen_text: str = ""
    seen_ids: list[int] = field(default_factory=list)

    def prompt_ids(self) -> list[int]:
        model = self.model
        if model.chat_template is None:
            return model.encode(self.messages)  # raises the missing-template error
        text = model.fitting(model.chat_template.render(self.messages, add_generation_prompt=True))
        if self.seen_text and text.startswith(self.seen_text):
            return self.seen_ids + model.tokenizer.encode(text[len(self.seen_text):], add_special_tokens=False)
        return model.tokenizer.encode(text, add_special_tokens=False)

    def send(self, text: str, **options: Any) -> Iterator[str]:
        """Add a user turn and stream the assistant's reply; the reply joins the history at the end. A turn
        that is refused (too long, a bad option) leaves the conversation as it was."""
        self.messages.append({"role": "user", "content": text})
        try:
            ids = self.prompt_ids()
            loop = self.model.decode_loop([ids], cache=self.cache, keep_cache=True, **options)
        except RuntimeInputError:
            self.messages.pop()
            raise
        yield from stream_text(loop, self.model.tokenizer)
        self.model.last_timings = loop.timings
        reply = self.last_reply = loop.generations[0]
        if self.cache is not None and self.cache is not loop.cache:
            self.model.session.caches.give_back(self.cache)  # rebuilt: the old buffers may serve other requests
        self.cache = loop.cache  # kept for the next turn
        self.messages.append({"role": "assistant", "content": reply.text})
        self.seen_ids = ids + reply.output_ids
        self.seen_text = self.model.tokenizer.decode(self.seen_ids, skip_special_tokens=False)

    def reset(self) -> None:
        """Forget every turn but the system prompt, and the cache."""
        if self.cache is not None:
            self.model.session.caches.give_back(self.cache)
        self.messages = [m for m in self.messages[:1] if m["role"] == "system"]
        self.cache, self.seen_text, self.seen_ids = None, "", []
