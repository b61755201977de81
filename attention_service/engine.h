// The DeepSeek-V2 layer loop for a batch of sequences: embeddings -> (MLA -> FFN) x L -> lm_head.
// Attention and dense parts run here; routed experts go through a RoutedExperts backend, so the
// same engine runs with experts in-process or remote.
#ifndef DMOE_ATTENTION_SERVICE_ENGINE_H_
#define DMOE_ATTENTION_SERVICE_ENGINE_H_

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "attention_service/kv_cache.h"
#include "expert_service/routed_experts.h"
#include "kernels/cpu/gating.h"
#include "kernels/cpu/mla.h"
#include "kernels/cpu/rope.h"
#include "model/config.h"
#include "model/weights.h"

namespace dmoe {

enum class AttentionForm {
  kAuto,      // naive for multi-token chunks (prefill), absorbed for single tokens (decode)
  kNaive,     // always the naive form
  kAbsorbed,  // always the weight-absorbed form
};

struct EngineOptions {
  AttentionForm attention_form = AttentionForm::kAuto;
};

// One sequence's part of a step: its cache and the tokens to append.
struct SequenceStep {
  KvSequence* cache = nullptr;
  std::vector<int32_t> tokens;
  bool all_logits = false;  // logits for every new token, else only for the last one
};

// Seconds spent per phase, summed over all steps since the last reset.
struct EngineTimings {
  double attention = 0;  // projections, RoPE, MLA, o_proj
  double dense_mlp = 0;  // first dense layers
  double router = 0;     // gate logits + expert selection
  double shared = 0;     // shared experts (overlapping the remote experts' work)
  double routed = 0;     // waiting for the routed experts after the shared ones
  double lm_head = 0;    // final norm + lm_head
};

// Thread-compatible: one Step at a time. The engine does not own weights or experts.
class Engine {
 public:
  Engine(const ModelConfig& config, const DenseWeights* weights, RoutedExperts* experts,
         EngineOptions options = {});

  const ModelConfig& config() const { return config_; }
  const EngineTimings& timings() const { return timings_; }
  void ResetTimings() { timings_ = EngineTimings(); }

  // Runs the new tokens of every sequence through the model, appending their latent KV to each
  // cache. logits->at(i) is [n_i, V] (all_logits) or [1, V]. INVALID_ARGUMENT for an empty
  // token list, a token id outside [0, vocab_size), or a sequence growing past
  // max_position_embeddings; RESOURCE_EXHAUSTED when a paged cache has no room. On error no
  // sequence's length changes (rows may stay reserved).
  absl::Status Step(std::vector<SequenceStep>& batch, std::vector<std::vector<float>>* logits);

  // One full causal forward of `tokens` from an empty cache: logits [T, V].
  absl::StatusOr<std::vector<float>> Forward(const std::vector<int32_t>& tokens);

 private:
  void Attention(int64_t layer, std::vector<SequenceStep>& batch, const float* x, float* out);
  absl::Status Ffn(int64_t layer, const float* x, int64_t n, float* out);

  ModelConfig config_;
  const DenseWeights* w_;
  RoutedExperts* experts_;
  EngineOptions options_;
  cpu::RopeTable rope_;
  cpu::GateParams gate_;
  EngineTimings timings_;
  // Scratch reused across steps.
  std::vector<float> h_, x_, tmp_, q_, qa_, kva_, attn_, router_, gate_w_, scratch_;
  std::vector<int32_t> gate_ids_;
  std::vector<float> decode_q_, decode_o_, lm_out_, rotated_;
  std::vector<int64_t> decode_rows_, decode_ctx_;
  std::vector<cpu::LatentRows> decode_caches_;
};

}  // namespace dmoe

#endif  // DMOE_ATTENTION_SERVICE_ENGINE_H_
