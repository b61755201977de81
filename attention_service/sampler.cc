#include "attention_service/sampler.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>

#include "absl/strings/str_cat.h"

namespace dmoe {

bool IsStopToken(const SamplingParams& p, const ModelConfig& c, int32_t token) {
  if (std::find(p.stop_token_ids.begin(), p.stop_token_ids.end(), token) !=
      p.stop_token_ids.end()) {
    return true;
  }
  return !p.ignore_eos &&
         std::find(c.eos_token_ids.begin(), c.eos_token_ids.end(), token) != c.eos_token_ids.end();
}

namespace {

absl::Status ValidatePenalties(const SamplingParams& p, const ModelConfig& c) {
  auto bad = [](absl::string_view field, absl::string_view what) {
    return absl::InvalidArgumentError(absl::StrCat(field, ": ", what));
  };
  // Written so that NaN fails; infinities are outside the ranges.
  if (!(p.presence_penalty >= -2 && p.presence_penalty <= 2)) {
    return bad("presence_penalty", absl::StrCat(p.presence_penalty, " is not in [-2, 2]"));
  }
  if (!(p.frequency_penalty >= -2 && p.frequency_penalty <= 2)) {
    return bad("frequency_penalty", absl::StrCat(p.frequency_penalty, " is not in [-2, 2]"));
  }
  if (!(p.repetition_penalty > 0) || !std::isfinite(p.repetition_penalty)) {
    return bad("repetition_penalty",
               absl::StrCat(p.repetition_penalty, " is not positive or not finite"));
  }
  for (const auto& [id, bias] : p.logit_bias) {
    if (id < 0 || id >= c.vocab_size) {
      return bad("logit_bias", absl::StrCat("token id ", id, " is outside the vocabulary"));
    }
    if (!(bias >= -100 && bias <= 100)) {
      return bad(absl::StrCat("logit_bias[", id, "]"),
                 absl::StrCat(bias, " is not in [-100, 100]"));
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status ValidateRequest(const std::vector<int32_t>& prompt, const SamplingParams& p,
                             const ModelConfig& c) {
  auto bad = [](absl::string_view field, absl::string_view what) {
    return absl::InvalidArgumentError(absl::StrCat(field, ": ", what));
  };
  if (prompt.empty()) return bad("prompt", "is empty");
  for (size_t i = 0; i < prompt.size(); ++i) {
    if (prompt[i] < 0 || prompt[i] >= c.vocab_size) {
      return bad(
          absl::StrCat("prompt[", i, "]"),
          absl::StrCat("token id ", prompt[i], " is outside [0, vocab_size ", c.vocab_size, ")"));
    }
  }
  if (p.max_tokens <= 0) return bad("max_tokens", absl::StrCat(p.max_tokens, " is not positive"));
  if (static_cast<int64_t>(prompt.size()) + p.max_tokens > c.max_position_embeddings) {
    return bad("max_tokens",
               absl::StrCat("prompt (", prompt.size(), ") + max_tokens (", p.max_tokens,
                            ") exceeds max_position_embeddings ", c.max_position_embeddings));
  }
  if (!(p.temperature >= 0) || !std::isfinite(p.temperature)) {
    return bad("temperature", absl::StrCat(p.temperature, " is negative or not finite"));
  }
  if (!(p.top_p > 0 && p.top_p <= 1))
    return bad("top_p", absl::StrCat(p.top_p, " is not in (0, 1]"));
  if (p.top_k < 0) return bad("top_k", absl::StrCat(p.top_k, " is negative"));
  if (!(p.min_p >= 0 && p.min_p <= 1))
    return bad("min_p", absl::StrCat(p.min_p, " is not in [0, 1]"));
  if (p.top_logprobs < 0 || p.top_logprobs > std::min<int64_t>(kMaxTopLogprobs, c.vocab_size)) {
    return bad("top_logprobs", absl::StrCat(p.top_logprobs, " is not in [0, ",
                                            std::min<int64_t>(kMaxTopLogprobs, c.vocab_size), "]"));
  }
  for (size_t i = 0; i < p.stop_token_ids.size(); ++i) {
    if (p.stop_token_ids[i] < 0 || p.stop_token_ids[i] >= c.vocab_size) {
      return bad(absl::StrCat("stop_token_ids[", i, "]"),
                 absl::StrCat(p.stop_token_ids[i], " is outside the vocabulary"));
    }
  }
  return ValidatePenalties(p, c);
}

namespace {

// Descending logit; ties keep the lower id first.
bool ByLogit(const std::pair<float, int32_t>& a, const std::pair<float, int32_t>& b) {
  return a.first != b.first ? a.first > b.first : a.second < b.second;
}

}  // namespace

namespace {

// The first index of the largest value (NaN never wins), 8 lanes at a time: the maximum (maxps
// returns its second operand when the first is NaN, so NaNs are skipped), then the first index
// equal to it (-0 and +0 compare equal, as `>` in the scalar loop sees them).
__attribute__((target("avx2"))) int64_t ArgMaxAvx2(const float* x, int64_t n) {
  __m256 m = _mm256_set1_ps(x[0]);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) m = _mm256_max_ps(_mm256_loadu_ps(x + i), m);
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, m);
  float best = lanes[0];
  for (float v : lanes) best = v > best ? v : best;
  for (; i < n; ++i) best = x[i] > best ? x[i] : best;
  const __m256 b = _mm256_set1_ps(best);
  for (i = 0; i + 8 <= n; i += 8) {
    const int mask = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + i), b, _CMP_EQ_OQ));
    if (mask != 0) return i + __builtin_ctz(static_cast<unsigned>(mask));
  }
  for (; i < n; ++i) {
    if (x[i] == best) return i;
  }
  return 0;  // (not reached: best is one of the values)
}

}  // namespace

