// The OpenAI-compatible HTTP API through the official `openai` npm client (v4): streamed and
// non-streamed answers agree, seeded sampling repeats, logprobs and stop strings have the API's
// shape, echo scores the prompt (lm-evaluation-harness's way), tool calls are read by the SDK
// whole and streamed, errors arrive as the SDK's APIError with the right status/param/code, a key's limit of
// requests in flight answers 429, and a client that disconnects frees its sequence on the node.
//
// usage: node openai_client_test.mjs --npm-dir DIR --base-url http://H:P/v1 --metrics-url URL
//          --key KEY [--limited-key KEY]
//   --npm-dir      scripts/fetch_tokenizer.sh's folder (node_modules/openai)
//   --key          a key without a small limit
//   --limited-key  a key whose limit is 1 request in flight (the 429 check)
// Prints "ok NAME" per check; the first failure prints why and exits 1.
import { pathToFileURL } from "node:url";
import { parseArgs } from "node:util";
import assert from "node:assert/strict";

const { values: args } = parseArgs({
  options: {
    "npm-dir": { type: "string" },
    "base-url": { type: "string" },
    "metrics-url": { type: "string" },
    key: { type: "string" },
    "limited-key": { type: "string" },
  },
});
for (const a of ["npm-dir", "base-url", "metrics-url", "key"]) {
  if (!args[a]) {
    console.error(`--${a} is required`);
    process.exit(2);
  }
}
const { default: OpenAI, APIError } = await import(
  pathToFileURL(`${args["npm-dir"]}/node_modules/openai/index.mjs`).href
);

// No retries: a 429 or 503 must reach the check, not be retried away.
const client = (key) =>
  new OpenAI({ baseURL: args["base-url"], apiKey: key, maxRetries: 0, timeout: 60_000 });
const api = client(args.key);
const MODEL = "dmoe";
const MESSAGES = [{ role: "user", content: "Write a short poem about the sea." }];

async function check(name, fn) {
  try {
    await fn();
  } catch (e) {
    console.error(`FAILED ${name}: ${e?.stack ?? e}`);
    process.exit(1);
  }
  console.log(`ok ${name}`);
}

// Reads a whole SDK stream: the concatenated text of each choice, finish reasons, the usage chunk.
async function drain(stream, chat) {
  const text = [], finish = [];
  let usage = null, chunks = 0;
  for await (const c of stream) {
    chunks++;
    if (c.usage) usage = c.usage;
    for (const ch of c.choices) {
      text[ch.index] = (text[ch.index] ?? "") + (chat ? (ch.delta?.content ?? "") : ch.text);
      if (ch.finish_reason) finish[ch.index] = ch.finish_reason;
    }
  }
  return { text, finish, usage, chunks };
}

// Expects `fn` to throw the SDK's APIError; returns it.
async function apiError(fn) {
  try {
    await fn();
  } catch (e) {
    if (e instanceof APIError) return e;
    throw new Error(`expected an APIError, got ${e?.stack ?? e}`);
  }
  throw new Error("expected an APIError, the request succeeded");
}

