// The DeepSeek-V2 layer loop for a batch of sequences: embeddings -> (MLA -> FFN) x L -> lm_head.
// Attention and dense parts run here; routed experts go through a RoutedExperts backend, so the
// same engine runs with experts in-process or remote.
#ifndef DMOE_ATTENTION_SERVICE_ENGINE_H_
#define DMOE_ATTENTION_SERVICE_ENGINE_H_

#include <atomic>
#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "attention_service/kv_cache.h"
#include "kernels/cpu/gating.h"
#include "kernels/cpu/mla.h"
#include "kernels/cpu/qlinear.h"
#include "kernels/cpu/rope.h"
#include "model/config.h"
#include "model/routed_experts.h"
#include "model/weights.h"

namespace dmoe {

enum class AttentionForm {
  kAuto,      // absorbed everywhere with the invariant kernels (a position's result does not
              // depend on the chunk it is computed in); with cpu::KernelMode::kBlas, naive for
              // multi-token chunks (prefill) and absorbed for single tokens (decode)
  kNaive,     // always the naive form (not chunk-invariant: prefill and decode round differently)
  kAbsorbed,  // always the weight-absorbed form
};

struct EngineOptions {
  AttentionForm attention_form = AttentionForm::kAuto;
  // Decode steps (up to a row per core) with in-process experts, where the shared experts' weights
  // take int8 W8A8 or packed bf16 kernels (cpu::SwiGluPieces; the same bits either way): the
  // router beside the shared experts' gate / up in one pass over the kernel pool (when the
  // router's product is no more than a core's share of it), the shared experts' down as the tail
  // of the routed experts' pass. Off: the shared experts as one task of the routed experts' pass
  // (FinishAfter), the router alone before it.
  bool split_shared_experts = true;
};

// One sequence's part of a step: its cache and the tokens to append.
struct SequenceStep {
  KvSequence* cache = nullptr;
  std::vector<int32_t> tokens;
  bool all_logits = false;  // logits for every new token, else only for the last one
  // If set, receives the final-normed hidden state of every new token [n, D] (what the MTP
  // layer drafts from).
  std::vector<float>* hidden = nullptr;
};

// The checks every engine makes before a step: a cache per sequence, tokens non-empty and inside
// the vocabulary, no sequence past max_position_embeddings (INVALID_ARGUMENT naming the sequence
// and field); then reserves each sequence's rows (RESOURCE_EXHAUSTED). *total: the tokens.
absl::Status ValidateStep(const ModelConfig& c, std::vector<SequenceStep>& batch, int64_t* total);

// Seconds spent per phase, summed over all steps since the last reset.
struct EngineTimings {
  double attention = 0;  // projections, RoPE, MLA, o_proj
  double dense_mlp = 0;  // first dense layers
  // (shared experts in pieces, EngineOptions::split_shared_experts: their gate / up counted in
  // router, their down in routed, shared 0)
  double router = 0;   // gate logits + expert selection
  double shared = 0;   // shared experts (overlapping the remote experts' work)
  double routed = 0;   // waiting for the routed experts after the shared ones
  double lm_head = 0;  // final norm + lm_head
};

// What the scheduler, Generate and the CLI need of an engine: the CPU Engine below and the GPU
// CudaEngine (cuda_engine.h). Thread-compatible: one call at a time.
class StepEngine {
 public:
  virtual ~StepEngine() = default;
  virtual const ModelConfig& config() const = 0;
  // Runs the new tokens of every sequence through the model (Engine::Step documents it).
  virtual absl::Status Step(std::vector<SequenceStep>& batch,
                            std::vector<std::vector<float>>* logits) = 0;
  // Two micro-batches whose results are those of Step(a) and Step(b) one after the other; on
  // error neither changes. This default runs them as one batch (no overlap with the experts).
  virtual absl::Status StepPingPong(std::vector<SequenceStep>& a, std::vector<SequenceStep>& b,
                                    RoutedExperts* experts_b,
                                    std::vector<std::vector<float>>* logits_a,
                                    std::vector<std::vector<float>>* logits_b);
  // One full causal forward of `tokens` from an empty sequence: logits [T, V].
  virtual absl::StatusOr<std::vector<float>> Forward(const std::vector<int32_t>& tokens) = 0;
  // An empty sequence for Step (a host cache, or one over the engine's own pool).
  virtual std::unique_ptr<KvSequence> NewSequence() = 0;
  // The MTP layer (DeepSeek-V3), where the engine runs it.
  virtual bool has_mtp() const { return false; }
  virtual absl::Status StepMtp(std::vector<SequenceStep>& batch, const float* hidden,
                               std::vector<std::vector<float>>* logits);
  // Tokens routed to (layer, expert) since start, where the engine counts them (metrics); safe
  // to read from other threads.
  virtual uint64_t expert_tokens(int64_t /*layer*/, int64_t /*expert*/) const { return 0; }
};

// Thread-compatible: one Step at a time. The engine does not own weights or experts.
class Engine : public StepEngine {
 public:
  Engine(const ModelConfig& config, const DenseWeights* weights, RoutedExperts* experts,
         EngineOptions options = {});

