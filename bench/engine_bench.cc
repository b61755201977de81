// Engine benchmark: prints figures, passes/fails nothing. Every ratio is measured in this one run.
//
//   per weight dtype (f32 / bf16 / int8 / fp8, or as stored): resident and peak memory of the
//   load; decode tokens/s and ms/step per batch size, at a context depth; prefill of N tokens;
//   weight + cache bytes read per step / the machine's multi-threaded read bandwidth (the
//   fraction of the memory-bandwidth limit a step reaches); --json: one object per measurement.
//   Opt-in: batch-invariant vs BLAS kernels, routed experts over UCX vs in-process, shard
//   memory, sgemm GFLOP/s at the expert shapes.
#include <cblas.h>
#include <fcntl.h>
#include <immintrin.h>
#include <malloc.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "attention_service/kv_cache.h"
#include "attention_service/local_model.h"
#include "bench/read_bandwidth.h"
#include "bench/shard_process.h"
#include "common/huge_pages.h"
#include "kernels/cpu/bf16dot.h"
#include "kernels/cpu/blas_threads.h"
#include "kernels/cpu/invariant_gemm.h"
#include "kernels/cpu/ops.h"
#include "kernels/cpu/small_gemm.h"
#include "kernels/cpu/thread_pool.h"
#include "model/tiny_model.h"

namespace dmoe {
namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

// The engine's own small-M kernel at the same shape.
double SmallMGflops(int m, int n, int k, int reps) {
  std::vector<float> a(static_cast<size_t>(m) * k, 0.5f), b(static_cast<size_t>(n) * k, 0.25f),
      c(static_cast<size_t>(m) * n);
  double best = 1e30;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = Clock::now();
    cpu::SmallMLinear(a.data(), m, k, b.data(), n, c.data(), false);
    best = std::min(best, Seconds(t0, Clock::now()));
  }
  return 2.0 * m * n * k / best / 1e9;
}

// The batch-invariant kernel (the default for every linear layer) at the same shape, over fp32
// or packed bf16 weights.
double InvariantGflops(int m, int n, int k, int reps, bool bf16 = false) {
  std::vector<float> a(static_cast<size_t>(m) * k, 0.5f), b(static_cast<size_t>(n) * k, 0.25f),
      c(static_cast<size_t>(m) * n);
  std::vector<uint16_t> h(b.size(), 0x3e80);
  double best = 1e30;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = Clock::now();
    if (bf16) {  // packed, as models hold bf16 (the values are all equal: no packing needed)
      cpu::DotRowsBf16Packed(a.data(), m, k, h.data(), n, k, c.data(), n);
    } else {
      cpu::DotRows(a.data(), m, k, b.data(), n, k, k, c.data(), n);
    }
    best = std::min(best, Seconds(t0, Clock::now()));
  }
  return 2.0 * m * n * k / best / 1e9;
}

double SgemmGflops(int m, int n, int k, int reps) {
  std::vector<float> a(static_cast<size_t>(m) * k, 0.5f), b(static_cast<size_t>(n) * k, 0.25f),
      c(static_cast<size_t>(m) * n);
  double best = 1e30;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = Clock::now();
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, n, k, 1.0f, a.data(), k, b.data(), k,
                0.0f, c.data(), n);
    best = std::min(best, Seconds(t0, Clock::now()));
  }
  return 2.0 * m * n * k / best / 1e9;
}

struct DecodeResult {
  double tokens_per_s;
  double ms_per_step;
  // With `paired`: after the timed steps, as many again in blocks of up to kBlockSteps, each
  // block between two read-bandwidth probes (the best of two 128 MiB reads), in order.
  struct Block {
    int steps;
    double secs;
    double bw;  // the higher of its two probes' bytes/s (a neighbour's burst only lowers one)
  };
  std::vector<Block> paired;
  EngineTimings timings;  // of the timed steps
  cpu::PoolStats pool;    // of the timed steps
};

// `n` sequences in a paged cache of `kv` (blocks of 16 tokens, as served) with room for `tokens`
// tokens each.
struct PagedCaches {
  PagedCaches(const ModelConfig& c, cpu::KvDType kv, int n, int64_t tokens)
      : cache(c, 16, n * ((tokens + 15) / 16), kv) {
    for (int i = 0; i < n; ++i) seqs.push_back(std::make_unique<PagedKvSequence>(&cache));
  }
  LatentKvCache cache;
  std::vector<std::unique_ptr<PagedKvSequence>> seqs;
};

constexpr int kBlockSteps = 8;

