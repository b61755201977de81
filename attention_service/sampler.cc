#include "attention_service/sampler.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>

#include "absl/strings/str_cat.h"
#include "kernels/cpu/invariant_gemm.h"
#include "kernels/cpu/ops.h"

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
  // (Compared without the sum: max_tokens may be as large as int64 holds.)
  if (p.max_tokens > c.max_position_embeddings - static_cast<int64_t>(prompt.size())) {
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
  if (p.stop_token_ids.size() > kMaxStopTokenIds) {
    return bad("stop_token_ids",
               absl::StrCat(p.stop_token_ids.size(), " ids; at most ", kMaxStopTokenIds));
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

// The vector forms below where the CPU has AVX2 (and tests have not capped the kernels' ISA level
// below it: cpu::SetGemmIsaForTesting); each gives its scalar form's results.
bool UseAvx2() { return cpu::GemmIsaLevel() >= 1; }

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
  if (n >= 8 && !std::isnan(logits[0]) && UseAvx2()) {
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

// Sample's scratch, shared by the samplers a thread runs (the scheduler samples its sequences one
// after another): ~1 MB at V2's vocabulary that would otherwise stay with every running request.
struct Sampler::Scratch {
  std::vector<float> processed;                 // Process's copy of the logits
  std::vector<float> w;                         // numerators by id
  std::vector<int32_t> list;                    // the candidate ids (ascending)
  std::vector<uint16_t> bucket;                 // each candidate's bucket
  std::vector<int64_t> count;                   // per bucket: tokens
  std::vector<double> mass;                     // and their mass
  std::vector<std::pair<float, int32_t>> edge;  // one bucket's tokens ranked, or the top logprobs
  std::vector<int32_t> kept;                    // the kept ids (ascending)
  std::vector<double> block;                    // the draw's block sums
};

Sampler::Scratch* Sampler::ThreadScratch() {
  thread_local Scratch scratch;
  return &scratch;
}

const float* Sampler::Process(const float* logits, int64_t vocab) {
  s_->processed.assign(logits, logits + vocab);
  auto at = [&](int32_t id) -> float& {
    if (id < 0 || id >= vocab) {  // ValidateRequest checked the ids against this vocabulary
      std::fprintf(stderr, "Sampler: token id %d is outside the vocabulary (%lld)\n", id,
                   static_cast<long long>(vocab));
      std::abort();
    }
    return s_->processed[static_cast<size_t>(id)];
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
  return s_->processed.data();
}

// ---- the draw (temperature > 0) ----
// Numerators w = exp((logit - max) / t) by cpu::ExpScaled (the same bits on every machine, 1 for
// the largest logit, 0 below e^-87). Truncation keeps a prefix of the tokens ranked by (logit
// descending, id ascending) — top_k its first k, top_p the shortest prefix of those whose mass
// reaches top_p of theirs — and then the tokens with w >= min_p. The prefix is found without
// ranking the vocabulary:
//  1. a logit threshold that provably holds it (top_k: one with at least k tokens above, by
//     counting; top_p: one below which the mass left, at most vocab * e^((L - max) / t), is under
//     a quarter of (1 - top_p) of the total), and the list of tokens above it;
//  2. those tokens in kBuckets buckets by exponent (a monotone function of the logit); only the
//     bucket where a prefix ends is ranked.
// The draw walks the kept tokens in id order (over the vocabulary: block sums first), one
// uniform draw per token. At 102400 tokens: ~0.1 ms per sequence and token at temperature 1,
// where ranking every candidate had taken ~11 ms.

namespace {

constexpr int kBuckets = 2048;
constexpr float kPerUnit = kBuckets / 88.0f;  // buckets per unit of exponent (w > 0: >= -87)
constexpr int64_t kBlock = 1024;              // ids per block of the draw's sums

// SumPositive's chains over w[0, returned) into c[8] (c zero on entry), 8 lanes at a time.
__attribute__((target("avx2"))) int64_t SumPositiveAvx2(const float* w, int64_t n, double* c) {
  __m256d lo = _mm256_setzero_pd(), hi = lo;
  const __m256 zero = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 v = _mm256_loadu_ps(w + i);
    v = _mm256_and_ps(v, _mm256_cmp_ps(v, zero, _CMP_GT_OQ));
    lo = _mm256_add_pd(lo, _mm256_cvtps_pd(_mm256_castps256_ps128(v)));
    hi = _mm256_add_pd(hi, _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
  }
  _mm256_storeu_pd(c, lo);
  _mm256_storeu_pd(c + 4, hi);
  return i;
}

// Sum of the positive w[0, n) in double (NaN counts as 0): 8 chains (i mod 8), added as
// ((c0 + c4) + (c1 + c5)) + ((c2 + c6) + (c3 + c7)); the AVX2 part does the same operations.
double SumPositive(const float* w, int64_t n) {
  double c[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t i = UseAvx2() ? SumPositiveAvx2(w, n, c) : 0; i < n; ++i) {
    c[i % 8] += w[i] > 0 ? w[i] : 0.0f;
  }
  return ((c[0] + c[4]) + (c[1] + c[5])) + ((c[2] + c[6]) + (c[3] + c[7]));
}

// The AVX2 form of AtLeast over x[0, returned), adding to *count.
__attribute__((target("avx2"))) int64_t AtLeastAvx2(const float* x, int64_t n, float least,
                                                    std::vector<int32_t>* ids, int64_t* count) {
  const __m256 f = _mm256_set1_ps(least);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    unsigned mask = static_cast<unsigned>(
        _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + i), f, _CMP_GE_OQ)));
    *count += __builtin_popcount(mask);
    for (; ids != nullptr && mask != 0; mask &= mask - 1) {
      ids->push_back(static_cast<int32_t>(i + __builtin_ctz(mask)));
    }
  }
  return i;
}

// The ids i < n with x[i] >= least into *ids (ascending), or only their count when ids is null.
int64_t AtLeast(const float* x, int64_t n, float least, std::vector<int32_t>* ids) {
  if (ids != nullptr) ids->clear();
  int64_t count = 0;
  for (int64_t i = UseAvx2() ? AtLeastAvx2(x, n, least, ids, &count) : 0; i < n; ++i) {
    if (x[i] >= least) {
      ++count;
      if (ids != nullptr) ids->push_back(static_cast<int32_t>(i));
    }
  }
  return count;
}

// Inserts (x[i], i) into the ranked list *top (at most n long) when it ranks above its last.
inline void Offer(const float* x, int64_t i, size_t n,
                  std::vector<std::pair<float, int32_t>>* top) {
  const float l = x[i];
  if (std::isnan(l) || (top->size() == n && !(l > top->back().first))) return;
  const auto at =
      std::upper_bound(top->begin(), top->end(), l,
                       [](float v, const std::pair<float, int32_t>& e) { return v > e.first; });
  top->insert(at, {l, static_cast<int32_t>(i)});
  if (top->size() > n) top->pop_back();
}

// The n largest (x[i], i) ranked (logit descending, id ascending; NaN never), in one pass: 8
// values at a time are compared with the list's last, and only those above it are offered.
__attribute__((target("avx2"))) void TopLogitsAvx2(const float* x, int64_t vocab, size_t n,
                                                   std::vector<std::pair<float, int32_t>>* top) {
  int64_t i = 0;
  for (; i < vocab && top->size() < n; ++i) Offer(x, i, n, top);
  for (; i + 8 <= vocab; i += 8) {
    const __m256 last = _mm256_set1_ps(top->back().first);
    unsigned mask = static_cast<unsigned>(
        _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + i), last, _CMP_GT_OQ)));
    for (; mask != 0; mask &= mask - 1) Offer(x, i + __builtin_ctz(mask), n, top);
  }
  for (; i < vocab; ++i) Offer(x, i, n, top);
}

