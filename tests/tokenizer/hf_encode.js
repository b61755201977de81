// Hugging Face `tokenizers` (the reference): one JSON string per input line -> JSON array of ids.
// Usage: node hf_encode.js TOKENIZER_JSON < strings.jsonl
const { Tokenizer } = require("tokenizers");
const readline = require("readline");
(async () => {
  const tok = Tokenizer.fromFile(process.argv[2]);
  const rl = readline.createInterface({ input: process.stdin });
  const lines = [];
  for await (const line of rl) lines.push(line);
  for (const line of lines) {
    const enc = await tok.encode(JSON.parse(line), null, { addSpecialTokens: false });
    process.stdout.write(JSON.stringify(Array.from(enc.getIds())) + "\n");
  }
})();
