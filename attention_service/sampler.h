// Token sampling on the attention node: logit_bias, repetition/frequency/presence penalties,
// greedy, temperature, top-k, top-p, min-p, per-request seeds, logprobs. Each request owns its
// Sampler (its own random stream and token counts), so a seeded request draws the same tokens
// whatever else shares its batch. The penalties follow vLLM's (and OpenAI's) definitions.
#ifndef DMOE_ATTENTION_SERVICE_SAMPLER_H_
#define DMOE_ATTENTION_SERVICE_SAMPLER_H_

#include <cstdint>
#include <map>
#include <random>
#include <unordered_map>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "model/config.h"

namespace dmoe {

// The most top logprobs a request may ask for per token (OpenAI's limit).
inline constexpr int64_t kMaxTopLogprobs = 20;
// Stop tokens are scanned for every generated token; a request carries at most this many.
inline constexpr size_t kMaxStopTokenIds = 1024;

struct SamplingParams {
  double temperature = 0.0;  // 0: greedy (ties to the lowest id)
  int64_t top_k = 0;         // 0: off
  double top_p = 1.0;        // (0, 1]
  double min_p = 0.0;        // [0, 1]: drop tokens below min_p * p(max)
  uint64_t seed = 0;
  int64_t max_tokens = 16;
  // max_tokens is only a default: the scheduler lowers it to what the KV cache holds.
  bool max_tokens_up_to_cache = false;
  std::vector<int32_t> stop_token_ids;
  bool ignore_eos = false;   // don't stop at the model's eos_token_ids
  bool logprobs = false;     // logprob of the chosen token
  int64_t top_logprobs = 0;  // and of the n most likely tokens
  // The logprob (and top_logprobs alternatives) of every prompt token from the second on, from
  // the model's logits (Sampler::Score); the prompt is then computed whole (no prefix cache).
  bool prompt_logprobs = false;
  // JSON mode: every token keeps the answer a prefix of one JSON object, and the answer ends
  // (finish "stop") where the object closes (json_constraint.h; needs the node's tokenizer).
  bool json_object = false;
  // Applied to the model's logits in this order, before temperature and the truncations:
  //  1. logit_bias: bias[id] in [-100, 100] is added to logit[id] (-100 all but bans a token).
  //  2. repetition_penalty r > 0 (1: off): every id in the prompt or generated so far has
  //     logit > 0 ? logit / r : logit * r (r > 1 discourages repeats).
  //  3. frequency_penalty f, presence_penalty p in [-2, 2] (0: off), over generated tokens only:
  //     logit[id] -= f * (times id was generated) + p * (1 if it was generated at all).
  std::map<int32_t, float> logit_bias;
  double repetition_penalty = 1.0;
  double frequency_penalty = 0.0;
  double presence_penalty = 0.0;
};

// INVALID_ARGUMENT naming the field: empty prompt, token id >= vocab_size, prompt + max_tokens >
// max_position_embeddings, temperature < 0, top_p outside (0, 1], top_k < 0, min_p outside
// [0, 1], max_tokens <= 0, top_logprobs outside [0, 20], stop token ids outside the vocabulary,
// presence_penalty or frequency_penalty outside [-2, 2], repetition_penalty not positive and
// finite, logit_bias keys outside the vocabulary or values outside [-100, 100] (NaN fails all).
absl::Status ValidateRequest(const std::vector<int32_t>& prompt, const SamplingParams& p,
                             const ModelConfig& c);

// True when `token` ends the request: one of its stop_token_ids or, unless ignore_eos, one of
// the model's eos_token_ids.
bool IsStopToken(const SamplingParams& p, const ModelConfig& c, int32_t token);

// The id with the largest logit; ties go to the lowest id. A NaN never compares larger (a NaN
// at id 0 gives 0, as a loop of `>` from id 0 does).
int32_t ArgMax(const float* logits, int64_t n);

struct SampledToken {
  int32_t token = 0;
  // log-softmax (temperature 1) of the processed logits: after logit_bias and the penalties,
  // before temperature and truncation. When none of those is set, the model's logits.
  float logprob = 0;                           // when asked for
  std::vector<std::pair<int32_t, float>> top;  // (id, logprob), most likely first
  // Set by the scheduler: the token ends the generation (an eos or stop_token_ids token); it is
  // returned and counted, but adds no text (as vLLM's without include_stop_str_in_output).
  bool stop = false;
};

// Thread-compatible.
class Sampler {
 public:
  // `prompt` feeds repetition_penalty (read only in the constructor). REQUIRES: `p` passed
  // ValidateRequest with this prompt.
  Sampler(const SamplingParams& p, const std::vector<int32_t>& prompt);
  // No prompt: repetition_penalty then sees only the generated tokens. For callers that set no
  // penalties (local_model.cc's offline loop).
  explicit Sampler(const SamplingParams& p) : Sampler(p, {}) {}

