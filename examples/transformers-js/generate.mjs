// A qwen2-onnx artifact as a transformers.js model in Node: the folder is loaded as it is (its config.json,
// generation_config.json, tokenizer files and onnx/model.onnx, the portable graph), nothing fetched.
//
//   node generate.mjs ARTIFACT --prompt "Hello"       text in, text out, the chat template applied
//   node generate.mjs ARTIFACT --ids 456,40,300       token ids in, ids out (greedy, what the tests compare)
//   node generate.mjs ARTIFACT --graph optimized-cpu  the CPU graph (Node only: its weights span two files,
//                                                     and the browser mounts one)
//
// Like the project's runtime, it never picks ids past the tokenizer (rows of padding in published Qwen2
// embeddings): they are passed as suppress_tokens, from manifest.json's two vocabulary sizes.
import { readFileSync } from "node:fs";
import { basename, dirname, join, resolve } from "node:path";
import { parseArgs } from "node:util";
import { AutoModelForCausalLM, AutoTokenizer, env } from "@huggingface/transformers";

const { values, positionals } = parseArgs({
  allowPositionals: true,
  options: {
    prompt: { type: "string" }, ids: { type: "string" }, "new-tokens": { type: "string", default: "20" },
    graph: { type: "string", default: "portable" },
  },
});
const artifact = resolve(positionals[0]);
env.allowRemoteModels = false; // local files only
env.localModelPath = dirname(artifact);
const name = basename(artifact);
const manifest = JSON.parse(readFileSync(join(artifact, "manifest.json"), "utf8"));
const graph = manifest.graphs.find((g) => g.name === values.graph);
if (graph === undefined) throw new Error(`no graph ${values.graph} in manifest.json`);
// dtype "fp32" adds no suffix to the file name, whatever the weights' type
const model = await AutoModelForCausalLM.from_pretrained(name, { dtype: "fp32", model_file_name: basename(graph.file, ".onnx") });
const newTokens = Number(values["new-tokens"]);
const suppress_tokens = Array.from({ length: manifest.model.vocab_size - manifest.tokenizer.vocab_size },
                                   (_, i) => manifest.tokenizer.vocab_size + i);

if (values.ids !== undefined) {
  const ids = values.ids.split(",").map(BigInt);
  const { Tensor } = await import("@huggingface/transformers");
  const input_ids = new Tensor("int64", BigInt64Array.from(ids), [1, ids.length]);
  const attention_mask = new Tensor("int64", BigInt64Array.from(ids, () => 1n), [1, ids.length]);
  const output = await model.generate({
    input_ids, attention_mask, max_new_tokens: newTokens, min_new_tokens: newTokens, do_sample: false,
    repetition_penalty: 1.0, suppress_tokens,
  });
  console.log(JSON.stringify({ output_ids: Array.from(output.data.slice(ids.length), Number) }));
} else {
  const tokenizer = await AutoTokenizer.from_pretrained(name);
  const text = tokenizer.apply_chat_template([{ role: "user", content: values.prompt }], { tokenize: false, add_generation_prompt: true });
  const inputs = tokenizer(text);
  const output = await model.generate({ ...inputs, max_new_tokens: newTokens, suppress_tokens });
  const prompt = inputs.input_ids.dims[1];
  console.log(tokenizer.decode(output.slice(null, [prompt, null]).tolist()[0], { skip_special_tokens: true }));
}