async function metrics() {
  const r = await fetch(args["metrics-url"]);
  assert.equal(r.status, 200, "GET metrics");
  const body = await r.text();
  const value = (series) => {
    const line = body.split("\n").find((l) => l.startsWith(series + " "));
    assert.ok(line !== undefined, `no series ${series} in the metrics`);
    return Number(line.slice(series.length + 1));
  };
  return {
    running: value('vllm:num_requests_running{model_name="dmoe"}'),
    kv: value('vllm:kv_cache_usage_perc{model_name="dmoe"}'),
    cancelled: value('dmoe_gateway_requests_total{outcome="cancelled"}'),
  };
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const greedy = { model: MODEL, messages: MESSAGES, temperature: 0, max_tokens: 24, ignore_eos: true };
let greedyText = "";

await check("chat_stream_equals_json", async () => {
  const whole = await api.chat.completions.create(greedy);
  const streamed = await drain(
    await api.chat.completions.create({ ...greedy, stream: true, stream_options: { include_usage: true } }),
    true,
  );
  assert.equal(whole.object, "chat.completion");
  assert.equal(whole.choices.length, 1);
  assert.equal(whole.choices[0].message.role, "assistant");
  assert.equal(whole.choices[0].finish_reason, "length");
  assert.equal(streamed.finish[0], "length");
  assert.equal(streamed.text[0], whole.choices[0].message.content, "streamed text != JSON text");
  assert.ok(streamed.usage, "no usage chunk with stream_options.include_usage");
  assert.equal(whole.usage.completion_tokens, 24);
  assert.equal(streamed.usage.completion_tokens, whole.usage.completion_tokens);
  assert.equal(streamed.usage.prompt_tokens, whole.usage.prompt_tokens);
  assert.ok(whole.usage.prompt_tokens > 0);
  assert.equal(whole.usage.total_tokens, whole.usage.prompt_tokens + 24);
  greedyText = whole.choices[0].message.content;
  assert.ok(greedyText.length > 0, "empty text");
});

await check("completions_token_prompt_stream", async () => {
  const req = { model: MODEL, prompt: [5, 6, 7, 8], temperature: 0, max_tokens: 16, ignore_eos: true };
  const whole = await api.completions.create(req);
  const streamed = await drain(await api.completions.create({ ...req, stream: true }), false);
  assert.equal(whole.object, "text_completion");
  assert.equal(whole.usage.prompt_tokens, 4);
  assert.equal(whole.usage.completion_tokens, 16);
  assert.equal(streamed.text[0], whole.choices[0].text);
  assert.equal(streamed.finish[0], "length");
  assert.equal(whole.choices[0].finish_reason, "length");
});

await check("seeded_sampling_repeats", async () => {
  const req = { model: MODEL, messages: MESSAGES, temperature: 1, seed: 7, max_tokens: 24, ignore_eos: true };
  const a = await api.chat.completions.create(req);
  const b = await api.chat.completions.create(req);
  assert.equal(a.choices[0].message.content, b.choices[0].message.content);
  const s = await drain(await api.chat.completions.create({ ...req, stream: true }), true);
  assert.equal(s.text[0], a.choices[0].message.content, "seeded stream != seeded JSON");
});

await check("n_choices", async () => {
  const r = await api.chat.completions.create({
    model: MODEL, messages: MESSAGES, temperature: 1, seed: 11, n: 3, max_tokens: 12, ignore_eos: true,
  });
  assert.deepEqual(r.choices.map((c) => c.index), [0, 1, 2]);
  assert.equal(r.usage.completion_tokens, 36);
  for (const c of r.choices) assert.equal(c.finish_reason, "length");
  // Choice i samples with seed + i: choice 1 of seed 11 is choice 0 of seed 12.
  const one = await api.chat.completions.create({
    model: MODEL, messages: MESSAGES, temperature: 1, seed: 12, max_tokens: 12, ignore_eos: true,
  });
  assert.equal(one.choices[0].message.content, r.choices[1].message.content);
  const s = await drain(
    await api.chat.completions.create({
      model: MODEL, messages: MESSAGES, temperature: 1, seed: 11, n: 3, max_tokens: 12, ignore_eos: true,
      stream: true,
    }),
    true,
  );
  assert.deepEqual(s.text, r.choices.map((c) => c.message.content), "streamed n choices differ");
});

function checkTop(top, k, where) {
  assert.equal(top.length, k, `${where}: ${top.length} top_logprobs, asked for ${k}`);
  for (let i = 1; i < top.length; i++) {
    assert.ok(top[i - 1].logprob >= top[i].logprob, `${where}: top_logprobs not sorted descending`);
  }
}

await check("chat_logprobs", async () => {
  const r = await api.chat.completions.create({ ...greedy, logprobs: true, top_logprobs: 3 });
  const content = r.choices[0].logprobs?.content;
  assert.ok(Array.isArray(content), "choices[0].logprobs.content is not a list");
  assert.equal(content.length, r.usage.completion_tokens);
  content.forEach((t, i) => {
    const where = `logprobs.content[${i}]`;
    assert.equal(typeof t.token, "string", `${where}.token`);
    assert.equal(typeof t.logprob, "number", `${where}.logprob`);
    assert.ok(t.logprob <= 0, `${where}.logprob ${t.logprob} > 0`);
    assert.ok(Array.isArray(t.bytes), `${where}.bytes`);
    checkTop(t.top_logprobs, 3, where);
    // Greedy: the chosen token is the most likely one.
    assert.ok(Math.abs(t.top_logprobs[0].logprob - t.logprob) < 1e-4, `${where}: greedy token is not the top one`);
  });
  // The tokens' bytes spell the text.
  const bytes = Buffer.from(content.flatMap((t) => t.bytes));
  assert.equal(bytes.toString("utf8"), r.choices[0].message.content);
  assert.equal(r.choices[0].message.content, greedyText, "logprobs changed the greedy text");
});

await check("completions_logprobs", async () => {
  const r = await api.completions.create({
    model: MODEL, prompt: [5, 6, 7, 8], temperature: 0, max_tokens: 10, ignore_eos: true, logprobs: 2,
  });
  const lp = r.choices[0].logprobs;
  const n = r.usage.completion_tokens;
  assert.equal(n, 10);
  for (const f of ["tokens", "token_logprobs", "top_logprobs", "text_offset"]) {
    assert.ok(Array.isArray(lp?.[f]), `logprobs.${f} is not a list`);
    assert.equal(lp[f].length, n, `logprobs.${f} has ${lp[f].length} entries, ${n} tokens`);
  }
  lp.token_logprobs.forEach((v) => assert.ok(typeof v === "number" && v <= 0, `token_logprob ${v}`));
  lp.top_logprobs.forEach((t) => assert.equal(Object.keys(t).length <= 2 && Object.keys(t).length >= 1, true));
  for (let i = 1; i < n; i++) assert.ok(lp.text_offset[i] >= lp.text_offset[i - 1], "text_offset decreases");
});

await check("stop_string", async () => {
  // A stop string from the middle of the greedy text (its first occurrence), avoiding U+FFFD.
  const chars = [...greedyText];
  let stop = null, at = -1;
  for (let start = Math.floor(chars.length / 2); start < chars.length - 1 && stop === null; start++) {
    const cand = chars.slice(start, start + 2).join("");
    const idx = greedyText.indexOf(cand);
    if (!cand.includes("\uFFFD") && cand.trim() === cand && idx > 0) {
      stop = cand;
      at = idx;
    }
  }
  assert.ok(stop !== null, `no stop string found in ${JSON.stringify(greedyText)}`);
  const r = await api.chat.completions.create({ ...greedy, stop: [stop] });
  assert.equal(r.choices[0].finish_reason, "stop", `stop ${JSON.stringify(stop)}`);
  assert.equal(r.choices[0].message.content, greedyText.slice(0, at),
    `stop ${JSON.stringify(stop)}: the text must end before it`);
  const s = await drain(await api.chat.completions.create({ ...greedy, stop, stream: true }), true);
  assert.equal(s.finish[0], "stop");
  assert.equal(s.text[0], greedyText.slice(0, at), "streamed: the text must end before the stop string");
  console.log(`  stop ${JSON.stringify(stop)} at character ${at} of ${greedyText.length}`);
});

// Tool calling (the server runs --tool-call-parser deepseek_v3 with the tools template): a named
// tool_choice starts the answer inside that function's call, so the tiny model's random tokens
// (in JSON mode) are its arguments. The SDK must read the call whole and from its stream helper (which joins
// delta.tool_calls by index), with the same arguments; tool_choice "auto" is accepted.
const TOOLS = [{ type: "function", function: { name: "get_weather", description: "Current weather",
  parameters: { type: "object", properties: { city: { type: "string" } }, required: ["city"] } } }];
await check("tool_calls", async () => {
  const req = { model: MODEL, messages: [{ role: "user", content: "Weather in Paris?" }], tools: TOOLS,
    tool_choice: { type: "function", function: { name: "get_weather" } }, temperature: 0,
    max_tokens: 12 };
  const whole = await api.chat.completions.create(req);
  const m = whole.choices[0].message;
  assert.equal(m.tool_calls?.length, 1, JSON.stringify(m));
  const call = m.tool_calls[0];
  assert.equal(call.type, "function");
  assert.equal(call.function.name, "get_weather");
  assert.ok(typeof call.id === "string" && call.id.length > 0, `id ${call.id}`);
  assert.equal(typeof call.function.arguments, "string");
  // A named function's call: "stop" where its arguments (JSON mode) close, as OpenAI's.
  assert.ok(["stop", "length"].includes(whole.choices[0].finish_reason),
    whole.choices[0].finish_reason);
  assert.ok(call.function.arguments.startsWith("{"), call.function.arguments);
  if (whole.choices[0].finish_reason === "stop") JSON.parse(call.function.arguments);
  const final = await api.beta.chat.completions.stream(req).finalChatCompletion();
  const streamed = final.choices[0].message.tool_calls;
  assert.equal(streamed?.length, 1, JSON.stringify(final.choices[0].message));
  assert.equal(streamed[0].function.name, "get_weather");
  assert.equal(streamed[0].function.arguments, call.function.arguments, "streamed arguments");
  assert.equal(final.choices[0].finish_reason, whole.choices[0].finish_reason);
  const auto = await api.chat.completions.create({ ...req, tool_choice: "auto" });
  assert.ok(auto.choices[0].message.content !== undefined, JSON.stringify(auto.choices[0]));
  console.log(`  arguments ${JSON.stringify(call.function.arguments)}, ${whole.choices[0].finish_reason}`);
});

// Scoring a text as lm-evaluation-harness's local-completions does: echo + logprobs (+ max_tokens
// 1) gives every prompt token's logprob (the first null) and its top alternatives, then the
// answer's; each position's own logprob is at most its best alternative's (and equal to it where
// listed); the greedy answer token is its position's best; the text is the prompt's and then the
// answer's.
await check("echo_prompt_logprobs", async () => {
  const prompt = [1000, 2000, 3000, 4000, 5000, 6000, 7000];
  const req = { model: MODEL, prompt, logprobs: 5, max_tokens: 1, temperature: 0 };
  const r = await api.completions.create({ ...req, echo: true });
  const plain = await api.completions.create(req);
  const c = r.choices[0], lp = c.logprobs;
  assert.equal(lp.tokens.length, prompt.length + 1, JSON.stringify(lp.tokens));
  assert.equal(lp.token_logprobs[0], null);
  assert.equal(lp.top_logprobs[0], null);
  for (let i = 1; i <= prompt.length; i++) {
    const top = Object.values(lp.top_logprobs[i]);
    assert.ok(top.length >= 1 && top.length <= 5, `position ${i}: ${top.length} alternatives`);
    const best = Math.max(...top);
    assert.ok(best <= 0 && lp.token_logprobs[i] <= best + 1e-5, `position ${i}`);
    const own = lp.top_logprobs[i][lp.tokens[i]];
    if (own !== undefined) assert.ok(Math.abs(own - lp.token_logprobs[i]) < 1e-5, `position ${i}`);
    if (i === prompt.length) assert.ok(Math.abs(best - lp.token_logprobs[i]) < 1e-5, "greedy");
  }
  for (let i = 1; i < lp.text_offset.length; i++) assert.ok(lp.text_offset[i] >= lp.text_offset[i - 1]);
  assert.ok(c.text.endsWith(plain.choices[0].text), `${JSON.stringify(c.text)} vs ${JSON.stringify(plain.choices[0].text)}`);
  assert.equal(plain.choices[0].logprobs.tokens.length, 1, "without echo only the answer");
  assert.equal(r.usage.completion_tokens, 1);
  console.log(`  ${prompt.length} prompt tokens scored, sum ${lp.token_logprobs.slice(1, -1).reduce((a, b) => a + b, 0).toFixed(3)}`);
});

// JSON mode on the real node (tiny-demo with the real tokenizer): the answer is a prefix of one
// JSON object from its first byte; where it ends ("stop") it parses as an object, streamed the
// same; it is never cut by a stop token.
await check("json_mode", async () => {
  const req = { model: MODEL, messages: [{ role: "user", content: "Reply in JSON." }],
    response_format: { type: "json_object" }, temperature: 0, max_tokens: 48 };
  const whole = await api.chat.completions.create(req);
  const c = whole.choices[0];
  assert.ok(c.message.content.startsWith("{"), JSON.stringify(c.message.content));
  assert.ok(["stop", "length"].includes(c.finish_reason), c.finish_reason);
  if (c.finish_reason === "stop") {
    const parsed = JSON.parse(c.message.content);
    assert.equal(typeof parsed, "object");
    assert.ok(!Array.isArray(parsed) && parsed !== null);
  }
  const s = await drain(await api.chat.completions.create({ ...req, stream: true }), true);
  assert.equal(s.text[0], c.message.content, "streamed");
  console.log(`  ${c.finish_reason}: ${JSON.stringify(c.message.content).slice(0, 100)}`);
});

await check("error_wrong_type", async () => {
  const e = await apiError(() => api.chat.completions.create({ ...greedy, temperature: "hot" }));
  assert.equal(e.status, 400);
  assert.equal(e.param, "temperature");
  assert.equal(e.type, "invalid_request_error");
  assert.equal(typeof e.error?.message, "string");
});

await check("error_bad_role", async () => {
  const e = await apiError(() =>
    api.chat.completions.create({ ...greedy, messages: [{ role: "wizard", content: "hi" }] }));
  assert.equal(e.status, 400);
  assert.equal(e.param, "messages[0].role");
});

await check("error_context_length", async () => {
  const e = await apiError(() => api.chat.completions.create({ ...greedy, max_tokens: 100000 }));
  assert.equal(e.status, 400);
  assert.equal(e.code, "context_length_exceeded");
  const c = await apiError(() => api.completions.create({ model: MODEL, prompt: [1, 2, 3], max_tokens: 510 }));
  assert.equal(c.status, 400);
  assert.equal(c.code, "context_length_exceeded");
  // 3 + 509 = 512 fits exactly (not generated: max_tokens is checked before admission).
});

await check("error_unknown_model", async () => {
  const e = await apiError(() => api.chat.completions.create({ ...greedy, model: "gpt-nope" }));
  assert.equal(e.status, 404);
  assert.equal(e.code, "model_not_found");
  const m = await apiError(() => api.models.retrieve("gpt-nope"));
  assert.equal(m.status, 404);
  assert.equal(m.code, "model_not_found");
});

await check("error_wrong_key", async () => {
  const e = await apiError(() => client("not-a-key").chat.completions.create(greedy));
  assert.equal(e.status, 401);
  assert.equal(e.error?.type, "authentication_error");
  const m = await apiError(() => client("not-a-key").models.list());
  assert.equal(m.status, 401);
});

if (args["limited-key"]) {
  await check("rate_limit_429", async () => {
    const limited = client(args["limited-key"]);
    const ac = new AbortController();
    const first = await limited.chat.completions.create(
      { model: MODEL, messages: MESSAGES, temperature: 0, max_tokens: 480, ignore_eos: true, stream: true },
      { signal: ac.signal },
    );
    const it = first[Symbol.asyncIterator]();
    const head = await it.next();
    assert.ok(!head.done, "the first stream ended at once");
    const e = await apiError(() => limited.chat.completions.create(greedy));
    assert.equal(e.status, 429, "a second request over the key's limit of 1");
    assert.equal(e.code, "rate_limit_exceeded");
    ac.abort();
    await it.next().catch(() => {});
    // The aborted request gives its slot back: the key works again (bounded).
    const t0 = Date.now();
    for (;;) {
      try {
        await limited.chat.completions.create({ ...greedy, max_tokens: 2 });
        break;
      } catch (err) {
        if (!(err instanceof APIError) || err.status !== 429 || Date.now() - t0 > 10_000) throw err;
        await sleep(50);
      }
    }
    console.log(`  the key was free again after ${Date.now() - t0} ms`);
  });
}

await check("models_list", async () => {
  const ids = [];
  for await (const m of api.models.list()) ids.push(m.id);
  assert.deepEqual(ids, [MODEL]);
  const m = await api.models.retrieve(MODEL);
  assert.equal(m.id, MODEL);
  assert.equal(m.object, "model");
});

await check("disconnect_frees", async () => {
  // The idle state (the gauges refresh about every 150 ms: wait until two reads agree).
  let before = await metrics();
  for (let i = 0; i < 50; i++) {
    await sleep(200);
    const now = await metrics();
    if (now.running === 0 && before.running === 0 && now.kv === before.kv) break;
    before = now;
  }
  assert.equal(before.running, 0, "requests still running before the check");
  const ac = new AbortController();
  const stream = await api.chat.completions.create(
    { model: MODEL, messages: MESSAGES, temperature: 0, max_tokens: 400, ignore_eos: true, stream: true },
    { signal: ac.signal },
  );
  const it = stream[Symbol.asyncIterator]();
  for (let i = 0; i < 2; i++) assert.ok(!(await it.next()).done, "the stream ended early");
  const t0 = Date.now();
  ac.abort();
  await it.next().catch(() => {});
  let now;
  for (;;) {
    now = await metrics();
    if (now.running === 0 && Math.abs(now.kv - before.kv) <= 1e-9 && now.cancelled > before.cancelled) break;
    assert.ok(Date.now() - t0 < 10_000,
      `10 s after the disconnect: running ${now.running}, kv ${now.kv} (before ${before.kv}), ` +
      `cancelled ${now.cancelled} (before ${before.cancelled})`);
    await sleep(20);
  }
  console.log(`  freed ${Date.now() - t0} ms after the disconnect (kv usage ${now.kv}, ` +
    `cancelled generations ${before.cancelled} -> ${now.cancelled})`);
});

console.log("all OpenAI client checks passed");
