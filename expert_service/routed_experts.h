// Computing the routed experts of one MoE layer for a batch of tokens. The engine calls this
// interface; the in-process implementation here computes locally, and remote implementations
// (dispatch/combine over a transport) plug in behind the same interface.
#ifndef DMOE_EXPERT_SERVICE_ROUTED_EXPERTS_H_
#define DMOE_EXPERT_SERVICE_ROUTED_EXPERTS_H_

#include <cstdint>
#include <map>
#include <memory>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "model/config.h"
#include "model/safetensors.h"
#include "model/weights.h"

namespace dmoe {

// Thread-compatible: one caller at a time.
class RoutedExperts {
 public:
  virtual ~RoutedExperts() = default;
  // out[t, D] = sum_j w[t, j] * Expert_{ids[t, j]}(x[t]) for the MoE layer `layer`.
  // x [t, D], ids and w [t, k]; out is overwritten.
  virtual absl::Status Compute(int64_t layer, const float* x, int64_t t, const int32_t* ids,
                               const float* w, int64_t k, float* out) = 0;
};

// The experts one process hosts, in fp32, keyed by (layer, expert).
class ExpertStore {
 public:
  // Loads exactly the listed (layer, expert) pairs from the checkpoint (no other expert tensor).
  static absl::StatusOr<std::unique_ptr<ExpertStore>> Load(
      const Checkpoint& ck, const ModelConfig& c,
      const std::vector<std::pair<int64_t, int64_t>>& experts);
  // Every routed expert of every MoE layer.
  static std::vector<std::pair<int64_t, int64_t>> AllExperts(const ModelConfig& c);

  const MlpWeights* Find(int64_t layer, int64_t expert) const;
  size_t size() const { return experts_.size(); }
  // Bytes of expert weights held.
  uint64_t bytes() const;

 private:
  std::map<std::pair<int64_t, int64_t>, MlpWeights> experts_;
};

// Computes routed experts in this process: all tokens that chose one expert go through it as one
// GEMM, then each result row is added to its token's output with the gate weight.
class LocalRoutedExperts : public RoutedExperts {
 public:
  LocalRoutedExperts(const ModelConfig& c, const ExpertStore* store)
      : hidden_(c.hidden_size), width_(c.moe_intermediate_size), store_(store) {}
  absl::Status Compute(int64_t layer, const float* x, int64_t t, const int32_t* ids, const float* w,
                       int64_t k, float* out) override;

 private:
  int64_t hidden_;
  int64_t width_;
  const ExpertStore* store_;
  std::vector<float> gathered_, result_, scratch_;
};

}  // namespace dmoe

#endif  // DMOE_EXPERT_SERVICE_ROUTED_EXPERTS_H_