DecodeResult BenchDecode(Engine& engine, int batch, int steps, int prompt_len,
                         cpu::KvDType kv = cpu::KvDType::kF32, bool paired = false) {
  const ModelConfig& c = engine.config();
  PagedCaches caches(c, kv, batch, prompt_len + (paired ? 2 : 1) * steps + 2);
  std::vector<SequenceStep> b(static_cast<size_t>(batch));
  for (int i = 0; i < batch; ++i) {
    b[static_cast<size_t>(i)].cache = caches.seqs[static_cast<size_t>(i)].get();
    for (int j = 0; j < prompt_len; ++j) {
      b[static_cast<size_t>(i)].tokens.push_back(
          static_cast<int32_t>((i * 131 + j * 17 + 3) % c.vocab_size));
    }
  }
  std::vector<std::vector<float>> logits;
  if (!engine.Step(b, &logits).ok()) std::abort();
  auto next = [&]() {
    for (int i = 0; i < batch; ++i) {
      b[static_cast<size_t>(i)].tokens.assign(
          1, ArgMax(logits[static_cast<size_t>(i)].data(), c.vocab_size));
    }
  };
  next();
  if (!engine.Step(b, &logits).ok()) std::abort();  // warm-up step
  engine.ResetTimings();
  cpu::ThePool().CountStats(true);
  const auto t0 = Clock::now();
  for (int s = 0; s < steps; ++s) {
    next();
    if (!engine.Step(b, &logits).ok()) std::abort();
  }
  const double secs = Seconds(t0, Clock::now());
  const cpu::PoolStats pool = cpu::ThePool().stats();
  cpu::ThePool().CountStats(false);
  DecodeResult r{batch * steps / secs, 1000.0 * secs / steps, {}, engine.timings(), pool};
  constexpr size_t kProbe = size_t{128} << 20;  // best of 2 reads, each of another eighth
  double bw = paired ? ReadBandwidth(2, kProbe, 0) : 0;
  for (int s = 0, block = 1; paired && s < steps; s += kBlockSteps, ++block) {
    const int n = std::min(kBlockSteps, steps - s);
    const auto s0 = Clock::now();
    for (int i = 0; i < n; ++i) {
      next();
      if (!engine.Step(b, &logits).ok()) std::abort();
    }
    const double block_secs = Seconds(s0, Clock::now());
    // Each probe reads another eighth of the buffer than the one before it.
    const double after = ReadBandwidth(2, kProbe, kProbe * static_cast<size_t>(block % 8));
    r.paired.push_back({n, block_secs, std::max(bw, after)});
    bw = after;
  }
  return r;
}

// VmRSS / VmHWM of this process in bytes; ResetPeakRss() restarts VmHWM from the current RSS.
uint64_t StatusBytes(const char* key) {
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line)) {
    if (line.rfind(key, 0) == 0)
      return std::strtoull(line.c_str() + std::strlen(key), nullptr, 10) << 10;
  }
  return 0;
}
void ResetPeakRss() { std::ofstream("/proc/self/clear_refs") << "5"; }
// A "Key:   N kB" line of /proc/self/smaps_rollup in bytes (AnonHugePages:, Anonymous:); 0 when
// missing.
uint64_t SmapsBytes(const char* key) {
  std::ifstream f("/proc/self/smaps_rollup");
  std::string line;
  while (std::getline(f, line)) {
    if (line.rfind(key, 0) == 0)
      return std::strtoull(line.c_str() + std::strlen(key), nullptr, 10) << 10;
  }
  return 0;
}

// One measurement, as printed and as one JSON object (--json).
struct Measurement {
  std::string model, weight_dtype, expert_dtype, kv_dtype = "f32", phase;
  int batch = 1;
  int64_t context = 0;
  double tokens_per_s = 0, ms_per_step = 0;
  double read_bw_gbs = 0;      // the machine's multi-threaded read bandwidth
  double limit_fraction = -1;  // bytes read per step / read_bw / step time; < 0: not memory-bound
};

void Emit(const Measurement& m, bool json) {
  if (json) {
    std::printf(
        "{\"model\": \"%s\", \"weight_dtype\": \"%s\", \"expert_dtype\": \"%s\", \"kv_dtype\": "
        "\"%s\", \"phase\": \"%s\", \"batch\": %d, \"context\": %lld, \"tokens_per_s\": %.3f, "
        "\"ms_per_step\": %.4f, \"read_bw_gbs\": %.3f, \"limit_fraction\": %s}\n",
        m.model.c_str(), m.weight_dtype.c_str(), m.expert_dtype.c_str(), m.kv_dtype.c_str(),
        m.phase.c_str(), m.batch, static_cast<long long>(m.context), m.tokens_per_s, m.ms_per_step,
        m.read_bw_gbs,
        m.limit_fraction < 0 ? "null" : absl::StrFormat("%.4f", m.limit_fraction).c_str());
  } else {
    std::printf(
        "%-10s %-7s %-6s %-8s %7s %6d %8lld %11.1f %10.3f %9s\n", m.model.c_str(),
        m.weight_dtype.c_str(), m.expert_dtype.c_str(), m.kv_dtype.c_str(), m.phase.c_str(),
        m.batch, static_cast<long long>(m.context), m.tokens_per_s, m.ms_per_step,
        m.limit_fraction < 0 ? "-" : absl::StrFormat("%.1f%%", 100 * m.limit_fraction).c_str());
  }
  std::fflush(stdout);
}

