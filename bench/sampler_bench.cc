// The sampler's cost per sequence and token (Google Benchmark): what the attention node's
// scheduler spends on one thread for each sequence of a step, after the model's logits are in.
// Vocabularies of the presets and checkpoints (32000: small; 102400: DeepSeek-V2 / V2-Lite;
// 129280: V3 / R1), at the settings clients send (OpenAI's default is temperature 1, top_p 1).
// BM_RankEveryCandidate is the baseline beside it: every candidate ranked (what this sampler did
// until 2026-12), the same draw.
//   bazel run -c opt //bench:sampler_bench [-- --benchmark_filter=102400]
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <random>
#include <vector>

#include "attention_service/sampler.h"

namespace dmoe {
namespace {

// Logits shaped like a trained model's: a broad body (normal, std 2.5) and a few dozen tokens
// well above it, so that top-p 0.9 keeps tens of tokens and temperature 1 spreads over thousands.
std::vector<float> Logits(int64_t vocab, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> body(0.0f, 2.5f);
  std::vector<float> x(static_cast<size_t>(vocab));
  for (float& v : x) v = body(rng);
  std::uniform_int_distribution<int64_t> id(0, vocab - 1);
  for (int i = 0; i < 40; ++i)
    x[static_cast<size_t>(id(rng))] += 8.0f + 0.2f * static_cast<float>(i);
  return x;
}

enum Mode { kGreedy, kTemperature1, kTopP, kTopK, kLogprobs, kPenalties };

SamplingParams Params(Mode m) {
  SamplingParams p;
  p.seed = 7;
  switch (m) {
    case kGreedy:
      break;
    case kTemperature1:
      p.temperature = 1.0;
      break;
    case kTopP:
      p.temperature = 0.7;
      p.top_p = 0.9;
      break;
    case kTopK:
      p.temperature = 0.8;
      p.top_k = 50;
      break;
    case kLogprobs:
      p.temperature = 1.0;
      p.logprobs = true;
      p.top_logprobs = 5;
      break;
    case kPenalties:
      p.temperature = 1.0;
      p.top_p = 0.95;
      p.repetition_penalty = 1.1;
      p.frequency_penalty = 0.5;
      break;
  }
  return p;
}

void BM_Sample(benchmark::State& state) {
  const int64_t vocab = state.range(0);
  const Mode mode = static_cast<Mode>(state.range(1));
  std::vector<std::vector<float>> rows;
  for (uint64_t s = 0; s < 8; ++s) rows.push_back(Logits(vocab, s + 1));
  std::vector<int32_t> prompt;
  for (int32_t i = 0; i < 200; ++i) prompt.push_back(static_cast<int32_t>((i * 7919) % vocab));
  // A request of 512 generated tokens after a 200-token prompt, again and again (the penalties'
  // state grows with the request).
  auto sampler = std::make_unique<Sampler>(Params(mode), prompt);
  size_t i = 0;
  for (auto _ : state) {
    if (++i % 512 == 0) sampler = std::make_unique<Sampler>(Params(mode), prompt);
    const SampledToken t = sampler->Sample(rows[i % rows.size()].data(), vocab);
    benchmark::DoNotOptimize(t.token);
  }
  state.SetLabel(mode == kGreedy         ? "greedy"
                 : mode == kTemperature1 ? "temperature 1"
                 : mode == kTopP         ? "t 0.7, top_p 0.9"
                 : mode == kTopK         ? "t 0.8, top_k 50"
                 : mode == kLogprobs     ? "t 1, logprobs, top 5"
                                         : "t 1, top_p 0.95, penalties");
}

// The baseline, side by side: what the sampler did before (and what a plain implementation does),
// ranking every candidate within 30 temperature units of the best by (logit, id), then the same
// draw over the ranked list. Temperature 1 and (t 0.7, top_p 0.9) only.
void BM_RankEveryCandidate(benchmark::State& state) {
  const int64_t vocab = state.range(0);
  const SamplingParams p = Params(static_cast<Mode>(state.range(1)));
  std::vector<std::vector<float>> rows;
  for (uint64_t s = 0; s < 8; ++s) rows.push_back(Logits(vocab, s + 1));
  std::mt19937_64 rng(p.seed);
  std::vector<std::pair<float, int32_t>> order;
  std::vector<double> probs;
  size_t i = 0;
  for (auto _ : state) {
    const float* l = rows[i++ % rows.size()].data();
    order.resize(static_cast<size_t>(vocab));
    for (int64_t j = 0; j < vocab; ++j)
      order[static_cast<size_t>(j)] = {l[j], static_cast<int32_t>(j)};
    const float mx = *std::max_element(l, l + vocab);
    const double cutoff = mx - 30.0 * p.temperature;
    const auto mid =
        std::partition(order.begin(), order.end(),
                       [&](const std::pair<float, int32_t>& a) { return a.first >= cutoff; });
    std::sort(order.begin(), mid,
              [](const std::pair<float, int32_t>& a, const std::pair<float, int32_t>& b) {
                return a.first != b.first ? a.first > b.first : a.second < b.second;
              });
    int64_t keep = mid - order.begin();
    probs.resize(static_cast<size_t>(keep));
    double sum = 0;
    for (int64_t j = 0; j < keep; ++j) {
      sum += probs[static_cast<size_t>(j)] =
          std::exp((order[static_cast<size_t>(j)].first - mx) / p.temperature);
    }
    if (p.top_p < 1.0) {
      double acc = 0;
      int64_t n = 0;
      while (n < keep) {
        acc += probs[static_cast<size_t>(n++)] / sum;
        if (acc >= p.top_p) break;
      }
      keep = n;
    }
    double kept = 0;
    for (int64_t j = 0; j < keep; ++j) kept += probs[static_cast<size_t>(j)];
    const double u = std::uniform_real_distribution<double>(0.0, kept)(rng);
    double acc = 0;
    int32_t token = order[static_cast<size_t>(keep - 1)].second;
    for (int64_t j = 0; j < keep; ++j) {
      acc += probs[static_cast<size_t>(j)];
      if (u < acc) {
        token = order[static_cast<size_t>(j)].second;
        break;
      }
    }
    benchmark::DoNotOptimize(token);
  }
  state.SetLabel(state.range(1) == kTemperature1 ? "baseline: temperature 1"
                                                 : "baseline: t 0.7, top_p 0.9");
}

BENCHMARK(BM_RankEveryCandidate)
    ->ArgsProduct({{32000, 102400, 129280}, {kTemperature1, kTopP}})
    ->Unit(benchmark::kMicrosecond);

BENCHMARK(BM_Sample)
    ->ArgsProduct({{32000, 102400, 129280},
                   {kGreedy, kTemperature1, kTopP, kTopK, kLogprobs, kPenalties}})
    ->Unit(benchmark::kMicrosecond);

}  // namespace
}  // namespace dmoe

BENCHMARK_MAIN();