void TopLogits(const float* x, int64_t vocab, int64_t n,
               std::vector<std::pair<float, int32_t>>* top) {
  top->clear();
  if (n <= 0) return;
  if (UseAvx2()) return TopLogitsAvx2(x, vocab, static_cast<size_t>(n), top);
  for (int64_t i = 0; i < vocab; ++i) Offer(x, i, static_cast<size_t>(n), top);
}

}  // namespace

void Sampler::RankBucket(const float* logits, int bucket, int64_t need) {
  auto& edge = s_->edge;
  edge.clear();
  for (size_t j = 0; j < s_->list.size(); ++j) {
    if (s_->bucket[j] == bucket) edge.emplace_back(logits[s_->list[j]], s_->list[j]);
  }
  // (nearly every token in one bucket when the logits span < 0.04 temperature units: top_k then
  // ranks only its k)
  const auto end = edge.begin() + std::min<int64_t>(need, static_cast<int64_t>(edge.size()));
  if (end != edge.end()) std::nth_element(edge.begin(), end, edge.end(), ByLogit);
  std::sort(edge.begin(), end, ByLogit);
}

bool Sampler::ListCandidates(const float* logits, int64_t vocab, float mx, double total) {
  const double t = p_.temperature;
  const double deepest = mx - 87.0 * t;  // below: w == 0
  double least = deepest;
  if (p_.top_k > 0 && p_.top_k < vocab) {
    for (double units = 8; units < 87; units *= 2) {
      if (AtLeast(logits, vocab, static_cast<float>(mx - units * t), nullptr) >= p_.top_k) {
        least = mx - units * t;
        break;
      }
    }
  } else {
    // The tokens below L hold at most vocab * exp((L - mx) / t) (times ~1 + 2e-5 for the float
    // argument's and exp's rounding): a quarter of what top_p leaves out, at most.
    least = std::max(deepest, mx + t * std::log((1.0 - p_.top_p) * total / (4.0 * vocab)));
  }
  if (least <= deepest) return false;
  AtLeast(logits, vocab, static_cast<float>(least), &s_->list);
  return true;
}