// Prefill of n tokens of one fresh sequence as one step (best of 2: the first warms up).
DecodeResult BenchPrefill(Engine& engine, int64_t n, cpu::KvDType kv) {
  const ModelConfig& c = engine.config();
  double best = 1e30;
  for (int rep = 0; rep < 2; ++rep) {
    PagedCaches cache(c, kv, 1, n);
    std::vector<SequenceStep> b(1);
    b[0].cache = cache.seqs[0].get();
    for (int64_t j = 0; j < n; ++j) {
      b[0].tokens.push_back(static_cast<int32_t>((j * 17 + 3) % c.vocab_size));
    }
    std::vector<std::vector<float>> logits;
    const auto t0 = Clock::now();
    if (!engine.Step(b, &logits).ok()) std::abort();
    best = std::min(best, Seconds(t0, Clock::now()));
  }
  return {static_cast<double>(n) / best, 1000.0 * best, {}, {}, {}};
}

// Bytes of weights one batch-1 decode step reads: everything but the embedding table (one row)
// and the routed experts, plus top-k experts per MoE layer, as held (f32, bf16 or 8-bit).
double BytesPerBatch1Step(const LocalModel& m) {
  const ModelConfig& c = m.config();
  int moe_layers = 0;
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) moe_layers += c.IsMoeLayer(l);
  const double routed_all = static_cast<double>(m.experts().bytes());
  const double expert = m.experts().size() ? routed_all / m.experts().size() : 0.0;
  const double embed = static_cast<double>(m.dense().embed.bytes());
  return static_cast<double>(m.weight_bytes()) - routed_all - embed + embed / c.vocab_size +
         moe_layers * c.num_experts_per_tok * expert;
}

struct Options {
  std::string presets = "tiny,small", model_dir, cache_dir = "/tmp/dmoe-bench";
  std::vector<std::string> dtypes = {"auto"};
  std::string expert_dtype;  // empty: the weight dtype of the row
  std::vector<int> batches = {1, 16, 64};
  std::vector<int64_t> depths;  // extra batch-1 decode rows at these contexts
  cpu::KvDType kv_dtype = cpu::KvDType::kF32;
  int64_t context = 16, prefill = 512;
  int steps = 0, rounds = 1;
  bool json = false;
  // Opt-in sections.
  int distributed = 0, blas_threads = -1, kernel_rounds = 0;
  bool shard_memory = false, gemm_shapes = false;
  bool bf16_activations = false;
};

constexpr char kUsage[] = R"(usage: engine_bench [options]
Measures the in-process engine per weight dtype; prints figures, passes/fails nothing.
  --presets LIST        tiny,small (default); written once into --model-cache DIR (small: ~1.6 GB
                        bf16). v2-lite-4l: DeepSeek-V2-Lite's layer shapes in 4 layers (3.9 GB
                        bf16; products of MiB, where small's are of hundreds of KiB)
  --model DIR           a checkpoint directory instead of the presets (HF layout)
  --weight-dtype LIST   auto (default: as stored), f32, bf16, int8, fp8; one set of rows each
  --expert-dtype T      the routed experts' dtype (default: the row's weight dtype)
  --batches LIST        decode batch sizes (default 1,16,64), each sequence at --context tokens
  --context N           tokens in each sequence's cache before decoding (default 16)
  --depth LIST          extra batch-1 decode rows at these contexts (e.g. 1024)
  --prefill N           prefill of N tokens of one sequence in one step (default 512; 0: off)
  --kv-cache-dtype T    the latent KV cache: f32 (default), bf16, int8 or fp8_e4m3 (paged in
                        blocks of 16 tokens, as dmoe-attention holds it)
  --steps N             decode steps per measurement (default: 48 at batch 1, 8 beyond; 32 tiny;
                        the opt-in sections below keep their own)
  --rounds R            repeat every measurement R times, report medians (default 1)
  --bf16-activations    bf16 and fp8 weights multiply bf16-rounded activations (A16, vdpbf16ps
                        where the CPU has AVX512-BF16; kernels/cpu/bf16dot.h); their rows say
                        bf16a16 / fp8a16
  --json                one JSON object per measurement on stdout (model, weight_dtype,
                        expert_dtype, kv_dtype, phase decode|prefill, batch, context,
                        tokens_per_s, ms_per_step, read_bw_gbs, limit_fraction); the rest on stderr
