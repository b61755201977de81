// Hugging Face `tokenizers` (the reference): one JSON string per input line -> JSON array of ids.
// Usage: node hf_encode.js TOKENIZER_JSON [--batch] < strings.jsonl  (--batch: one encodeBatch call,
// the fastest way to drive the binding; used by bench/tokenizer_bench.sh)
const { Tokenizer } = require("tokenizers");
const readline = require("readline");
(async () => {
  const tok = Tokenizer.fromFile(process.argv[2]);
  const rl = readline.createInterface({ input: process.stdin });
  const lines = [];
  for await (const line of rl) lines.push(line);
  if (process.argv[3] === "--batch") {
    const encs = await tok.encodeBatch(lines.map((l) => JSON.parse(l)), { addSpecialTokens: false });
    for (const enc of encs) process.stdout.write(JSON.stringify(Array.from(enc.getIds())) + "\n");
    return;
  }
  for (const line of lines) {
    const enc = await tok.encode(JSON.parse(line), null, { addSpecialTokens: false });
    process.stdout.write(JSON.stringify(Array.from(enc.getIds())) + "\n");
  }
})();
