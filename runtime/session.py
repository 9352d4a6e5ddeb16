"""One graph of an artifact opened on a device: the onnxruntime session, the step runner chosen at load,
and the KV buffers it hands out."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import onnxruntime as ort

from artifact import contract

from .errors import RuntimeInputError
from .kv_cache import KVPool
from .steps import PlainSteps, StepRunner

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
SUPPORTED_CONTRACTS = {(contract.CONCAT, contract.LEFT), (contract.SHARED_BUFFER, contract.RIGHT),
                       (contract.NO_CACHE, contract.RIGHT)}

# makes the step runner from the onnxruntime session, the graph and the device (runtime.steps, runtime.cuda_graph)
StepsFactory = Callable[[ort.InferenceSession, contract.GraphEntry, str], StepRunner]


class GraphSession:
    """`cuda_graph` captures steps once and replays them (CUDA, shared-buffer graphs only): decode steps,
    fresh batch-1 prompts padded to a bucket length, and batch-1 greedy decoding as two steps that feed
    each other on the device (runtime/cuda_graph.py); `cpu_fallback` lets onnxruntime place nodes of a
    CUDA-optimized graph on the CPU; `optimize=False` switches onnxruntime's own graph rewrites off.
    `steps` makes the step runner instead of the choice above (tests drive the captured runners on CPU)."""

    def __init__(self, manifest: contract.Manifest, graph_path: Path, graph: contract.GraphEntry, device: str = "cpu",
                 cuda_graph: bool = False, cpu_fallback: bool = False, optimize: bool = True,
                 steps: StepsFactory | None = None):
        if device not in PROVIDERS:
            raise RuntimeInputError(f"--device {device!r} is not supported; choose one of {sorted(PROVIDERS)}")
        if PROVIDERS[device] not in ort.get_available_providers():
            raise RuntimeInputError(
                f"onnxruntime here has no {PROVIDERS[device]}; for --device cuda install onnxruntime-gpu "
                "(pip install 'qwen2-onnx[cuda]') instead of onnxruntime"
            )
        if (graph.kv_layout, graph.padding) not in SUPPORTED_CONTRACTS:
            raise RuntimeInputError(
                f"graph {graph.name!r} uses KV layout {graph.kv_layout!r} with {graph.padding!r} padding, which this "
                f"runtime does not drive (it knows {sorted(SUPPORTED_CONTRACTS)}); update qwen2-onnx"
            )
        if cuda_graph and (device != "cuda" or graph.kv_layout != contract.SHARED_BUFFER):
            raise RuntimeInputError("CUDA-graph decoding needs --device cuda and a graph with the shared KV buffer "
                                    "(qwen2-onnx optimize ARTIFACT --target cuda)")
        stream = None
        if cuda_graph and steps is None:
            from .cuda_graph import captured_steps_factory

            steps, stream = captured_steps_factory()
        options, providers = session_settings(graph, device, optimize, cuda_graph, cpu_fallback, stream)
        try:
            self.session = ort.InferenceSession(str(graph_path), options, providers=providers)
        except Exception as error:  # onnxruntime raises its own types; name the way out
            raise RuntimeInputError(f"onnxruntime cannot load {graph_path} ({one_line(error)}); check the artifact "
                                    "with `qwen2-onnx verify ARTIFACT` or re-export it") from error
        check_graph_io(self.session, graph, manifest)
        if strict_placement(graph, device, cpu_fallback):
            strays = nodes_off_the_device(self.session)
            if strays:
                raise RuntimeInputError(f"onnxruntime would run part of {graph.name!r} on the CPU ({', '.join(strays[:5])}); "
                                        "pass --cpu-fallback (Model.load(..., cpu_fallback=True)) to allow it")
        self.graph, self.device = graph, device
        self.steps: StepRunner = (steps or PlainSteps)(self.session, graph, device)
        self.caches = KVPool(manifest, graph, device)


ORT_TYPES = {"float32": "tensor(float)", "float16": "tensor(float16)", "bfloat16": "tensor(bfloat16)",
             "int64": "tensor(int64)", "int32": "tensor(int32)"}


def check_graph_io(session: ort.InferenceSession, graph: contract.GraphEntry, manifest: contract.Manifest) -> None:
    """The graph's inputs and outputs are the ones its manifest entry declares, and its KV tensors have the
    model's head count and size: a manifest that does not describe its graph is refused at load rather
    than failing inside a step."""
    model = manifest.model
    actual = {arg.name: arg for arg in [*session.get_inputs(), *session.get_outputs()]}
    for spec in (*graph.inputs, *graph.outputs):
        arg = actual.pop(spec.name, None)
        expected_type, expected_dims = spec.dtype, list(spec.dims)
        if spec.name.startswith((contract.PAST, contract.PRESENT)):  # the runtime allocates these from the facts
            expected_type = graph.activation_dtype or manifest.dtype
            if len(expected_dims) == 4:  # other ranks are refused by the rank check below
                expected_dims[1], expected_dims[3] = model.num_key_value_heads, model.head_dim
        static = [(have, want) for have, want in zip(arg.shape, expected_dims) if isinstance(want, int)] if arg else []
        if arg is None or arg.type != ORT_TYPES.get(spec.dtype) or arg.type != ORT_TYPES.get(expected_type) or \
                len(arg.shape) != len(spec.dims) or any(have != want for have, want in static):
            found = "missing" if arg is None else f"{arg.type} {arg.shape}"
            raise RuntimeInputError(f"graph {graph.name!r}: {spec.name} is {found} but the manifest declares "
                                    f"{expected_type} {expected_dims}; the manifest does not describe this graph, "
                                    "re-export")
    if actual:
        raise RuntimeInputError(f"graph {graph.name!r} has inputs or outputs the manifest does not declare: "
                                f"{sorted(actual)}; re-export the artifact")


def strict_placement(graph: contract.GraphEntry, device: str, cpu_fallback: bool) -> bool:
    """A graph optimized for CUDA must run every compute node on CUDA (its shape arithmetic aside), so a
    node onnxruntime would place on the CPU is an error at load, not a silent host round trip in every
    step; `cpu_fallback` allows it."""
    return device == "cuda" and graph.target == "cuda" and not cpu_fallback


def nodes_off_the_device(session: ort.InferenceSession) -> list[str]:
    """The nodes onnxruntime placed on the CPU EP, except the graph's shape arithmetic (contract.HOST_SHAPE_NODES),
    which it computes there for any device. Needs a session made with "session.record_ep_graph_assignment_info"."""
    if not hasattr(session, "get_provider_graph_assignment_info"):
        raise RuntimeInputError(f"onnxruntime {ort.__version__} cannot say where it placed each node (1.24 added it); "
                                "upgrade onnxruntime-gpu, or pass --cpu-fallback to load without the check")
    return [node.name for subgraph in session.get_provider_graph_assignment_info()
            if subgraph.ep_name == PROVIDERS["cpu"] for node in subgraph.get_nodes()
            if not node.name.startswith(contract.HOST_SHAPE_NODES)]


def session_settings(graph: contract.GraphEntry, device: str, optimize: bool, cuda_graph: bool, cpu_fallback: bool,
                     stream: int | None = None) -> tuple[ort.SessionOptions, list]:
    """Session options and providers. Where placement is strict (strict_placement), onnxruntime records
    where it put each node, for nodes_off_the_device. `stream`: the CUDA stream onnxruntime computes on,
    when ours."""
    options = ort.SessionOptions()
    if graph.kv_layout == contract.CONCAT:
        # its shapes change every step and onnxruntime keeps a memory pattern per input shape: off, the
        # CPU arena's growth over 10,000 tokens drops from 50 to 33 MiB (tools/rss_over_tokens.py)
        options.enable_mem_pattern = False
    # int4 graphs: onnxruntime fuses DequantizeLinear + MatMul into MatMulNBits, by default with int8
    # activations on the CPU (0.4 off in the logits of the tiny AWQ model); level 1 computes in float, exact
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    if not optimize:  # onnxruntime's own rewrites off, so they cannot hide ours
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if device == "cpu":
        return options, [PROVIDERS["cpu"]]
    # weights get exact-size allocations and the arena grows by what is asked, not to the next power of
    # two: peak memory stays near weights + KV + activations
    options.add_session_config_entry("session.use_device_allocator_for_initializers", "1")
    cuda_options = {"arena_extend_strategy": "kSameAsRequested", **({"enable_cuda_graph": "1"} if cuda_graph else {}),
                    **({"user_compute_stream": str(stream)} if stream else {})}
    if strict_placement(graph, device, cpu_fallback):
        options.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    return options, [(PROVIDERS["cuda"], cuda_options), PROVIDERS["cpu"]]


def one_line(error: Exception, limit: int = 300) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[:limit] + "..."