The memory-bandwidth limit of a batch-1 decode step: the weight bytes it reads (everything but
the embedding table and the routed experts, plus top-k experts per MoE layer, as held) and its KV
cache bytes, over the read bandwidth of all cores. The bandwidth drifts within seconds with the
neighbours' load, so a batch-1 row's timed steps are followed by as many steps again in blocks of
up to 8, each block between two probes (the best of two 128 MiB reads by all cores, in 2 MiB
pages as the weights are held: DMOE_HUGE_PAGES=0 turns both off); limit_fraction is the median
over the blocks of their speed / the limit at the higher of their two probes (a neighbour's
burst lowers a probe, never raises it), read_bw_gbs the median of those (other rows: a 1 GiB
read at start). tokens_per_s and ms_per_step come from the timed steps alone. Near
max_position_embeddings a batch-1 row takes half the steps that fit. Load line: seconds, resident
bytes the load added and its peak (VmHWM), and how much of the anonymous memory it added lies in
2 MiB pages. Under each decode row (text output): ms per step by part, and the kernel pool's passes
per step with its idle time (the caller waiting at the ends of passes for the workers' last chunk,
and running alone between passes while the workers wait: what keeps batch 1 from the limit).
Opt-in sections (the small preset / the model loaded as stored):
  --kernel-rounds R     batch-invariant vs BLAS kernels, R alternating rounds per batch size
  --distributed N       routed experts on N dmoe-expert processes over UCX vs in-process
                        (UCX_TLS from the environment, default tcp,self); --blas-threads T for
                        the processes of that run (default CPUs / (N + 1); 0: OpenBLAS default)
  --shard-memory        resident memory of a shard hosting 1/4 of the experts and all of them
  --gemm-shapes         sgemm / invariant / small-M GFLOP/s at the expert shapes vs 2048^3
)";

template <typename T>
bool ParseList(const std::string& v, std::vector<T>* out) {
  out->clear();
  for (auto s : absl::StrSplit(v, ',')) {
    T x;
    if (!absl::SimpleAtoi(s, &x) || x <= 0) return false;
    out->push_back(x);
  }
  return !out->empty();
}

// 0: parsed; 1: --help printed; 2: a bad flag (reported).
int ParseOptions(int argc, char** argv, Options* o) {
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() { return i + 1 < argc ? std::string(argv[++i]) : std::string(); };
    bool ok = true;
    if (a == "--presets") {
      o->presets = value();
    } else if (a == "--model") {
      o->model_dir = value();
    } else if (a == "--model-cache") {
      o->cache_dir = value();
    } else if (a == "--weight-dtype") {
      o->dtypes = absl::StrSplit(value(), ',');
    } else if (a == "--expert-dtype") {
      o->expert_dtype = value();
    } else if (a == "--batches") {
      ok = ParseList(value(), &o->batches);
    } else if (a == "--depth") {
      ok = ParseList(value(), &o->depths);
    } else if (a == "--kv-cache-dtype") {
      ok = ParseKvDType(value(), &o->kv_dtype);
    } else if (a == "--context") {
      ok = absl::SimpleAtoi(value(), &o->context) && o->context > 0;
    } else if (a == "--prefill") {
      ok = absl::SimpleAtoi(value(), &o->prefill) && o->prefill >= 0;
    } else if (a == "--steps") {
      ok = absl::SimpleAtoi(value(), &o->steps) && o->steps > 0;
    } else if (a == "--rounds") {
      ok = absl::SimpleAtoi(value(), &o->rounds) && o->rounds > 0;
    } else if (a == "--json") {
      o->json = true;
    } else if (a == "--bf16-activations") {
      o->bf16_activations = true;
    } else if (a == "--distributed") {
      ok = absl::SimpleAtoi(value(), &o->distributed) && o->distributed >= 0;
    } else if (a == "--blas-threads") {
      ok = absl::SimpleAtoi(value(), &o->blas_threads) && o->blas_threads >= 0;
    } else if (a == "--kernel-rounds") {
      ok = absl::SimpleAtoi(value(), &o->kernel_rounds) && o->kernel_rounds >= 0;
    } else if (a == "--shard-memory") {
      o->shard_memory = true;
    } else if (a == "--gemm-shapes") {
      o->gemm_shapes = true;
    } else if (a == "--help" || a == "-h") {
      std::printf("%s", kUsage);
      return 1;
    } else {
      std::fprintf(stderr, "engine_bench: unknown flag %s\n%s", a.c_str(), kUsage);
      return 2;
    }
    if (!ok) {
      std::fprintf(stderr, "engine_bench: %s: bad value\n", a.c_str());
      return 2;
    }
  }
  for (const std::string& d : o->dtypes) {
    WeightDType t;
    if (!ParseWeightDType(d, &t)) {
      std::fprintf(stderr,
                   "engine_bench: --weight-dtype: \"%s\" is not auto, f32, bf16, int8 or fp8\n",
                   d.c_str());
      return 2;
    }
  }
  WeightDType t;
  if (!o->expert_dtype.empty() && !ParseWeightDType(o->expert_dtype, &t)) {
    std::fprintf(stderr, "engine_bench: --expert-dtype: bad value\n");
    return 2;
  }
  return 0;
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

