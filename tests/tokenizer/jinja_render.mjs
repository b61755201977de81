// Renders JSON lines on stdin through @huggingface/jinja (the reference for gateway/jinja.h) and
// prints one line each: the text as a JSON string, or {"error": message} when it throws.
// Usage: node jinja_render.mjs TOKENIZER_CONFIG_JSON < conversations.jsonl
//          each line: an array of messages (add_generation_prompt = true) or
//          {messages, tools?, add_generation_prompt?} (add_generation_prompt defaults to false);
//          the context is {messages, tools (null when absent), add_generation_prompt, bos_token,
//          eos_token}, as gateway/chat_template.cc builds it.
//        node jinja_render.mjs --cases < cases.jsonl
//          each line: {template, context}.
import { createRequire } from "module";
import fs from "fs";
const require = createRequire(process.env.NODE_PATH + "/");
const { Template } = require("@huggingface/jinja");

function token(t) {
  if (t === undefined || t === null) return undefined;
  return typeof t === "string" ? t : t.content;
}

function render(template, context) {
  try {
    return JSON.stringify(new Template(template).render(context));
  } catch (e) {
    return JSON.stringify({ error: String(e && e.message !== undefined ? e.message : e) });
  }
}

const lines = fs.readFileSync(0, "utf8").split("\n").filter((l) => l.length > 0);
const out = [];
if (process.argv[2] === "--cases") {
  for (const line of lines) {
    const c = JSON.parse(line);
    out.push(render(c.template, c.context));
  }
} else {
  const cfg = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
  let template = cfg.chat_template;
  if (Array.isArray(template)) template = template.find((t) => t.name === "default").template;
  const bos = token(cfg.bos_token), eos = token(cfg.eos_token);
  for (const line of lines) {
    const j = JSON.parse(line);
    const ctx = Array.isArray(j)
      ? { messages: j, tools: null, add_generation_prompt: true }
      : { messages: j.messages, tools: j.tools ?? null, add_generation_prompt: j.add_generation_prompt === true };
    if (bos !== undefined) ctx.bos_token = bos;
    if (eos !== undefined) ctx.eos_token = eos;
    out.push(render(template, ctx));
  }
}
process.stdout.write(out.map((l) => l + "\n").join(""));
