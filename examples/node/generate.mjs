// Greedy generation from a qwen2-onnx artifact with plain onnxruntime-node, driven by manifest.json alone:
// the graph's file, inputs and KV-cache layout are read from there, nothing about the model is hard-coded.
//
//   node generate.mjs ARTIFACT --ids 456,40,300 [--graph portable|optimized-cpu] [--new-tokens 20]
//
// Token ids in, token ids out (tokenize with any tokenizer.json library, or transformers.js). Batch 1.
// Two KV-cache layouts (manifest graphs[].kv_cache.layout):
//   concat         the portable graph: present.* (past + new) is fed back as past_key_values.*
//   shared_buffer  optimized graphs: one buffer per tensor of the full length, bound both as the input
//                  past_key_values.* and as the pre-allocated output present.*, written in place
// Like the project's runtime, ids past the tokenizer (embedding rows of padding) are never chosen.
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { parseArgs } from "node:util";
import * as ort from "onnxruntime-node";

const { values, positionals } = parseArgs({
  allowPositionals: true,
  options: { ids: { type: "string" }, graph: { type: "string", default: "portable" }, "new-tokens": { type: "string", default: "20" } },
});
const artifact = positionals[0];
const manifest = JSON.parse(readFileSync(join(artifact, "manifest.json"), "utf8"));
const graph = manifest.graphs.find((g) => g.name === values.graph);
if (!graph) throw new Error(`no graph ${values.graph}; the artifact has ${manifest.graphs.map((g) => g.name)}`);
const prompt = values.ids.split(",").map(Number);
const newTokens = Number(values["new-tokens"]);
const shared = graph.kv_cache.layout === "shared_buffer";
const vocab = manifest.tokenizer.vocab_size;
const ZEROS = { float32: Float32Array, float16: Uint16Array };

const session = await ort.InferenceSession.create(join(artifact, graph.file));
const kvInputs = graph.inputs.filter((spec) => spec.name.startsWith("past_key_values."));
const capacity = prompt.length + newTokens;
// the cache: [1, kv_heads, length, head_dim]; length 0 (concat) or the whole capacity (shared buffer)
let cache = Object.fromEntries(kvInputs.map((spec) => {
  const dims = [1, spec.dims[1], shared ? capacity : 0, spec.dims[3]];
  return [spec.name, new ort.Tensor(spec.dtype, new ZEROS[spec.dtype](dims.reduce((a, b) => a * b)), dims)];
}));

const int64 = (values, dims) => new ort.Tensor("int64", BigInt64Array.from(values, BigInt), dims);
const output = [];
let ids = prompt;
let seen = 0; // tokens already in the cache
for (let step = 0; step < newTokens; step++) {
  const total = seen + ids.length;
  const feeds = { input_ids: int64(ids, [1, ids.length]), attention_mask: int64(Array(total).fill(1), [1, total]), ...cache };
  const names = new Set(graph.inputs.map((spec) => spec.name));
  if (names.has("position_ids")) feeds.position_ids = int64(ids.map((_, i) => seen + i), [1, ids.length]);
  if (names.has("total_sequence_length")) feeds.total_sequence_length = new ort.Tensor("int32", Int32Array.from([total]), []);
  // shared buffer: each present.* is its past_key_values.* tensor, passed as a pre-allocated output
  const fetches = { logits: null };
  for (const name of Object.keys(cache)) fetches[name.replace("past_key_values.", "present.")] = shared ? cache[name] : null;
  const results = await session.run(feeds, fetches);
  if (!shared) cache = Object.fromEntries(Object.keys(cache).map((name) => [name, results[name.replace("past_key_values.", "present.")]]));
  const logits = results.logits;
  const width = logits.dims[logits.dims.length - 1];
  const last = logits.data.subarray(logits.data.length - width); // the last position's row
  let best = 0;
  for (let id = 1; id < vocab; id++) if (last[id] > last[best]) best = id;
  output.push(best);
  seen = total;
  ids = [best];
}
console.log(JSON.stringify({ graph: graph.name, output_ids: output }));