uint64_t CheckpointFileBytes(const std::string& dir) {
  uint64_t n = 0;
  for (const std::string name : {"/model.safetensors"}) {
    struct stat st;
    if (::stat((dir + name).c_str(), &st) == 0) n += static_cast<uint64_t>(st.st_size);
  }
  return n;
}

// The rows of one model held one way: decode per batch size, batch-1 decode at each depth, prefill.
void MeasureModel(LocalModel& m, const Options& o, Measurement base) {
  const ModelConfig& c = m.config();
  const double weight_bytes = BytesPerBatch1Step(m);
  const double kv_bytes_per_token = static_cast<double>(
      cpu::KvRowBytes(o.kv_dtype, c.kv_lora_rank, c.qk_rope_head_dim) * c.num_hidden_layers);
  auto steps_for = [&](int b) {
    int n = o.steps > 0 ? o.steps : (c.hidden_size >= 512 ? (b == 1 ? 48 : 8) : 32);
    return n;
  };
  std::vector<std::pair<int, int64_t>> decodes;
  for (int b : o.batches) decodes.emplace_back(b, o.context);
  for (int64_t d : o.depths) decodes.emplace_back(1, d);
  for (auto [b, ctx] : decodes) {
    const int n = static_cast<int>(
        std::min<int64_t>(steps_for(b), (c.max_position_embeddings - ctx - 2) / (b == 1 ? 2 : 1)));
    if (n <= 0) continue;
    // Batch 1 is compared with the read bandwidth measured around each block of 8 steps of a
    // second pass (this machine's bandwidth drifts with its neighbours' load, within seconds):
    // the fraction is the median over the blocks of (bytes / bandwidth) / step time.
    std::vector<double> tps, ms, bws, fractions;
    DecodeResult last;
    for (int r = 0; r < o.rounds; ++r) {
      const DecodeResult d =
          BenchDecode(m.engine(), b, n, static_cast<int>(ctx), o.kv_dtype, b == 1);
      tps.push_back(d.tokens_per_s);
      ms.push_back(d.ms_per_step);
      last = d;
      // Tokens in the cache during a block: the prompt, the warm-up step, the timed steps, the
      // blocks before it and half of its own.
      double at = static_cast<double>(ctx + 1 + n);
      for (const DecodeResult::Block& k : d.paired) {
        const double bytes = weight_bytes + kv_bytes_per_token * (at + k.steps / 2.0);
        at += k.steps;
        bws.push_back(k.bw);
        fractions.push_back(k.steps * bytes / k.bw / k.secs);
      }
    }
    Measurement row = base;
    row.phase = "decode";
    row.batch = b;
    row.context = ctx;
    row.tokens_per_s = Median(tps);
    row.ms_per_step = Median(ms);
    if (!fractions.empty()) {
      row.read_bw_gbs = Median(bws) / 1e9;
      row.limit_fraction = Median(fractions);
    }
    Emit(row, o.json);
    if (!o.json) {
      const EngineTimings& t = last.timings;
      const double per = 1000.0 / n;
      std::printf(
          "    ms/step: attention %.2f, dense mlp %.2f, router %.2f, routed experts %.2f, shared "
          "%.2f, lm_head %.2f\n",
          t.attention * per, t.dense_mlp * per, t.router * per, t.routed * per, t.shared * per,
          t.lm_head * per);
      // The kernel pool's idle time: the caller waiting for the workers' last chunk, and the
      // caller working alone between passes (the workers idle then).
      const cpu::PoolStats& ps = last.pool;
      std::printf(
          "    kernel pool per step: %.1f passes (%.0f chunks); the caller waited %.0f us at the "
          "ends of passes and ran %.0f us alone between them\n",
          static_cast<double>(ps.passes) / n, static_cast<double>(ps.chunks) / n,
          static_cast<double>(ps.caller_wait_ns) / 1e3 / n,
          static_cast<double>(ps.caller_alone_ns) / 1e3 / n);
    }
  }
  if (o.prefill > 0 && o.prefill < c.max_position_embeddings) {
    std::vector<double> tps, ms;
    for (int r = 0; r < o.rounds; ++r) {
      const DecodeResult d = BenchPrefill(m.engine(), o.prefill, o.kv_dtype);
      tps.push_back(d.tokens_per_s);
      ms.push_back(d.ms_per_step);
    }
    Measurement row = base;
    row.phase = "prefill";
    row.batch = 1;
    row.context = o.prefill;
    row.tokens_per_s = Median(tps);
    row.ms_per_step = Median(ms);
    Emit(row, o.json);
  }
}

