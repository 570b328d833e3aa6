// Greedy decoding by llama.cpp itself (node-llama-cpp's prebuilt CPU build), for tests/test_export_gguf.py.
// stdin: {"model": path.gguf, "n": tokens per prompt, "prompts": [{"text": ..., "ids": [...]}]}
// stdout: [{"tokenized": llama.cpp's own ids for text (special tokens parsed), "generated": n greedy ids after ids,
//           "top": at each position of ids, the top [token, probability] pairs of llama.cpp's next-token distribution}]
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
  await sequence.clearHistory();
  // The model's own next-token distribution (temperature 1, no top-k/top-p cut) after each prefix.
  const next = {generateNext: {probabilities: true, options: {temperature: 1, topK: 0, topP: 1, minP: 0}}};
  const results = await sequence.controlledEvaluate(prompt.ids.map((id) => [id, next]));
  const top = prompt.ids.map((_, i) => [...(results[i]?.next?.probabilities ?? new Map()).entries()]
    .sort((a, b) => b[1] - a[1]).slice(0, job.top ?? 10));
  out.push({tokenized, generated, top});
}
process.stdout.write(JSON.stringify(out));
await context.dispose();
await model.dispose();
await llama.dispose();