  const ModelConfig& config() const override { return config_; }
  const EngineTimings& timings() const { return timings_; }
  // MoE layers whose shared experts ran in pieces (EngineOptions::split_shared_experts), so far.
  uint64_t shared_experts_in_pieces() const { return shared_in_pieces_.load(); }
  // Tokens routed to (layer, expert) since start (all layers x n_routed_experts; MoE layers only
  // are ever non-zero). Safe to read from other threads.
  uint64_t expert_tokens(int64_t layer, int64_t expert) const override {
    return expert_tokens_[static_cast<size_t>(layer * config_.n_routed_experts + expert)].load(
        std::memory_order_relaxed);
  }
  void ResetTimings() { timings_ = EngineTimings(); }

  // Runs the new tokens of every sequence through the model, appending their latent KV to each
  // cache. logits->at(i) is [n_i, V] (all_logits) or [1, V]. INVALID_ARGUMENT for an empty
  // token list, a token id outside [0, vocab_size), or a sequence growing past
  // max_position_embeddings; RESOURCE_EXHAUSTED when a paged cache has no room. On error no
  // sequence's length changes (rows may stay reserved).
  absl::Status Step(std::vector<SequenceStep>& batch,
                    std::vector<std::vector<float>>* logits) override;

  // Two micro-batches in ping-pong (DESIGN.md §2): per layer, A's attention, A's dispatch, B's
  // attention while A is at the experts, B's dispatch, then A's and B's combines. `experts_b`
  // serves B (a second RoutedExperts over the same shards). Results are those of Step(a) and
  // Step(b) run one after the other.
  absl::Status StepPingPong(std::vector<SequenceStep>& a, std::vector<SequenceStep>& b,
                            RoutedExperts* experts_b, std::vector<std::vector<float>>* logits_a,
                            std::vector<std::vector<float>>* logits_b) override;

  // One full causal forward of `tokens` from an empty cache: logits [T, V].
  absl::StatusOr<std::vector<float>> Forward(const std::vector<int32_t>& tokens) override;
  // A contiguous host cache (SequenceKvCache).
  std::unique_ptr<KvSequence> NewSequence() override;

  // True when the model has an MTP layer (DeepSeek-V3 num_nextn_predict_layers = 1).
  bool has_mtp() const override { return w_->mtp != nullptr; }
  // The config of the caches that hold the MTP layer's rows: one layer (cache layer 0).
  static ModelConfig MtpCacheConfig(const ModelConfig& c);
  // The MTP layer over positions p = cache->length() ... of each sequence's MTP cache (made with
  // MtpCacheConfig): tokens[i] is t_{p+1}, the token that follows position p, and `hidden` holds
  // the main model's final-normed hidden states h_p of those positions, [total tokens, D] in
  // batch order (SequenceStep::hidden of the main step). logits->at(i) are the draft logits of
  // t_{p+2} (every position with all_logits, else the last); SequenceStep::hidden gets the MTP
  // layer's output before shared_head.norm (what drafting further tokens recursively feeds
  // back as h, as vLLM's deepseek_mtp does). Errors as Step; FAILED_PRECONDITION without an MTP
  // layer.
  absl::Status StepMtp(std::vector<SequenceStep>& batch, const float* hidden,
                       std::vector<std::vector<float>>* logits) override;