// Writes a preset's checkpoint once; returns its directory ("" on error, reported).
std::string PresetDir(const std::string& preset, const std::string& cache_dir) {
  auto config = PresetConfig(preset);
  if (!config.ok()) {
    std::fprintf(stderr, "%s\n", std::string(config.status().message()).c_str());
    return "";
  }
  const std::string dir = cache_dir + "/" + preset;
  struct stat st;
  if (::stat((dir + "/config.json").c_str(), &st) != 0) {
    std::fprintf(stderr, "writing the %s preset to %s ...\n", preset.c_str(), dir.c_str());
    TinyModelOptions t;
    t.dtype = preset.rfind("tiny", 0) == 0 ? DType::kF32 : DType::kBF16;  // (small: 1.6 GB)
    if (auto s = WriteTinyModel(dir, *config, t); !s.ok()) {
      std::fprintf(stderr, "%s\n", std::string(s.message()).c_str());
      return "";
    }
  }
  return dir;
}

// Every dtype row of one model: its load memory, then MeasureModel.
int MeasureDtypes(const std::string& name, const std::string& dir, const Options& o,
                  double read_bw) {
  FILE* info = o.json ? stderr : stdout;
  std::fprintf(info, "\n== %s (%s): checkpoint %.1f MiB\n", name.c_str(), dir.c_str(),
               CheckpointFileBytes(dir) / 1048576.0);
  for (const std::string& dt : o.dtypes) {
    LocalModelOptions lo;
    ParseWeightDType(dt, &lo.weight_dtype);
    ParseWeightDType(o.expert_dtype.empty() ? dt : o.expert_dtype, &lo.expert_dtype);
    malloc_trim(0);  // the previous row's model, freed into the heap, is not counted as this one's
    ResetPeakRss();
    const uint64_t before = StatusBytes("VmRSS:");
    const uint64_t huge_before = SmapsBytes("AnonHugePages:"),
                   anon_before = SmapsBytes("Anonymous:");
    const auto load_start = Clock::now();
    auto model = LocalModel::Load(dir, lo);
    const double load_secs = Seconds(load_start, Clock::now());
    if (!model.ok()) {
      std::fprintf(stderr, "%s\n", std::string(model.status().message()).c_str());
      return 1;
    }
    const uint64_t rss = StatusBytes("VmRSS:"), peak = StatusBytes("VmHWM:");
    Measurement base;
    base.model = name;
    base.kv_dtype = cpu::KvDTypeName(o.kv_dtype);
    base.read_bw_gbs = read_bw / 1e9;
    const LocalModel& m = **model;
    base.weight_dtype = cpu::WeightFormatName(m.dense().layers.back().o.format);
    if ((base.weight_dtype == std::string("bf16") || base.weight_dtype == std::string("fp8")) &&
        cpu::Bf16ActivationsA16()) {
      base.weight_dtype += "a16";
    }
    const auto keys = m.experts().Keys();
    base.expert_dtype =
        keys.empty()
            ? "-"
            : cpu::WeightFormatName(m.experts().Find(keys[0].first, keys[0].second)->gate.format);
    std::fprintf(
        info,
        "-- --weight-dtype %s: held %s / experts %s; weights %.1f MiB; load %.1f s added %.1f MiB "
        "resident, peak %.1f MiB (peak / resident %.3f); in 2 MiB pages %.0f of the %.0f MiB of "
        "anonymous memory it added\n",
        dt.c_str(), base.weight_dtype.c_str(), base.expert_dtype.c_str(),
        m.weight_bytes() / 1048576.0, load_secs, (rss - before) / 1048576.0,
        (peak - before) / 1048576.0,
        static_cast<double>(peak - before) / std::max<double>(1, rss - before),
        (static_cast<double>(SmapsBytes("AnonHugePages:")) - huge_before) / 1048576.0,
        (static_cast<double>(SmapsBytes("Anonymous:")) - anon_before) / 1048576.0);
    if (!o.json) {
      std::printf("%-10s %-7s %-6s %-8s %7s %6s %8s %11s %10s %9s\n", "model", "dtype", "expert",
                  "kv", "phase", "batch", "context", "tokens/s", "ms/step", "of limit");
    }
    MeasureModel(**model, o, base);
  }
  return 0;
}

