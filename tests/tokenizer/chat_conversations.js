// Writes chat conversations (one JSON array of {role, content} per line), deterministically:
// with and without system prompts, several systems, multi-turn, non-ASCII and empty contents.
const contents = ["Hi", "What is MLA?", "你好，世界", "Привет", "", "a\nb\n\nc", "Use <b>tags</b>",
                  "  spaces  ", "emoji 🚀", "The answer is 42."];
let seed = 7;
function rnd(n) { seed = (seed * 1103515245 + 12345) % 2147483648; return seed % n; }
const n = Number(process.argv[2] || 200);
for (let i = 0; i < n; ++i) {
  const msgs = [];
  const systems = rnd(3);
  for (let s = 0; s < systems; ++s) msgs.push({ role: "system", content: contents[rnd(contents.length)] });
  const turns = 1 + rnd(4);
  for (let t = 0; t < turns; ++t) {
    msgs.push({ role: "user", content: contents[rnd(contents.length)] });
    if (t + 1 < turns || rnd(4) === 0) msgs.push({ role: "assistant", content: contents[rnd(contents.length)] });
  }
  if (rnd(5) === 0 && systems > 0) msgs.push({ role: "system", content: "late system" });
  console.log(JSON.stringify(msgs));
}
