// A whole model in one process: checkpoint, dense weights, every routed expert hosted locally and
// an Engine over them. What `dmoe logits` / `dmoe generate --model` and the tests run.
#ifndef DMOE_ATTENTION_SERVICE_LOCAL_MODEL_H_
#define DMOE_ATTENTION_SERVICE_LOCAL_MODEL_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "attention_service/engine.h"
#include "attention_service/sampler.h"
#include "attention_service/shard_client.h"
#include "model/config.h"
#include "model/routed_experts.h"
#include "model/safetensors.h"
#include "model/weights.h"

namespace dmoe {

struct LocalModelOptions {
  EngineOptions engine;
  bool log_progress = false;  // one line on stderr when loading starts and one when it ends
  // How the dense projections and the (local) routed experts are held: fp32, int8, fp8.
  WeightDType weight_dtype = WeightDType::kAuto;
  WeightDType expert_dtype = WeightDType::kAuto;
  // Empty (and no shard_client.router): every routed expert in this process. Otherwise the gRPC
  // control addresses of the expert shards that serve them over UCX; no expert tensor is loaded
  // here then. With shard_client.router set, the shards come from the router's placement.
  std::vector<std::string> expert_shards;
  ShardClientOptions shard_client;
  // In-process experts compute here instead of the CPU cores (a GPU: model/cuda_experts.h); not
  // owned, must outlive the model.
  ExpertAccelerator* expert_accelerator = nullptr;
};

class LocalModel {
 public:
  static absl::StatusOr<std::unique_ptr<LocalModel>> Load(const std::string& dir,
                                                          const LocalModelOptions& options);
  static absl::StatusOr<std::unique_ptr<LocalModel>> Load(const std::string& dir,
                                                          EngineOptions options = {},
                                                          bool log_progress = false) {
    LocalModelOptions o;
    o.engine = options;
    o.log_progress = log_progress;
    return Load(dir, o);
  }
  const ModelConfig& config() const { return config_; }
  Engine& engine() { return *engine_; }
  // The routed experts the engine uses (in-process or the shards'): for another engine over the
  // same experts (a GPU engine).
  RoutedExperts* routed_experts() { return routed_experts_; }
  // With remote experts: a second RoutedExperts for ping-pong micro-batches; else nullptr.
  RoutedExperts* second_experts() { return shards_ ? shards_->experts_b() : nullptr; }
  // With remote experts: the shard set (to switch placements between steps); else nullptr.
  ExpertShardSet* shard_set() { return shards_.get(); }
  const ExpertStore& experts() const { return *experts_; }
  const DenseWeights& dense() const { return dense_; }
  // Bytes of weights held in memory.
  uint64_t weight_bytes() const;

 private:
  LocalModel() = default;
  ModelConfig config_;
  DenseWeights dense_;
  std::unique_ptr<ExpertStore> experts_;
  std::unique_ptr<LocalRoutedExperts> routed_;
  std::unique_ptr<ExpertShardSet> shards_;
  std::unique_ptr<Engine> engine_;
  RoutedExperts* routed_experts_ = nullptr;
};

struct GenerateOptions {
  int64_t max_tokens = 16;
  double temperature = 0.0;  // 0: greedy (ties go to the lowest id)
  int64_t top_k = 0;         // 0: off
  double top_p = 1.0;
  double min_p = 0.0;
  uint64_t seed = 0;
  int64_t prefill_chunk = 0;  // 0: the whole prompt in one step
  int32_t stop_token = -1;    // -1: none
  bool ignore_eos = false;    // else generation also stops at the model's eos_token_ids
};

// Prefill (whole or chunked) then token-by-token decode through the cache.
absl::StatusOr<std::vector<int32_t>> Generate(StepEngine& engine,
                                              const std::vector<int32_t>& prompt,
                                              const GenerateOptions& options);

}  // namespace dmoe

#endif  // DMOE_ATTENTION_SERVICE_LOCAL_MODEL_H_
