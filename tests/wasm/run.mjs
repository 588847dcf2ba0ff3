// Runs every golden file through merge-core compiled to wasm32-unknown-unknown.
// usage: node run.mjs <golden_wasm.wasm> <golden dir>
// Exit status 0 only when every case of every file is reproduced bit for bit.
import { readFileSync, readdirSync } from "node:fs";
import { join } from "node:path";

const [wasmPath, goldenDir] = process.argv.slice(2);
if (!wasmPath || !goldenDir) {
  console.error("usage: node run.mjs <golden_wasm.wasm> <golden dir>");
  process.exit(2);
}
const { instance } = await WebAssembly.instantiate(readFileSync(wasmPath), {});
const w = instance.exports;
const files = readdirSync(goldenDir).filter((f) => f.endsWith(".json")).sort();
if (files.length === 0) {
  console.error(`no golden files in ${goldenDir}`);
  process.exit(2);
}
let failed = false;
for (const f of files) {
  const bytes = readFileSync(join(goldenDir, f));
  const ptr = w.golden_input(bytes.length);
  // Read `memory` after every call: growing it replaces the ArrayBuffer.
  new Uint8Array(w.memory.buffer, ptr, bytes.length).set(bytes);
  const code = w.golden_check();
  const out = new Uint8Array(w.memory.buffer, w.golden_output_ptr(), w.golden_output_len());
  const report = new TextDecoder().decode(out);
  console.log(`${code === 0 ? "ok  " : "FAIL"} ${f}: ${report}`);
  failed ||= code !== 0;
}
process.exit(failed ? 1 : 0);
