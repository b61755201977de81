// Holds N streaming completions open on the OpenAI-compatible endpoint with clients that read
// slowly (each takes one chunk of its stream per second), then checks that new requests are still
// answered while all N connections are open. Prints the gateway process's threads and memory at
// idle and with the N streams. Usage: node openai_slow_clients.mjs BASE_URL N GATEWAY_PID
import http from "node:http";
import fs from "node:fs";

const [base, nArg, pid] = process.argv.slice(2);
const N = Number(nArg);
const url = new URL(base);
const agent = new http.Agent({ keepAlive: true, maxSockets: Infinity });

function procStatus() {
  const s = fs.readFileSync(`/proc/${pid}/status`, "utf8");
  const get = (k) => Number((s.match(new RegExp(`^${k}:\\s+(\\d+)`, "m")) || [])[1]);
  return { threads: get("Threads"), rss_mib: +(get("VmRSS") / 1024).toFixed(1) };
}

function request(method, path, body, onResponse) {
  return new Promise((resolve, reject) => {
    const req = http.request(
      { host: url.hostname, port: url.port, method, path, agent,
        headers: { "content-type": "application/json" } },
      (res) => onResponse(res, resolve, reject));
    req.setTimeout(120000, () => req.destroy(new Error(`${path}: timed out`)));
    req.on("error", reject);
    if (body) req.write(JSON.stringify(body));
    req.end();
  });
}

// Reads the whole body; resolves {status, body, ms}.
function simple(method, path, body) {
  const t0 = Date.now();
  return request(method, path, body, (res, resolve) => {
    let data = "";
    res.on("data", (c) => (data += c));
    res.on("end", () => resolve({ status: res.statusCode, body: data, ms: Date.now() - t0 }));
  });
}

// A slow streaming client: resolves once its first chunk came; `done` once [DONE] was read.
function slowStream(i, state) {
  const body = { prompt: [10 + (i % 50), 20, 30], max_tokens: 16, temperature: 0, ignore_eos: true,
                 stream: true };
  return request("POST", "/v1/completions", body, (res, resolve, reject) => {
    if (res.statusCode !== 200) return reject(new Error(`stream ${i}: HTTP ${res.statusCode}`));
    state.open++;
    let text = "";
    res.pause();
    const timer = setInterval(() => { res.read(); }, 1000);  // one read a second
    res.on("readable", () => {});
    res.on("data", (c) => { text += c; });
    res.on("end", () => {
      clearInterval(timer);
      if (!text.includes("data: [DONE]")) return reject(new Error(`stream ${i}: no [DONE]`));
      state.done++;
    });
    res.on("error", reject);
    resolve();
  });
}

const idle = procStatus();
console.log(`gateway at idle: ${idle.threads} threads, ${idle.rss_mib} MiB RSS`);
const state = { open: 0, done: 0 };
const t0 = Date.now();
const started = [];
for (let i = 0; i < N; i++) started.push(slowStream(i, state).catch((e) => { throw e; }));
// Every connection was accepted and has its response headers (its first chunk) by now.
await Promise.all(started);
console.log(`${N} streams open after ${((Date.now() - t0) / 1000).toFixed(1)} s`);
const busy = procStatus();
console.log(`gateway with ${N} open streams: ${busy.threads} threads, ${busy.rss_mib} MiB RSS`);
const health = await simple("GET", "/health");
const models = await simple("GET", "/v1/models");
console.log(`while open: /health ${health.status} in ${health.ms} ms, /v1/models ${models.status} in ${models.ms} ms`);
if (health.status !== 200 || models.status !== 200) throw new Error("new requests not answered");
const chat = await simple("POST", "/v1/completions", { prompt: [1, 2, 3], max_tokens: 4, temperature: 0 });
console.log(`while open: a new completion ${chat.status} in ${chat.ms} ms (queued behind the ${N})`);
if (chat.status !== 200) throw new Error(`new completion: HTTP ${chat.status} ${chat.body}`);
console.log(`streams finished so far: ${state.done} of ${N}; connections still open: ${N}`);
const after = procStatus();
console.log(`gateway now: ${after.threads} threads, ${after.rss_mib} MiB RSS`);
if (busy.threads > idle.threads + 16) {
  throw new Error(`threads grew from ${idle.threads} to ${busy.threads}: a thread per stream?`);
}
console.log(JSON.stringify({ streams: N, idle, busy, after }));
agent.destroy();
process.exit(0);