int OptInSections(const std::string& preset, const std::string& dir, const Options& opt);

int Main(int argc, char** argv) {
  ReexecForHugePageMalloc(argv);  // as dmoe-expert / dmoe-attention load (common/huge_pages.h)
  Options opt;
  if (const int rc = ParseOptions(argc, argv, &opt); rc != 0) return rc == 1 ? 0 : 2;
  cpu::SetBf16Activations(opt.bf16_activations);
  const double read_bw = ReadBandwidth();
  std::fprintf(opt.json ? stderr : stdout, "read bandwidth (%d threads): %.2f GB/s\n",
               cpu::ThePool().size(), read_bw / 1e9);
  if (!opt.model_dir.empty()) {
    std::string name = opt.model_dir;
    while (!name.empty() && name.back() == '/') name.pop_back();
    name = name.substr(name.find_last_of('/') + 1);
    return MeasureDtypes(name, opt.model_dir, opt, read_bw);
  }
  for (absl::string_view preset_view : absl::StrSplit(opt.presets, ',')) {
    const std::string preset(preset_view);
    const std::string dir = PresetDir(preset, opt.cache_dir);
    if (dir.empty()) return 1;
    if (int rc = MeasureDtypes(preset, dir, opt, read_bw); rc != 0) return rc;
    if (opt.kernel_rounds + opt.distributed == 0 && !opt.shard_memory && !opt.gemm_shapes) continue;
    if (int rc = OptInSections(preset, dir, opt); rc != 0) return rc;
  }
  return 0;
}

