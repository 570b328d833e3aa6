// Greedy decoding by llama.cpp itself (node-llama-cpp's prebuilt CPU build), for tests/test_export_gguf.py.
// stdin: {"model": path.gguf, "n": tokens per prompt, "prompts": [{"text": ..., "ids": [...]}]}
// stdout: [{"tokenized": llama.cpp's own ids for text (special tokens parsed), "generated": n greedy ids after ids}]
import {getLlama} from "node-llama-cpp";
import {readFileSync} from "node:fs";

const job = JSON.parse(readFileSync(0, "utf8"));
const llama = await getLlama({gpu: false, build: "never", logLevel: "error"});
const model = await llama.loadModel({modelPath: job.model});
const context = await model.createContext({contextSize: 512, threads: 2});
const sequence = context.getSequence();
const out = [];
for (const prompt of job.prompts) {
  const tokenized = Array.from(model.tokenize(prompt.text, true));
  await sequence.clearHistory();
  const generated = [];
  for await (const token of sequence.evaluate(prompt.ids, {temperature: 0})) {  // temperature 0: argmax
    generated.push(token);
    if (generated.length >= job.n) break;
  }
  out.push({tokenized, generated});
}
process.stdout.write(JSON.stringify(out));
await context.dispose();
await model.dispose();
await llama.dispose();
