// Renders each conversation (JSON lines on stdin) with tokenizer_config.json's chat_template
// through @huggingface/jinja, add_generation_prompt = true; prints JSON strings.
// Usage: node jinja_render.mjs TOKENIZER_CONFIG_JSON < conversations.jsonl
import { createRequire } from "module";
import fs from "fs";
const require = createRequire(process.env.NODE_PATH + "/");
const { Template } = require("@huggingface/jinja");
const cfg = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
const t = new Template(cfg.chat_template);
const lines = fs.readFileSync(0, "utf8").split("\n").filter((l) => l.length > 0);
for (const line of lines) {
  const out = t.render({ messages: JSON.parse(line), bos_token: cfg.bos_token.content,
                         eos_token: cfg.eos_token.content, add_generation_prompt: true });
  process.stdout.write(JSON.stringify(out) + "\n");
}