Sampler::Prefix Sampler::Truncate(const float* logits, int64_t vocab, float mx, float inv_t,
                                  double total) {
  Prefix all;
  const bool by_k = p_.top_k > 0 && p_.top_k < vocab;
  const bool by_p = p_.top_p < 1.0;
  if (!by_k && !by_p) return all;
  if (!ListCandidates(logits, vocab, mx, total)) {
    s_->list.resize(static_cast<size_t>(vocab));
    for (int64_t i = 0; i < vocab; ++i) s_->list[static_cast<size_t>(i)] = static_cast<int32_t>(i);
  }
  // Buckets by exponent a = (logit - mx) * inv_t (ExpScaled's argument: a <= 0, larger logits
  // in lower buckets, equal logits in one); w == 0 (or NaN) in none.
  s_->bucket.resize(s_->list.size());
  s_->count.assign(kBuckets, 0);
  s_->mass.assign(kBuckets, 0.0);
  for (size_t j = 0; j < s_->list.size(); ++j) {
    const int32_t i = s_->list[j];
    const float w = s_->w[static_cast<size_t>(i)];
    if (!(w > 0)) {
      s_->bucket[j] = kBuckets;
      continue;
    }
    const float a = (logits[i] - mx) * inv_t;
    const int b = std::min(kBuckets - 1, static_cast<int>(-a * kPerUnit));
    s_->bucket[j] = static_cast<uint16_t>(b);
    ++s_->count[static_cast<size_t>(b)];
    s_->mass[static_cast<size_t>(b)] += w;
  }
  // top_k: the bucket where the k-th token falls, ranked; the prefix's mass on the way.
  Prefix cut;
  int last = kBuckets;  // the buckets [0, last) and (when cut.bounded) s_->edge[0, taken) are kept
  int64_t taken = 0;
  double kept = 0;
  int64_t n = 0;
  for (int b = 0; b < kBuckets; ++b) {
    const int64_t c = s_->count[static_cast<size_t>(b)];
    if (by_k && n + c >= p_.top_k) {
      taken = p_.top_k - n;
      RankBucket(logits, b, taken);
      for (int64_t j = 0; j < taken; ++j) kept += s_->w[static_cast<size_t>(s_->edge[j].second)];
      cut = {true, s_->edge[static_cast<size_t>(taken - 1)].first,
             s_->edge[static_cast<size_t>(taken - 1)].second};
      last = b;
      break;
    }
    n += c;
    kept += s_->mass[static_cast<size_t>(b)];
  }
  if (!by_k) kept = total;  // (the list's own mass would leave out the tail below it)
  if (!by_p) return cut;
  // top_p: the shortest prefix (within top_k's) whose mass reaches top_p of the kept mass.
  const double target = p_.top_p * kept;
  double acc = 0;
  for (int b = 0; b <= std::min(last, kBuckets - 1); ++b) {
    const bool edge_bucket = b == last;  // top_k's bucket: only its first `taken` tokens
    double m = 0;
    if (edge_bucket) {
      for (int64_t j = 0; j < taken; ++j) m += s_->w[static_cast<size_t>(s_->edge[j].second)];
    } else {
      m = s_->mass[static_cast<size_t>(b)];
    }
    if (acc + m < target) {
      acc += m;
      continue;
    }
    if (!edge_bucket) {
      RankBucket(logits, b, std::numeric_limits<int64_t>::max());  // (walked until the target)
      taken = static_cast<int64_t>(s_->edge.size());
    }
    for (int64_t j = 0; j < taken; ++j) {
      acc += s_->w[static_cast<size_t>(s_->edge[j].second)];
      if (acc >= target || j + 1 == taken) {
        return {true, s_->edge[static_cast<size_t>(j)].first,
                s_->edge[static_cast<size_t>(j)].second};
      }
    }
  }
  return cut;  // (rounding: the whole top_k prefix)
}

