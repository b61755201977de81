// Attention-node benchmark (prints figures):
//  1. KV memory: bytes per cached token and tokens resident per GiB for the DeepSeek-V2 shape with
//     the MLA latent cache, next to a standard MHA cache and an 8-group GQA cache of the same
//     model, from the configs and from LatentKvCache's own counters.
//  2. Decode throughput of a 64-sequence batch with two micro-batches in ping-pong divided by one
//     batch, with the experts on 2 dmoe-expert processes over UCX, in one run.
#include <chrono>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "attention_service/kv_cache.h"
#include "attention_service/local_model.h"
#include "bench/shard_process.h"
#include "model/tiny_model.h"

namespace dmoe {
namespace {

using Clock = std::chrono::steady_clock;

ModelConfig V2Config() {
  ModelConfig c;  // MODEL_SPEC.md's published V2 shape
  c.vocab_size = 102400;
  c.hidden_size = 5120;
  c.num_hidden_layers = 60;
  c.num_attention_heads = 128;
  c.num_key_value_heads = 128;
  c.q_lora_rank = 1536;
  c.kv_lora_rank = 512;
  c.qk_nope_head_dim = 128;
  c.qk_rope_head_dim = 64;
  c.v_head_dim = 128;
  return c;
}

void KvAccounting() {
  const ModelConfig c = V2Config();
  const double gib = 1024.0 * 1024 * 1024;
  const int64_t mla = c.kv_lora_rank + c.qk_rope_head_dim;
  const int64_t mha = c.num_attention_heads * (c.q_head_dim() + c.v_head_dim);
  const int64_t gqa = 8 * (c.q_head_dim() + c.v_head_dim);
  std::printf("== KV cache per token, DeepSeek-V2 shape (%lld layers)\n",
              static_cast<long long>(c.num_hidden_layers));
  std::printf("%-34s %10s %14s %16s %16s\n", "cache", "values/L", "bytes/token", "tokens/GiB fp32",
              "tokens/GiB bf16");
  for (const auto& [name, values] :
       std::vector<std::pair<const char*, int64_t>>{{"MLA latent (c_kv + k_pe)", mla},
                                                    {"MHA (H*(dn+dr) + H*dv)", mha},
                                                    {"GQA, 8 groups", gqa}}) {
    const double bytes = static_cast<double>(values) * c.num_hidden_layers * 4;
    std::printf("%-34s %10lld %14.0f %16.0f %16.0f\n", name, static_cast<long long>(values), bytes,
                gib / bytes, gib / (bytes / 2));
  }
  std::printf("MHA / MLA = %.1fx, GQA-8 / MLA = %.1fx the bytes per token\n",
              static_cast<double>(mha) / mla, static_cast<double>(gqa) / mla);
  // The allocator's own counters for a real 256 MiB cache of the V2 shape (fp32 storage).
  const int64_t block_tokens = 16;
  const uint64_t budget = 256ull << 20;
  const int64_t blocks = LatentKvCache::BlocksForBytes(c, block_tokens, budget);
  LatentKvCache cache(c, block_tokens, blocks);
  std::vector<std::unique_ptr<PagedKvSequence>> seqs;
  int64_t resident = 0;
  while (true) {  // fill it with 100-token sequences
    auto s = std::make_unique<PagedKvSequence>(&cache);
    if (!s->Reserve(100).ok()) break;
    s->Advance(100);
    resident += 100;
    seqs.push_back(std::move(s));
  }
  std::printf(
      "allocator: %llu bytes/token, %lld blocks of %lld tokens in 256 MiB, %lld tokens of "
      "100-token sequences resident -> %.0f tokens/GiB (block rounding included)\n\n",
      static_cast<unsigned long long>(cache.bytes_per_token()), static_cast<long long>(blocks),
      static_cast<long long>(block_tokens), static_cast<long long>(resident),
      resident * gib / budget);
}

double DecodeTokensPerSecond(LocalModel& m, bool ping_pong, int batch, int steps) {
  const ModelConfig& c = m.config();
  std::vector<std::unique_ptr<SequenceKvCache>> caches;
  std::vector<SequenceStep> all;
  for (int i = 0; i < batch; ++i) {
    caches.push_back(std::make_unique<SequenceKvCache>(c));
    std::vector<int32_t> prompt;
    for (int j = 0; j < 16; ++j) prompt.push_back((i * 131 + j * 17 + 3) % c.vocab_size);
    all.push_back(SequenceStep{caches.back().get(), prompt, false});
  }
  std::vector<std::vector<float>> logits;
  if (!m.engine().Step(all, &logits).ok()) return -1;
  std::vector<SequenceStep> a(all.begin(), all.begin() + batch / 2),
      b(all.begin() + batch / 2, all.end());
  std::vector<std::vector<float>> la, lb;
  auto next = [&](std::vector<SequenceStep>& part, std::vector<std::vector<float>>& l) {
    for (size_t i = 0; i < part.size(); ++i) part[i].tokens = {ArgMax(l[i].data(), c.vocab_size)};
  };
  for (size_t i = 0; i < a.size(); ++i) a[i].tokens = {ArgMax(logits[i].data(), c.vocab_size)};
  for (size_t i = 0; i < b.size(); ++i)
    b[i].tokens = {ArgMax(logits[a.size() + i].data(), c.vocab_size)};
  const auto t0 = Clock::now();
  for (int s = 0; s < steps; ++s) {
    if (ping_pong) {
      if (!m.engine().StepPingPong(a, b, m.second_experts(), &la, &lb).ok()) return -1;
    } else {
      if (!m.engine().Step(a, &la).ok() || !m.engine().Step(b, &lb).ok()) return -1;
    }
    next(a, la);
    next(b, lb);
  }
  return batch * steps / std::chrono::duration<double>(Clock::now() - t0).count();
}

int Main(int argc, char** argv) {
  std::string cache_dir = "/tmp/dmoe-bench";
  std::string presets = "tiny";
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--presets" && i + 1 < argc) {
      presets = argv[++i];
    } else if (a == "--model-cache" && i + 1 < argc) {
      cache_dir = argv[++i];
    } else {
      std::printf("usage: attention_bench [--presets tiny[,small]] [--model-cache DIR]\n");
      return a == "--help" ? 0 : 2;
    }
  }
  KvAccounting();
  setenv("UCX_NET_DEVICES", "lo", 0);
  setenv("UCX_TLS", "tcp,self", 0);
  for (const char* name : {"tiny", "small"}) {
    const std::string preset = name;
    if (presets.find(preset) == std::string::npos) continue;
    const std::string dir = cache_dir + "/" + preset;
    if (FILE* f = std::fopen((dir + "/config.json").c_str(), "r")) {
      std::fclose(f);
    } else {
      TinyModelOptions o;
      o.dtype = preset == "small" ? DType::kBF16 : DType::kF32;
      if (!WriteTinyModel(dir, *PresetConfig(preset), o).ok()) return 1;
    }
    ShardProcess s0(dir, "0/2", cache_dir + "/attn_ready0.json");
    ShardProcess s1(dir, "1/2", cache_dir + "/attn_ready1.json");
    LocalModelOptions o;
    o.expert_shards = {s0.grpc(), s1.grpc()};
    auto model = LocalModel::Load(dir, o);
    if (!model.ok()) {
      std::fprintf(stderr, "%s\n", std::string(model.status().message()).c_str());
      return 1;
    }
    const int steps = preset == "small" ? 6 : 40;
    const double plain = DecodeTokensPerSecond(**model, false, 64, steps);
    const double overlap = DecodeTokensPerSecond(**model, true, 64, steps);
    std::printf(
        "== %s, 64 sequences decoding, experts on 2 dmoe-expert processes (UCX %s, bf16)\n"
        "one micro-batch at a time: %.1f tokens/s; two in ping-pong: %.1f tokens/s; "
        "ratio %.2f\n",
        preset.c_str(), std::getenv("UCX_TLS"), plain, overlap, overlap / plain);
  }
  return 0;
}

}  // namespace
}  // namespace dmoe

int main(int argc, char** argv) { return dmoe::Main(argc, argv); }
