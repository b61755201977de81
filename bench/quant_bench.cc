// Quantization benchmark: prints figures, passes/fails nothing. For each weight / KV-cache format,
// measured in this one run against fp32:
//   memory: KV bytes per token (allocator) vs the formula; expert bytes held and the resident set
//           of a dmoe-expert hosting every expert, vs the formula;
//   accuracy (tiny and small presets, a fixed prompt set, 64 generated tokens per prompt):
//           teacher-forced on the fp32 greedy tokens: rms and max |dlogit| and the top-1
//           agreement rate per position; free-running greedy: tokens equal to fp32's, and the
//           identical prefix length;
//   speed: decode tokens/s at batch 1 and 64.
#include <sys/stat.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_split.h"
#include "attention_service/kv_cache.h"
#include "attention_service/local_model.h"
#include "bench/shard_process.h"
#include "model/tiny_model.h"

namespace dmoe {
namespace {

using Clock = std::chrono::steady_clock;

struct Config {
  const char* name;
  WeightDType weights;  // dense projections and routed experts
  cpu::KvDType kv;
};

const Config kConfigs[] = {
    {"f32", WeightDType::kF32, cpu::KvDType::kF32},
    {"int8 weights", WeightDType::kInt8, cpu::KvDType::kF32},
    {"fp8 weights", WeightDType::kFp8, cpu::KvDType::kF32},
    {"bf16 cache", WeightDType::kF32, cpu::KvDType::kBf16},
    {"int8 cache", WeightDType::kF32, cpu::KvDType::kInt8},
    {"fp8 cache", WeightDType::kF32, cpu::KvDType::kFp8},
    {"int8 w + int8 cache", WeightDType::kInt8, cpu::KvDType::kInt8},
    {"fp8 w + fp8 cache", WeightDType::kFp8, cpu::KvDType::kFp8},
};

// Greedy generation of `n` tokens for every prompt at once (one batch), through a paged cache of
// `kv`. With `forced`, the tokens fed back are forced[i] instead of the argmax (teacher forcing).
struct Run {
  std::vector<std::vector<int32_t>> tokens;             // [prompt][n]
  std::vector<std::vector<std::vector<float>>> logits;  // [prompt][n][V]
};

Run Generate(Engine& engine, cpu::KvDType kv, const std::vector<std::vector<int32_t>>& prompts,
             int n, const std::vector<std::vector<int32_t>>* forced, bool keep_logits) {
  const ModelConfig& c = engine.config();
  LatentKvCache cache(c, 16, static_cast<int64_t>(prompts.size()) * 16, kv);
  std::vector<std::unique_ptr<PagedKvSequence>> seqs;
  std::vector<SequenceStep> batch(prompts.size());
  for (size_t i = 0; i < prompts.size(); ++i) {
    seqs.push_back(std::make_unique<PagedKvSequence>(&cache));
    batch[i].cache = seqs.back().get();
    batch[i].tokens = prompts[i];
  }
  Run r;
  r.tokens.resize(prompts.size());
  r.logits.resize(prompts.size());
  std::vector<std::vector<float>> logits;
  for (int step = 0; step < n; ++step) {
    if (!engine.Step(batch, &logits).ok()) std::abort();
    for (size_t i = 0; i < prompts.size(); ++i) {
      const int32_t t = ArgMax(logits[i].data(), c.vocab_size);
      r.tokens[i].push_back(t);
      if (keep_logits) r.logits[i].push_back(logits[i]);
      batch[i].tokens.assign(1, forced ? (*forced)[i][static_cast<size_t>(step)] : t);
    }
  }
  return r;
}

double DecodeTokensPerSecond(Engine& engine, cpu::KvDType kv, int batch, int steps) {
  const ModelConfig& c = engine.config();
  LatentKvCache cache(c, 16, batch * 8, kv);
  std::vector<std::unique_ptr<PagedKvSequence>> seqs;
  std::vector<SequenceStep> b(static_cast<size_t>(batch));
  for (int i = 0; i < batch; ++i) {
    seqs.push_back(std::make_unique<PagedKvSequence>(&cache));
    b[static_cast<size_t>(i)].cache = seqs.back().get();
    for (int j = 0; j < 32; ++j) {
      b[static_cast<size_t>(i)].tokens.push_back((i * 131 + j * 17 + 3) % 500);
    }
  }
  std::vector<std::vector<float>> logits;
  auto step = [&] {
    if (!engine.Step(b, &logits).ok()) std::abort();
    for (int i = 0; i < batch; ++i) {
      b[static_cast<size_t>(i)].tokens.assign(
          1, ArgMax(logits[static_cast<size_t>(i)].data(), c.vocab_size));
    }
  };
  step();  // prefill
  step();  // warm-up
  const auto t0 = Clock::now();
  for (int s = 0; s < steps; ++s) step();
  return batch * steps / std::chrono::duration<double>(Clock::now() - t0).count();
}

uint64_t ExpertFormulaBytes(const ModelConfig& c, WeightDType w) {
  const uint64_t d = static_cast<uint64_t>(c.hidden_size), i = c.moe_intermediate_size;
  uint64_t moe = 0;
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) moe += c.IsMoeLayer(l);
  const uint64_t n = moe * static_cast<uint64_t>(c.n_routed_experts);
  const uint64_t params = 3 * d * i;
  auto blocks = [](uint64_t a, uint64_t b) { return ((a + 127) / 128) * ((b + 127) / 128); };
  switch (w) {
    case WeightDType::kInt8:
      return n * (params + 4 * (i + i + d));
    case WeightDType::kFp8:
      return n * (params + 4 * (2 * blocks(i, d) + blocks(d, i)));
    default:
      return n * 4 * params;
  }
}

int Main(int argc, char** argv) {
  std::string presets = "tiny,small", cache_dir = "/tmp/dmoe-bench";
  int tokens = 64;
  bool shards = true;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() { return i + 1 < argc ? std::string(argv[++i]) : std::string(); };
    if (a == "--presets") {
      presets = value();
    } else if (a == "--model-cache") {
      cache_dir = value();
    } else if (a == "--tokens") {
      tokens = std::max(1, std::atoi(value().c_str()));
    } else if (a == "--no-shards") {
      shards = false;
    } else {
      std::printf(
          "usage: quant_bench [--presets tiny,small] [--tokens 64] [--model-cache DIR] "
          "[--no-shards]\n"
          "Accuracy, memory and decode speed of int8 / fp8 weights and an int8 / fp8 latent KV\n"
          "cache against fp32, all measured in this run (see the top of bench/quant_bench.cc).\n");
      return a == "--help" || a == "-h" ? 0 : 2;
    }
  }
  // KV bytes per token: DeepSeek-V2 by the formula (60 layers, r = 512, dr = 64).
  std::printf("KV cache bytes per token, DeepSeek-V2 (60 layers x (512 + 64)):\n");
  for (cpu::KvDType t :
       {cpu::KvDType::kF32, cpu::KvDType::kBf16, cpu::KvDType::kInt8, cpu::KvDType::kFp8}) {
    const int64_t row = cpu::KvRowBytes(t, 512, 64);
    std::printf("  %-9s %4lld B/token/layer, %6lld B/token (%.2fx fp32, %.2fx bf16)\n",
                cpu::KvDTypeName(t), static_cast<long long>(row), static_cast<long long>(60 * row),
                static_cast<double>(row) / 2304, static_cast<double>(row) / 1152);
  }
  for (absl::string_view pv : absl::StrSplit(presets, ',')) {
    const std::string preset(pv);
    auto config = PresetConfig(preset);
    if (!config.ok()) return 2;
    const ModelConfig& c = *config;
    const std::string dir = cache_dir + "/" + preset;
    struct stat st;
    if (::stat((dir + "/config.json").c_str(), &st) != 0) {
      std::printf("writing the %s preset to %s ...\n", preset.c_str(), dir.c_str());
      std::fflush(stdout);
      TinyModelOptions o;
      o.dtype = preset == "small" ? DType::kBF16 : DType::kF32;
      if (!WriteTinyModel(dir, c, o).ok()) return 1;
    }
    std::printf("\n== preset %s\n", preset.c_str());
    std::printf(
        "KV bytes per token (allocator / formula layers x 4 (r + dr), 2 (r + dr), "
        "(r + 4 ceil(r/128) + 2 dr)):\n");
    for (cpu::KvDType t :
         {cpu::KvDType::kF32, cpu::KvDType::kBf16, cpu::KvDType::kInt8, cpu::KvDType::kFp8}) {
      LatentKvCache cache(c, 16, 1, t);
      const int64_t r = c.kv_lora_rank, dr = c.qk_rope_head_dim;
      const int64_t formula = t == cpu::KvDType::kF32 ? c.num_hidden_layers * 4 * (r + dr)
                              : t == cpu::KvDType::kBf16
                                  ? c.num_hidden_layers * 2 * (r + dr)
                                  : c.num_hidden_layers * (r + 4 * ((r + 127) / 128) + 2 * dr);
      std::printf("  %-9s %llu / %lld\n", cpu::KvDTypeName(t),
                  static_cast<unsigned long long>(cache.bytes_per_token()),
                  static_cast<long long>(formula));
    }
    // Prompts: 8 of 8-40 tokens.
    std::vector<std::vector<int32_t>> prompts;
    for (int p = 0; p < 8; ++p) {
      std::vector<int32_t> q;
      for (int j = 0; j < 8 + 4 * p; ++j) q.push_back((p * 977 + j * 131 + 11) % 500);
      prompts.push_back(q);
    }
    Run base;
    std::printf("%-20s %9s %9s %10s %9s %9s %11s %9s %9s %12s\n", "config", "rms dlog", "max dlog",
                "top1 agree", "greedy eq", "prefix", "weights MiB", "tok/s b1", "tok/s b64",
                "vs f32 b1/b64");
    double base_b1 = 0, base_b64 = 0;
    for (const Config& cfg : kConfigs) {
      LocalModelOptions o;
      o.weight_dtype = cfg.weights;
      o.expert_dtype = cfg.weights;
      auto model = LocalModel::Load(dir, o);
      if (!model.ok()) {
        std::fprintf(stderr, "%s\n", std::string(model.status().message()).c_str());
        return 1;
      }
      Engine& engine = (*model)->engine();
      const bool is_base = cfg.weights == WeightDType::kF32 && cfg.kv == cpu::KvDType::kF32;
      double rms = 0, mx = 0, agree = 0, eq = 0, prefix = 0, logit_rms = 0;
      if (is_base) {
        base = Generate(engine, cfg.kv, prompts, tokens, nullptr, true);
        double s2 = 0, n = 0;
        for (const auto& p : base.logits)
          for (const auto& l : p)
            for (float v : l) {
              s2 += static_cast<double>(v) * v;
              ++n;
            }
        logit_rms = std::sqrt(s2 / n);
        std::printf("(fp32 logit rms %.3f)\n", logit_rms);
      } else {
        const Run forced = Generate(engine, cfg.kv, prompts, tokens, &base.tokens, true);
        double s2 = 0, n = 0, positions = 0;
        for (size_t p = 0; p < prompts.size(); ++p) {
          for (int t = 0; t < tokens; ++t) {
            const auto& a = forced.logits[p][static_cast<size_t>(t)];
            const auto& b = base.logits[p][static_cast<size_t>(t)];
            for (size_t v = 0; v < a.size(); ++v) {
              const double d = static_cast<double>(a[v]) - b[v];
              s2 += d * d;
              mx = std::max(mx, std::fabs(d));
              ++n;
            }
            agree +=
                forced.tokens[p][static_cast<size_t>(t)] == base.tokens[p][static_cast<size_t>(t)];
            ++positions;
          }
        }
        rms = std::sqrt(s2 / n);
        agree /= positions;
        const Run free = Generate(engine, cfg.kv, prompts, tokens, nullptr, false);
        for (size_t p = 0; p < prompts.size(); ++p) {
          int same = 0, first = tokens;
          for (int t = 0; t < tokens; ++t) {
            const bool e =
                free.tokens[p][static_cast<size_t>(t)] == base.tokens[p][static_cast<size_t>(t)];
            same += e;
            if (!e && first == tokens) first = t;
          }
          eq += static_cast<double>(same) / tokens;
          prefix += first;
        }
        eq /= static_cast<double>(prompts.size());
        prefix /= static_cast<double>(prompts.size());
      }
      const int b1_steps = preset == "small" ? 16 : 48, b64_steps = preset == "small" ? 4 : 16;
      double b1 = 0, b64 = 0;  // best of 3: this machine is shared and noisy
      for (int rep = 0; rep < 3; ++rep) {
        b1 = std::max(b1, DecodeTokensPerSecond(engine, cfg.kv, 1, b1_steps));
        b64 = std::max(b64, DecodeTokensPerSecond(engine, cfg.kv, 64, b64_steps));
      }
      if (is_base) {
        base_b1 = b1;
        base_b64 = b64;
        std::printf("%-20s %9s %9s %10s %9s %9s %11.1f %9.1f %9.1f %12s\n", cfg.name, "-", "-", "-",
                    "-", "-", static_cast<double>((*model)->weight_bytes()) / (1 << 20), b1, b64,
                    "1.00/1.00");
      } else {
        std::printf("%-20s %9.4f %9.4f %9.1f%% %8.1f%% %9.1f %11.1f %9.1f %9.1f %6.2f/%.2f\n",
                    cfg.name, rms, mx, 100 * agree, 100 * eq, prefix,
                    static_cast<double>((*model)->weight_bytes()) / (1 << 20), b1, b64,
                    b1 / base_b1, b64 / base_b64);
      }
      std::fflush(stdout);
    }
    if (shards) {
      std::printf("expert shard hosting every expert (dmoe-expert --experts 0/1):\n");
      for (auto [w, name] : {std::pair{WeightDType::kF32, "f32"},
                             {WeightDType::kInt8, "int8"},
                             {WeightDType::kFp8, "fp8"}}) {
        ServiceProcess shard("expert_service/dmoe-expert",
                             {"--model", dir, "--experts", "0/1", "--expert-dtype", name},
                             "/tmp/dmoe-quant-bench-shard.json");
        if (shard.grpc().empty()) {
          std::printf("  %s: the shard did not start\n", name);
          continue;
        }
        std::printf("  %-5s resident %8.1f MiB; expert weights by the formula %8.1f MiB\n", name,
                    shard.RssMiB(), static_cast<double>(ExpertFormulaBytes(c, w)) / (1 << 20));
      }
    }
  }
  return 0;
}

}  // namespace
}  // namespace dmoe

int main(int argc, char** argv) { return dmoe::Main(argc, argv); }