int32_t ArgMax(const float* logits, int64_t n) {
  // (a sequence's greedy token each step: 32000 - 129280 values, once a scalar chain of compares)
  static const bool avx2 = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") != 0;
  }();
  if (n >= 8 && !std::isnan(logits[0]) && avx2) {
    return static_cast<int32_t>(ArgMaxAvx2(logits, n));
  }
  int64_t best = 0;
  for (int64_t i = 1; i < n; ++i) {
    if (logits[i] > logits[best]) best = i;
  }
  return static_cast<int32_t>(best);
}

Sampler::Sampler(const SamplingParams& p, const std::vector<int32_t>& prompt)
    : p_(p),
      rng_(p.seed),
      biased_(!p.logit_bias.empty()),
      penalized_(p.repetition_penalty != 1.0 || p.frequency_penalty != 0.0 ||
                 p.presence_penalty != 0.0) {
  if (p.repetition_penalty != 1.0) {
    for (int32_t id : prompt) seen_.emplace(id, 0);
  }
}

const float* Sampler::Process(const float* logits, int64_t vocab) {
  processed_.assign(logits, logits + vocab);
  auto at = [&](int32_t id) -> float& {
    if (id < 0 || id >= vocab) {  // ValidateRequest checked the ids against this vocabulary
      std::fprintf(stderr, "Sampler: token id %d is outside the vocabulary (%lld)\n", id,
                   static_cast<long long>(vocab));
      std::abort();
    }
    return processed_[static_cast<size_t>(id)];
  };
  for (const auto& [id, bias] : p_.logit_bias) at(id) += bias;
  const float r = static_cast<float>(p_.repetition_penalty);
  const float f = static_cast<float>(p_.frequency_penalty);
  const float pp = static_cast<float>(p_.presence_penalty);
  for (const auto& [id, n] : seen_) {
    float& x = at(id);
    if (p_.repetition_penalty != 1.0) x = x > 0 ? x / r : x * r;
    if (n > 0) {  // in vLLM's order and precision (float)
      x -= f * static_cast<float>(n);
      x -= pp;
    }
  }
  return processed_.data();
}

int64_t Sampler::Distribution(const float* logits, int64_t vocab) {
  // Temperature, then the truncations, on probabilities in descending order. Tokens more than
  // 30 temperature-units below the best have relative probability < e^-30 (below what a double
  // draw resolves); they are left out instead of sorting the whole vocabulary every token.
  const double t = p_.temperature;
  float mx = logits[0];
  for (int64_t i = 1; i < vocab; ++i) mx = std::max(mx, logits[i]);
  const double cutoff = mx - 30.0 * t;
  const auto mid =
      std::partition(order_.begin(), order_.end(),
                     [&](const std::pair<float, int32_t>& a) { return a.first >= cutoff; });
  int64_t keep = mid - order_.begin();
  if (p_.top_k > 0 && p_.top_k < keep) {
    std::partial_sort(order_.begin(), order_.begin() + p_.top_k, mid, ByLogit);
    keep = p_.top_k;
  } else {
    std::sort(order_.begin(), mid, ByLogit);
  }
  probs_.resize(static_cast<size_t>(keep));
  double sum = 0;
  for (int64_t i = 0; i < keep; ++i) {
    sum += probs_[static_cast<size_t>(i)] =
        std::exp((order_[static_cast<size_t>(i)].first - mx) / t);
  }
  // Probabilities relative to the full (top-k truncated) distribution.
  if (p_.top_p < 1.0) {
    double acc = 0;
    int64_t n = 0;
    while (n < keep) {
      acc += probs_[static_cast<size_t>(n)] / sum;
      ++n;
      if (acc >= p_.top_p) break;
    }
    keep = n;
  }
  if (p_.min_p > 0) {
    const double floor = p_.min_p * probs_[0];
    int64_t n = 1;
    while (n < keep && probs_[static_cast<size_t>(n)] >= floor) ++n;
    keep = n;
  }
  return keep;
}

