// The DeepSeek-V2 layer loop for a batch of sequences: embeddings -> (MLA -> FFN) x L -> lm_head.
// Attention and dense parts run here; routed experts go through a RoutedExperts backend, so the
// same engine runs with experts in-process or remote.
#ifndef DMOE_ATTENTION_SERVICE_ENGINE_H_
#define DMOE_ATTENTION_SERVICE_ENGINE_H_

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "expert_service/routed_experts.h"
#include "kernels/cpu/gating.h"
#include "kernels/cpu/mla.h"
#include "kernels/cpu/rope.h"
#include "model/config.h"
#include "model/weights.h"

namespace dmoe {

// A simple per-sequence latent KV cache: per layer [length, kv_lora_rank + qk_rope_head_dim]
// (c_kv after kv_a_layernorm, then the rotated k_pe). The paged cache replaces it later.
class SequenceKvCache {
 public:
  explicit SequenceKvCache(const ModelConfig& c)
      : row_(c.latent_dim()), layers_(static_cast<size_t>(c.num_hidden_layers)) {}
  int64_t length() const { return length_; }
  int64_t row_size() const { return row_; }
  const float* layer(int64_t l) const { return layers_[static_cast<size_t>(l)].data(); }
  // Bytes held (all layers).
  uint64_t bytes() const { return static_cast<uint64_t>(length_) * row_ * layers_.size() * 4; }

 private:
  friend class Engine;
  int64_t row_;
  int64_t length_ = 0;
  std::vector<std::vector<float>> layers_;
};

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
  SequenceKvCache* cache = nullptr;
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
  // max_position_embeddings; on error no cache is changed.
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
  std::vector<const float*> decode_caches_;
};

}  // namespace dmoe

#endif  // DMOE_ATTENTION_SERVICE_ENGINE_H_