  // Picks the next token from `logits` [vocab] and counts it as generated, so call it exactly
  // once per generated token (recomputing a sequence's KV must not call it again).
  SampledToken Sample(const float* logits, int64_t vocab);

  // Speculative decoding: the next token given the target `logits` and a `draft` token chosen
  // deterministically (a point-mass draft distribution q = δ(draft)). The standard rejection rule
  // — accept the draft with probability min(1, p(draft) / q(draft)) = p(draft), else draw from
  // p with the draft removed — gives the pair (accepted, token) exactly the distribution of "draw
  // the token from p; accepted iff it is the draft", and that is how it is computed: with
  // Sample's own draw. So a request's tokens are the same bits with or without speculation,
  // whatever its drafts were (greedy: the argmax). Counts the token as Sample does.
  // `force` (benchmarks only): +1 emits the draft as accepted whatever p says, -1 rejects it.
  SampledToken Verify(const float* logits, int64_t vocab, int32_t draft, bool* accepted,
                      int force = 0);

  // A given token's logprob and the top_logprobs alternatives under the model's `logits` (no
  // bias, penalty or temperature: prompt logprobs, as vLLM computes them); not counted as
  // generated.
  SampledToken Score(const float* logits, int64_t vocab, int32_t token);

 private:
  // logit_bias and the penalties applied to a copy of `logits` (the scratch's); returns it.
  const float* Process(const float* logits, int64_t vocab);
  // A prefix of the tokens ranked by (logit descending, id ascending): every token ranked no
  // later than (logit, id) when bounded, else all.
  struct Prefix {
    bool bounded = false;
    float logit = 0;
    int32_t id = 0;
  };
  // Sample's parts: a draw from the temperature / top-k / top-p / min-p truncated distribution
  // (sampler.cc says how); the prefix that top_k and top_p keep (the scratch's w holds the
  // numerators); the tokens of one bucket ranked into the scratch's edge; the chosen token's
  // logprob and the top alternatives.
  int32_t SampleTruncated(const float* logits, int64_t vocab);
  Prefix Truncate(const float* logits, int64_t vocab, float mx, float inv_t, double total);
  // The scratch's list = the ids above a logit threshold that holds the prefix; false: every id
  // may be needed.
  bool ListCandidates(const float* logits, int64_t vocab, float mx, double total);
  // The candidates of one bucket into the scratch's edge, its first `need` ranked.
  void RankBucket(const float* logits, int bucket, int64_t need);
  void AddLogprobs(const float* logits, int64_t vocab, SampledToken* out);
  SamplingParams p_;
  std::mt19937_64 rng_;
  // Scratch (sampler.cc): the calling thread's, set by Sample and Verify.
  struct Scratch;
  static Scratch* ThreadScratch();
  Scratch* s_ = nullptr;
  bool biased_ = false;     // any logit_bias: Process copies the logits
  bool penalized_ = false;  // any penalty: seen_ is kept, Process copies the logits
  // Ids in the prompt (count 0, only when repetition_penalty is on) or generated (times
  // generated). Empty unless penalized_.
  std::unordered_map<int32_t, int32_t> seen_;
};

}  // namespace dmoe

#endif  // DMOE_ATTENTION_SERVICE_SAMPLER_H_