int32_t Sampler::SampleTruncated(const float* logits, int64_t vocab) {
  const int64_t keep = Distribution(logits, vocab);
  double kept = 0;
  for (int64_t i = 0; i < keep; ++i) kept += probs_[static_cast<size_t>(i)];
  const double u = std::uniform_real_distribution<double>(0.0, kept)(rng_);
  double acc = 0;
  for (int64_t i = 0; i < keep; ++i) {
    acc += probs_[static_cast<size_t>(i)];
    if (u < acc) return order_[static_cast<size_t>(i)].second;
  }
  return order_[static_cast<size_t>(keep - 1)].second;
}

void Sampler::AddLogprobs(const float* logits, int64_t vocab, bool sorted_top, SampledToken* out) {
  // log-softmax of the (processed) logits at temperature 1, in double.
  double mx = logits[0];
  for (int64_t i = 1; i < vocab; ++i) mx = std::max(mx, static_cast<double>(logits[i]));
  double z = 0;
  for (int64_t i = 0; i < vocab; ++i) z += std::exp(logits[i] - mx);
  const double lz = mx + std::log(z);
  out->logprob = static_cast<float>(logits[out->token] - lz);
  if (!sorted_top && p_.top_logprobs > 0) {  // the kept range may be shorter than top_logprobs
    std::partial_sort(order_.begin(), order_.begin() + p_.top_logprobs, order_.end(), ByLogit);
  }
  for (int64_t i = 0; i < p_.top_logprobs; ++i) {
    const auto& [logit, id] = order_[static_cast<size_t>(i)];
    out->top.emplace_back(id, static_cast<float>(logit - lz));
  }
}

const float* Sampler::Candidates(const float* model_logits, int64_t vocab) {
  // Without bias or penalties the model's logits are used as they are (no copy).
  const float* logits = biased_ || penalized_ ? Process(model_logits, vocab) : model_logits;
  // Candidates sorted by logit, descending; ties keep the lower id first.
  order_.resize(static_cast<size_t>(vocab));
  for (int64_t i = 0; i < vocab; ++i) {
    order_[static_cast<size_t>(i)] = {logits[i], static_cast<int32_t>(i)};
  }
  return logits;
}

SampledToken Sampler::Sample(const float* model_logits, int64_t vocab) {
  SampledToken out;
  const bool greedy = p_.temperature == 0.0 || p_.top_k == 1;
  if (greedy && p_.top_logprobs == 0) {
    // The same token as the candidates' partial sort below (largest logit, ties to the lowest
    // id), without ordering the whole vocabulary: ~100 us less per sequence and token at 32000.
    const float* logits = biased_ || penalized_ ? Process(model_logits, vocab) : model_logits;
    out.token = ArgMax(logits, vocab);
    if (p_.logprobs) AddLogprobs(logits, vocab, false, &out);  // (no top logprobs: no order_)
    if (penalized_) ++seen_[out.token];
    return out;
  }
  const float* logits = Candidates(model_logits, vocab);
  if (greedy) {
    std::partial_sort(order_.begin(), order_.begin() + std::max<int64_t>(1, p_.top_logprobs),
                      order_.end(), ByLogit);
    out.token = order_[0].second;
  } else {
    out.token = SampleTruncated(logits, vocab);
  }
  if (p_.logprobs || p_.top_logprobs > 0) AddLogprobs(logits, vocab, greedy, &out);
  if (penalized_) ++seen_[out.token];
  return out;
}

SampledToken Sampler::Verify(const float* model_logits, int64_t vocab, int32_t draft,
                             bool* accepted, int force) {
  if (force <= 0) {
    const SampledToken out = Sample(model_logits, vocab);
    *accepted = force == 0 && out.token == draft;
    return out;
  }
  SampledToken out;
  const float* logits = Candidates(model_logits, vocab);
  *accepted = true;
  out.token = draft;
  if (p_.logprobs || p_.top_logprobs > 0) AddLogprobs(logits, vocab, false, &out);
  if (penalized_) ++seen_[out.token];
  return out;
}

}  // namespace dmoe