// The opt-in sections, on the model loaded as stored.
int OptInSections(const std::string& preset, const std::string& dir, const Options& opt) {
  const int kernel_rounds = opt.kernel_rounds, distributed = opt.distributed,
            blas_threads = opt.blas_threads;
  const bool shard_memory = opt.shard_memory;
  const std::string& cache_dir = opt.cache_dir;
  const std::vector<int>& batches = opt.batches;
  const int steps = opt.steps;
  auto config = PresetConfig(preset);
  auto model = LocalModel::Load(dir, LocalModelOptions());
  if (!model.ok()) {
    std::fprintf(stderr, "%s\n", std::string(model.status().message()).c_str());
    return 1;
  }
  if (kernel_rounds > 0) {
    std::printf(
        "-- kernels: batch-invariant (default) vs BLAS (opt-in), medians of %d "
        "alternating rounds\n",
        kernel_rounds);
    std::printf("%8s %16s %16s %10s\n", "batch", "invariant tok/s", "blas tok/s", "inv/blas");
    for (int b : batches) {
      int n = steps > 0 ? steps : (config->hidden_size >= 512 ? (b == 1 ? 20 : 8) : 32);
      n = static_cast<int>(std::min<int64_t>(n, config->max_position_embeddings - 16 - 2));
      std::vector<double> inv, blas;
      for (int round = 0; round < kernel_rounds; ++round) {
        for (cpu::KernelMode m : {cpu::KernelMode::kInvariant, cpu::KernelMode::kBlas}) {
          cpu::SetKernelMode(m);
          const DecodeResult r = BenchDecode((*model)->engine(), b, n, 16);
          (m == cpu::KernelMode::kInvariant ? inv : blas).push_back(r.tokens_per_s);
        }
      }
      cpu::SetKernelMode(cpu::KernelMode::kInvariant);
      auto median = [](std::vector<double> v) {
        std::sort(v.begin(), v.end());
        return v[v.size() / 2];
      };
      std::printf("%8d %16.1f %16.1f %10.3f\n", b, median(inv), median(blas),
                  median(inv) / median(blas));
    }
  }
  if (distributed > 0) {
    setenv("UCX_NET_DEVICES", "lo", 0);
    setenv("UCX_TLS", "tcp,self", 0);
    std::vector<std::unique_ptr<ShardProcess>> shards;
    LocalModelOptions o;
    const int dist_threads =
        blas_threads >= 0 ? blas_threads : cpu::BlasThreadsShare(distributed + 1);
    for (int i = 0; i < distributed; ++i) {
      shards.push_back(std::make_unique<ShardProcess>(
          dir, std::to_string(i) + "/" + std::to_string(distributed),
          cache_dir + "/ready" + std::to_string(i) + ".json", dist_threads));
      o.expert_shards.push_back(shards.back()->grpc());
    }
    auto remote = LocalModel::Load(dir, o);
    if (!remote.ok()) {
      std::fprintf(stderr, "%s\n", std::string(remote.status().message()).c_str());
      return 1;
    }
    const int local_threads = cpu::BlasThreads();
    const int remote_threads = dist_threads > 0 ? dist_threads : local_threads;
    std::printf(
        "-- routed experts on %d dmoe-expert processes over UCX (%s, bf16 wire); OpenBLAS "
        "threads: %d in-process, %d per process distributed\n",
        distributed, std::getenv("UCX_TLS"), local_threads, remote_threads);
    std::printf("%8s %12s %14s %14s %8s\n", "batch", "tokens/s", "ms/step dist", "ms/step local",
                "ratio");
    for (int b : batches) {
      int n = steps > 0 ? steps : (config->hidden_size >= 512 ? (b == 1 ? 20 : 8) : 32);
      n = static_cast<int>(std::min<int64_t>(n, config->max_position_embeddings - 16 - 2));
      cpu::SetBlasThreads(local_threads).IgnoreError();
      const DecodeResult local = BenchDecode((*model)->engine(), b, n, 16);
      // OpenBLAS's idle workers of the in-process run spin on for ~0.1 s (2^28 cycles) after
      // its last call: let them go to sleep before the distributed run shares the CPUs.
      cpu::SetBlasThreads(remote_threads).IgnoreError();
      std::this_thread::sleep_for(std::chrono::milliseconds(300));
      const DecodeResult dist = BenchDecode((*remote)->engine(), b, n, 16);
      cpu::SetBlasThreads(local_threads).IgnoreError();
      std::printf("%8d %12.1f %14.3f %14.3f %8.2f\n", b, dist.tokens_per_s, dist.ms_per_step,
                  local.ms_per_step, dist.ms_per_step / local.ms_per_step);
    }
  }
  if (preset == "small" && shard_memory) {
    const uint64_t all_bytes = (*model)->experts().bytes();
    ShardProcess quarter(dir, "0/4", cache_dir + "/ready_q.json");
    const double q = quarter.RssMiB();
    ShardProcess all(dir, "*:*", cache_dir + "/ready_a.json");
    const double a = all.RssMiB();
    std::printf(
        "\nshard resident memory: 1/4 of the experts %.1f MiB, all experts %.1f MiB "
        "(expert bytes: all %.1f MiB, 1/4 %.1f MiB); (all - quarter) / (3/4 of the "
        "expert bytes) = %.2f\n",
        q, a, all_bytes / 1048576.0, all_bytes / 4 / 1048576.0,
        (a - q) / (0.75 * all_bytes / 1048576.0));
  }
  if (opt.gemm_shapes) {
    const double square = SgemmGflops(2048, 2048, 2048, 3);
    std::printf("\nsgemm 2048^3: %.1f GFLOP/s\n", square);
    const int d = static_cast<int>(config->hidden_size),
              im = static_cast<int>(config->moe_intermediate_size);
    std::printf("%-26s %14s %10s %16s %17s %16s\n", "shape (M x N x K)", "sgemm GFLOP/s",
                "vs square", "invariant GFLOP/s", "inv. bf16 GFLOP/s", "small-M GFLOP/s");
    for (int m : {1, 2, 8, 16, 64, 512}) {
      for (int down = 0; down < 3; ++down) {
        // Row 3: lm_head (V x D), the largest matrix a decode step reads.
        const int n = down == 2 ? static_cast<int>(config->vocab_size)
                      : down    ? d
                                : im,
                  k = down == 1 ? im : d;
        const double g = SgemmGflops(m, n, k, 20);
        std::printf("%-7s %4d x %5d x %4d %14.1f %9.1f%%",
                    down == 2 ? "lm_head"
                    : down    ? "down"
                              : "gate/up",
                    m, n, k, g, 100 * g / square);
        std::printf(" %16.1f %17.1f", InvariantGflops(m, n, k, 20),
                    InvariantGflops(m, n, k, 20, /*bf16=*/true));
        if (m <= cpu::kSmallMMax) std::printf(" %16.1f", SmallMGflops(m, n, k, 20));
        std::printf("\n");
      }
    }
  }
  return 0;
}

}  // namespace
}  // namespace dmoe

int main(int argc, char** argv) { return dmoe::Main(argc, argv); }
