// Token sampling on the attention node: greedy, temperature, top-k, top-p, min-p, per-request
// seeds, logprobs. Each request owns its Sampler (its own random stream), so a seeded request
// draws the same tokens whatever else shares its batch.
#ifndef DMOE_ATTENTION_SERVICE_SAMPLER_H_
#define DMOE_ATTENTION_SERVICE_SAMPLER_H_

#include <cstdint>
#include <random>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "model/config.h"

namespace dmoe {

// The most top logprobs a request may ask for per token (OpenAI's limit).
inline constexpr int64_t kMaxTopLogprobs = 20;

struct SamplingParams {
  double temperature = 0.0;  // 0: greedy (ties to the lowest id)
  int64_t top_k = 0;         // 0: off
  double top_p = 1.0;        // (0, 1]
  double min_p = 0.0;        // [0, 1]: drop tokens below min_p * p(max)
  uint64_t seed = 0;
  int64_t max_tokens = 16;
  std::vector<int32_t> stop_token_ids;
  bool ignore_eos = false;   // don't stop at the model's eos_token_ids
  bool logprobs = false;     // logprob of the chosen token
  int64_t top_logprobs = 0;  // and of the n most likely tokens
};

// INVALID_ARGUMENT naming the field: empty prompt, token id >= vocab_size, prompt + max_tokens >
// max_position_embeddings, temperature < 0, top_p outside (0, 1], top_k < 0, min_p outside
// [0, 1], max_tokens <= 0, top_logprobs outside [0, 20], stop token ids outside the vocabulary.
absl::Status ValidateRequest(const std::vector<int32_t>& prompt, const SamplingParams& p,
                             const ModelConfig& c);

// True when `token` ends the request: one of its stop_token_ids or, unless ignore_eos, one of
// the model's eos_token_ids.
bool IsStopToken(const SamplingParams& p, const ModelConfig& c, int32_t token);

struct SampledToken {
  int32_t token = 0;
  float logprob = 0;  // log-softmax of the model's logits (temperature 1), when asked for
  std::vector<std::pair<int32_t, float>> top;  // (id, logprob), most likely first
};

// Thread-compatible.
class Sampler {
 public:
  explicit Sampler(const SamplingParams& p) : p_(p), rng_(p.seed) {}
  SampledToken Sample(const float* logits, int64_t vocab);

 private:
  // Sample's parts: a draw from the temperature/top-k/top-p/min-p truncated distribution; the
  // chosen token's logprob and the top alternatives (order_ already sorted when `sorted_top`).
  int32_t SampleTruncated(const float* logits, int64_t vocab);
  void AddLogprobs(const float* logits, int64_t vocab, bool sorted_top, SampledToken* out);
  SamplingParams p_;
  std::mt19937_64 rng_;
  std::vector<std::pair<float, int32_t>> order_;
  std::vector<double> probs_;
};

}  // namespace dmoe

#endif  // DMOE_ATTENTION_SERVICE_SAMPLER_H_
