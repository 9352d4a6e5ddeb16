// A qwen2-onnx artifact as a transformers.js model in a browser (WASM): a local page served from 127.0.0.1
// loads the artifact folder over HTTP and generates greedily; headless Chromium (Debian's
// chromium-headless-shell, driven by puppeteer-core) runs it. The folder is used as exported: its config.json
// carries "transformers.js_config", which names the graph file and its external-data file.
//
//   node browser.mjs ARTIFACT --ids 456,40,300 [--new-tokens 20] [--chromium /usr/bin/chromium-headless-shell]
import { createReadStream, readFileSync, statSync } from "node:fs";
import { createServer } from "node:http";
import { basename, dirname, extname, join, normalize, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import puppeteer from "puppeteer-core";

const { values, positionals } = parseArgs({
  allowPositionals: true,
  options: {
    ids: { type: "string" }, "new-tokens": { type: "string", default: "20" },
    chromium: { type: "string", default: "/usr/bin/chromium-headless-shell" },
  },
});
const artifact = resolve(positionals[0]);
const here = dirname(fileURLToPath(import.meta.url));
const modules = join(here, "..", "node_modules");
// URL prefix -> folder; nothing outside these is served
const roots = {
  "/model/": dirname(artifact),
  "/transformers/": join(modules, "@huggingface", "transformers", "dist"),
  "/ort/": join(modules, "onnxruntime-web", "dist"),
};
const manifest = JSON.parse(readFileSync(join(artifact, "manifest.json"), "utf8"));
// ids past the tokenizer are never picked, as in generate.mjs and the project's runtime
const suppress = Array.from({ length: manifest.model.vocab_size - manifest.tokenizer.vocab_size },
                            (_, i) => manifest.tokenizer.vocab_size + i);
const TYPES = { ".js": "text/javascript", ".mjs": "text/javascript", ".wasm": "application/wasm", ".json": "application/json" };
const page = `<!doctype html><script type="module">
import { AutoModelForCausalLM, Tensor, env } from "/transformers/transformers.js";
env.allowRemoteModels = false;
env.allowLocalModels = true; // in a browser: fetched from this page's server
env.localModelPath = "/model/";
env.backends.onnx.wasm.wasmPaths = "/ort/";
env.backends.onnx.wasm.numThreads = 1;
try {
  const model = await AutoModelForCausalLM.from_pretrained(${JSON.stringify(basename(artifact))}, { device: "wasm" });
  const ids = ${JSON.stringify(values.ids.split(",").map(Number))}.map(BigInt);
  const input_ids = new Tensor("int64", BigInt64Array.from(ids), [1, ids.length]);
  const attention_mask = new Tensor("int64", BigInt64Array.from(ids, () => 1n), [1, ids.length]);
  const n = ${Number(values["new-tokens"])};
  const output = await model.generate({ input_ids, attention_mask, max_new_tokens: n, min_new_tokens: n, do_sample: false,
                                        repetition_penalty: 1.0, suppress_tokens: ${JSON.stringify(suppress)} });
  window.result = { output_ids: Array.from(output.data.slice(ids.length), Number) };
} catch (error) {
  window.result = { error: String(error && error.stack || error) };
}
</script>`;

const server = createServer((request, response) => {
  const path = decodeURIComponent(new URL(request.url, "http://localhost").pathname);
  if (path === "/") {
    response.writeHead(200, { "content-type": "text/html" }).end(page);
    return;
  }
  const prefix = Object.keys(roots).find((p) => path.startsWith(p));
  const file = prefix && normalize(join(roots[prefix], path.slice(prefix.length)));
  if (!file || !file.startsWith(roots[prefix]) || !statSync(file, { throwIfNoEntry: false })?.isFile()) {
    response.writeHead(404).end();
    return;
  }
  response.writeHead(200, { "content-type": TYPES[extname(file)] ?? "application/octet-stream" });
  createReadStream(file).pipe(response);
});
await new Promise((done) => server.listen(0, "127.0.0.1", done));
const browser = await puppeteer.launch({ executablePath: values.chromium, headless: "shell", args: ["--no-sandbox"] });
try {
  const tab = await browser.newPage();
  await tab.goto(`http://127.0.0.1:${server.address().port}/`);
  await tab.waitForFunction("window.result !== undefined", { timeout: 240_000 });
  const result = await tab.evaluate("window.result");
  if (result.error) throw new Error(result.error);
  console.log(JSON.stringify(result));
} finally {
  await browser.close();
  server.close();
}