int32_t Sampler::SampleTruncated(const float* logits, int64_t vocab) {
  const int32_t best = ArgMax(logits, vocab);
  const float mx = logits[best];
  const float inv_t = static_cast<float>(1.0 / p_.temperature);
  s_->w.resize(static_cast<size_t>(vocab));
  cpu::ExpScaled(logits, vocab, mx, inv_t, s_->w.data());
  const double total = SumPositive(s_->w.data(), vocab);
  if (!(total > 0)) {  // (every numerator 0 or NaN: +inf or NaN logits); still one draw
    std::uniform_real_distribution<double>(0.0, 1.0)(rng_);
    return best;
  }
  const Prefix cut = Truncate(logits, vocab, mx, inv_t, total);
  const float least = static_cast<float>(p_.min_p);  // (the largest w is 1)
  if (cut.bounded || least > 0) {
    // The kept tokens lie in s_->list (the prefix) or are those with w >= min_p.
    if (!cut.bounded) AtLeast(s_->w.data(), vocab, least, &s_->list);
    s_->kept.clear();
    double sum = 0;
    for (const int32_t i : s_->list) {
      const float w = s_->w[static_cast<size_t>(i)], l = logits[i];
      const bool in = !cut.bounded || l > cut.logit || (l == cut.logit && i <= cut.id);
      if (in && w > 0 && w >= least) {
        s_->kept.push_back(i);
        sum += w;
      }
    }
    const double u = std::uniform_real_distribution<double>(0.0, sum)(rng_);
    // (never empty: the best token has w 1, is first in any prefix and min_p <= 1; kept defensive)
    if (s_->kept.empty()) return best;
    double acc = 0;
    for (const int32_t i : s_->kept) {
      acc += s_->w[static_cast<size_t>(i)];
      if (u < acc) return i;
    }
    return s_->kept.back();
  }
  // Every token: block sums, then the walk inside the block where u falls.
  const int64_t blocks = (vocab + kBlock - 1) / kBlock;
  s_->block.resize(static_cast<size_t>(blocks));
  double sum = 0;
  for (int64_t k = 0; k < blocks; ++k) {
    const int64_t i0 = k * kBlock;
    sum += s_->block[static_cast<size_t>(k)] =
        SumPositive(s_->w.data() + i0, std::min(kBlock, vocab - i0));
  }
  const double u = std::uniform_real_distribution<double>(0.0, sum)(rng_);
  double acc = 0;
  int32_t last = best;  // the last token passed (rounding can leave u at the very end)
  for (int64_t k = 0; k < blocks; ++k) {
    const double m = s_->block[static_cast<size_t>(k)];
    if (m <= 0) continue;
    if (u >= acc + m && k + 1 < blocks) {
      acc += m;
      continue;
    }
    for (int64_t i = k * kBlock; i < std::min(vocab, (k + 1) * kBlock); ++i) {
      const float w = s_->w[static_cast<size_t>(i)];
      if (!(w > 0)) continue;
      acc += w;
      last = static_cast<int32_t>(i);
      if (u < acc) return last;
    }
  }
  return last;
}

void Sampler::AddLogprobs(const float* logits, int64_t vocab, SampledToken* out) {
  // log-softmax of the (processed) logits at temperature 1: numerators by ExpScaled, their sum
  // in double.
  const float mx = logits[ArgMax(logits, vocab)];
  s_->w.resize(static_cast<size_t>(vocab));
  cpu::ExpScaled(logits, vocab, mx, 1.0f, s_->w.data());
  const double lz = mx + std::log(SumPositive(s_->w.data(), vocab));
  out->logprob = static_cast<float>(logits[out->token] - lz);
  if (p_.top_logprobs <= 0) return;
  TopLogits(logits, vocab, p_.top_logprobs, &s_->edge);
  for (const auto& [logit, id] : s_->edge) {
    if (!std::isfinite(logit)) break;  // masked out (JSON mode): fewer than top_logprobs allowed
    out->top.emplace_back(id, static_cast<float>(logit - lz));
  }
}

SampledToken Sampler::Sample(const float* model_logits, int64_t vocab) {
  s_ = ThreadScratch();
  SampledToken out;
  // Without bias or penalties the model's logits are used as they are (no copy).
  const float* logits = biased_ || penalized_ ? Process(model_logits, vocab) : model_logits;
  const bool greedy = p_.temperature == 0.0 || p_.top_k == 1;
  // Greedy: the largest logit, ties to the lowest id.
  out.token = greedy ? ArgMax(logits, vocab) : SampleTruncated(logits, vocab);
  if (p_.logprobs || p_.top_logprobs > 0) AddLogprobs(logits, vocab, &out);
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
  s_ = ThreadScratch();
  SampledToken out;
  const float* logits = biased_ || penalized_ ? Process(model_logits, vocab) : model_logits;
  *accepted = true;
  out.token = draft;
  if (p_.logprobs || p_.top_logprobs > 0) AddLogprobs(logits, vocab, &out);
  if (penalized_) ++seen_[out.token];
  return out;
}

SampledToken Sampler::Score(const float* logits, int64_t vocab, int32_t token) {
  s_ = ThreadScratch();
  SampledToken out;
  out.token = token;
  AddLogprobs(logits, vocab, &out);
  return out;
}

}  // namespace dmoe
