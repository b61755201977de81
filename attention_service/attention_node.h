// The attention node's serving core, assembled in one place for dmoe-attention and `dmoe serve`:
// the paged latent KV cache, the scheduler over a model's engine, the scheduler's loop thread and
// the AttentionService implementation (with metrics when given).
#ifndef DMOE_ATTENTION_SERVICE_ATTENTION_NODE_H_
#define DMOE_ATTENTION_SERVICE_ATTENTION_NODE_H_

#include <chrono>
#include <cstdint>
#include <memory>

#include "absl/status/statusor.h"
#include "attention_service/attention_metrics.h"
#include "attention_service/attention_server.h"
#include "attention_service/kv_cache.h"
#include "attention_service/local_model.h"
#include "attention_service/scheduler.h"

namespace dmoe {

struct KvCacheOptions {
  int64_t mib = 256;   // size, unless `blocks` is set
  int64_t blocks = 0;  // 0: as many as fit in `mib`
  int64_t block_tokens = 16;
  cpu::KvDType dtype = cpu::KvDType::kF32;
};

// The cache for `c`, logged in one line; INVALID_ARGUMENT (naming --kv-cache-mib) when not even
// one block fits.
absl::StatusOr<std::unique_ptr<LatentKvCache>> MakeKvCache(const ModelConfig& c,
                                                           const KvCacheOptions& o);

// --speculative-tokens N: INVALID_ARGUMENT unless 0, or 1..16 with a model that has an MTP
// layer (DeepSeek-V3 num_nextn_predict_layers).
absl::Status CheckSpeculativeTokens(const ModelConfig& c, int64_t n);

class AttentionNode {
 public:
  // `model` and `metrics` (may be null) outlive the node. With options.speculative_tokens > 0
  // the node makes the MTP layer's cache (options.mtp_cache) to go with `cache`.
  AttentionNode(LocalModel* model, std::unique_ptr<LatentKvCache> cache,
                const SchedulerOptions& options, AttentionMetrics* metrics = nullptr);
  // The same over another engine and its own cache (a GPU engine's pool; neither owned), e.g.
  // a CudaEngine made from `model`'s weights and routed experts.
  AttentionNode(LocalModel* model, StepEngine* engine, LatentKvCache* cache,
                const SchedulerOptions& options, AttentionMetrics* metrics = nullptr);
  // The same, with the MTP cache's allocation checked: RESOURCE_EXHAUSTED naming
  // --speculative-tokens when the machine cannot hold it, INVALID_ARGUMENT when it would need more
  // than 2^31-1 blocks (block ids are int32), instead of an abort.
  static absl::StatusOr<std::unique_ptr<AttentionNode>> Create(LocalModel* model,
                                                               std::unique_ptr<LatentKvCache> cache,
                                                               const SchedulerOptions& options,
                                                               AttentionMetrics* metrics = nullptr);
  static absl::StatusOr<std::unique_ptr<AttentionNode>> Create(LocalModel* model,
                                                               StepEngine* engine,
                                                               LatentKvCache* cache,
                                                               const SchedulerOptions& options,
                                                               AttentionMetrics* metrics = nullptr);
  ~AttentionNode();
  AttentionNode(const AttentionNode&) = delete;
  AttentionNode& operator=(const AttentionNode&) = delete;

  // Starts the scheduler loop (and the metrics refresh).
  void Start();
  // Graceful stop: admit nothing new (new requests get UNAVAILABLE and the gateway retries them on
  // another node); return once the accepted ones finished, or after `grace`. With
  // `hand_back_queued`, queued requests without a token end UNAVAILABLE at once (Scheduler::Drain).
  void Drain(std::chrono::seconds grace, bool hand_back_queued = false);
  // Stops the loop and the metrics refresh (also done by the destructor).
  void Stop();

  Scheduler& scheduler() { return scheduler_; }
  AttentionServiceImpl* service() { return &service_; }

 private:
  StepEngine* engine_;
  std::unique_ptr<LatentKvCache> owned_cache_;
  LatentKvCache* cache_;
  std::unique_ptr<LatentKvCache> mtp_cache_;
  AttentionMetrics* metrics_;
  Scheduler scheduler_;
  SchedulerLoop loop_;
  AttentionServiceImpl service_;
};

}  // namespace dmoe

#endif  // DMOE_ATTENTION_SERVICE_ATTENTION_NODE_H_
