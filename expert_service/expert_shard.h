// The request handler of an expert shard: decodes dispatch messages, merges the tokens of every
// request that arrived together per (layer, expert) into one GEMM, and encodes one combine (or
// error) reply per request. Knows nothing of the transport. Thread-compatible, except stats().
#ifndef DMOE_EXPERT_SERVICE_EXPERT_SHARD_H_
#define DMOE_EXPERT_SERVICE_EXPERT_SHARD_H_

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "common/mutex.h"
#include "model/config.h"
#include "model/routed_experts.h"
#include "transport/wire.h"

namespace dmoe {

struct ShardStats {
  uint64_t messages = 0;  // requests handled
  uint64_t rejected = 0;  // malformed, wrong kind/size, or naming experts not hosted here
  uint64_t tokens = 0;
  uint64_t pairs = 0;
  uint64_t batches = 0;  // Process calls
  uint64_t gemms = 0;    // one per (layer, expert) per batch
};

class ExpertShard {
 public:
  // With an accelerator (not owned: a GPU, model/cuda_experts.h) the experts compute there.
  ExpertShard(const ModelConfig& config, std::shared_ptr<const ExpertStore> store,
              ExpertAccelerator* accelerator = nullptr);
  // Serves from `store` from the next Process call on (the current call keeps the old one).
  // Thread-safe.
  void SetStore(std::shared_ptr<const ExpertStore> store);
  std::shared_ptr<const ExpertStore> store() const;
  // replies[i] answers requests[i]: a combine, or an error message naming the problem.
  void Process(const std::vector<const std::vector<uint8_t>*>& requests,
               std::vector<std::vector<uint8_t>>* replies);
  ShardStats stats() const;
  // Token rows computed by (layer, expert) since start. Thread-safe.
  uint64_t expert_tokens(int64_t layer, int64_t expert) const {
    return expert_tokens_[static_cast<size_t>(layer * config_.n_routed_experts + expert)].load(
        std::memory_order_relaxed);
  }

 private:
  ModelConfig config_;
  mutable Mutex store_mu_;
  std::shared_ptr<const ExpertStore> store_ ABSL_GUARDED_BY(store_mu_);
  ExpertAccelerator* accelerator_;
  ExpertBatcher batcher_;
  // Per-batch state, kept between batches so that steady serving allocates nothing.
  std::vector<std::vector<float>> in_, out_;
  std::vector<wire::MessageView> views_;
  std::vector<char> valid_;
  std::atomic<uint64_t> messages_{0}, rejected_{0}, tokens_{0}, pairs_{0}, batches_{0}, gemms_{0};
  std::unique_ptr<std::atomic<uint64_t>[]> expert_tokens_;
};

}  // namespace dmoe

#endif  // DMOE_EXPERT_SERVICE_EXPERT_SHARD_H_