 private:
  // The state of one micro-batch through the layer loop.
  struct MicroBatch {
    std::vector<SequenceStep>* batch = nullptr;
    std::vector<std::vector<float>>* logits = nullptr;
    RoutedExperts* experts = nullptr;
    int64_t n = 0;           // tokens
    bool in_flight = false;  // routed experts begun, not finished
    std::vector<float> h, x, tmp, router, gate_w;
    std::vector<int32_t> gate_ids;
    cpu::GateScratch gate_scratch;  // (Route may run on any thread of the kernel pool)
    // The shared experts in pieces (EngineOptions::split_shared_experts), their fronts done.
    cpu::SwiGluPieces shared;
    bool shared_split = false;
  };
  // ValidateStep, and every cache on the host.
  absl::Status Validate(std::vector<SequenceStep>& batch, int64_t* n);
  absl::Status Run(int count);
  // Layers [first, last) for `count` micro-batches; on error nothing stays at the experts.
  absl::Status Layers(int count, int64_t first, int64_t last);
  // Layer l's weights: the decoder layers, then the MTP layer (l == num_hidden_layers, whose rows
  // are cache layer 0 of the MTP caches).
  const LayerWeights& LayerAt(int64_t l) const;
  int64_t CacheLayer(int64_t l) const { return l == config_.num_hidden_layers ? 0 : l; }
  // Up to the dispatch of layer l's routed experts (or the whole dense FFN).
  absl::Status LayerFront(int64_t l, MicroBatch& mb);
  // Shared experts (their down rows only, when LayerFront cut them in pieces), the combine, the
  // residual.
  absl::Status LayerBack(int64_t l, MicroBatch& mb);
  double SharedExperts(const LayerWeights& lw, MicroBatch& mb);
  // mb.router, mb.gate_ids / gate_w and the expert counters for layer l's rows mb.x.
  void Route(int64_t l, const LayerWeights& lw, MicroBatch& mb);
  // Route beside the shared experts' fronts (mb.shared) in one pass, when they split.
  void RouteBesideSharedExperts(int64_t l, const LayerWeights& lw, MicroBatch& mb);
  // `norm`: the final norm (model.norm, or the MTP layer's shared_head.norm) before lm_head.
  // SequenceStep::hidden gets the normed rows, or (!normed_hidden) the rows before the norm.
  void Logits(MicroBatch& mb, const std::vector<float>& norm, bool normed_hidden);
  void Attention(int64_t layer, std::vector<SequenceStep>& batch, const float* x, float* out);
  void ProjectQueriesAndLatents(const LayerWeights& lw, const float* x, int64_t n);
  void AttendDecodes(const cpu::MlaParams& p);

  ModelConfig config_;
  const DenseWeights* w_;
  RoutedExperts* experts_;
  EngineOptions options_;
  cpu::RopeTable rope_;
  cpu::GateParams gate_;
  EngineTimings timings_;
  std::atomic<uint64_t> shared_in_pieces_{0};
  std::unique_ptr<std::atomic<uint64_t>[]> expert_tokens_;
  // Scratch reused across steps.
  MicroBatch mb_[2];
  std::vector<float> q_, qa_, kva_, attn_, scratch_, final_x_;
  std::vector<float> decode_q_, decode_o_, lm_out_, rotated_, kv_row_, mtp_in_;
  std::vector<int64_t> decode_rows_, decode_ctx_;
  std::vector<cpu::LatentRows> decode_caches_;
};

}  // namespace dmoe

#endif  // DMOE_ATTENTION_SERVICE_ENGINE_H_
