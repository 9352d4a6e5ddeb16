"""GPU benchmark, run on the lent device (see README, "CUDA"); its correctness checks are tests/test_cuda.py.

    prepare.py   shapes, environment, copy bandwidth, random checkpoints and their CUDA artifacts, the floor
    ours.py      our runtime through its public API: decode, prefill, captured-step parts, variants, sweeps
    peers.py     transformers (eager, static cache + compile) and onnxruntime-genai on the same checkpoint
    profiles.py  CUPTI kernel profiles and onnxruntime's node profile, run after every timing
    int4.py      --int4: int4 builds against fp16 and onnxruntime-genai's int4
    whole_moe.py --whole-57b: the whole Qwen2-57B-A14B in int4 on one GPU
    hosts.py     --hosts: the total length in the graph against as an input; onnxruntime-genai on our graph
    report.py    the run's parts, bench_gpu.json, ratios and the README's tables
    __main__.py  the command

Per shape (random weights at published shapes, fp16): decode ms/token at batch 1 (ours plain and with
CUDA graph, ours sampling with Qwen's defaults, transformers eager and static cache + torch.compile,
onnxruntime-genai with and without CUDA graph when installed), prefill of 512 and 4096 tokens, batch-8
throughput, peak GPU memory, each decode figure as a ratio to the floor (bytes a decode step must read /
measured bandwidth) and ours against each peer; greedy tokens of ours vs transformers at that shape.
--long-context: Qwen2-7B shapes with YaRN factor 4, chunked prefill of 32,768 (then 130,944) tokens.
--variants: ours optimized or loaded other ways, timed beside the default. --int4: ours fp16 against
int4 builds and onnxruntime-genai's int4 (int4.py). --whole-57b 28: a GPTQ-Int4 Qwen2-57B-A14B
written, exported and run on the device (whole_moe.py). --bucket-sweep: first and warm
time to first token per prompt length, captured against plain steps.

    PYTHONPATH=. python -m tools.bench_gpu --workdir /tmp/bench --out $OUT --shapes qwen2-7b
"""
