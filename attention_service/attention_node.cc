#include "attention_service/attention_node.h"

#include <thread>

#include "common/logging.h"

namespace dmoe {

absl::StatusOr<std::unique_ptr<LatentKvCache>> MakeKvCache(const ModelConfig& c,
                                                           const KvCacheOptions& o) {
  const int64_t blocks = o.blocks > 0
                             ? o.blocks
                             : LatentKvCache::BlocksForBytes(
                                   c, o.block_tokens, static_cast<uint64_t>(o.mib) << 20, o.dtype);
  if (blocks <= 0) return absl::InvalidArgumentError("--kv-cache-mib: too small for one block");
  auto cache = std::make_unique<LatentKvCache>(c, o.block_tokens, blocks, o.dtype);
  spdlog::info("KV cache ({}) {} blocks x {} tokens, {:.1f} MiB, {} bytes/token",
               cpu::KvDTypeName(o.dtype), blocks, o.block_tokens,
               static_cast<double>(blocks * cache->block_bytes()) / (1 << 20),
               cache->bytes_per_token());
  return cache;
}

AttentionNode::AttentionNode(LocalModel* model, std::unique_ptr<LatentKvCache> cache,
                             const SchedulerOptions& options, AttentionMetrics* metrics)
    : model_(model),
      cache_(std::move(cache)),
      metrics_(metrics),
      scheduler_(&model->engine(), cache_.get(), options),
      loop_(&scheduler_),
      service_(&scheduler_, metrics) {}

AttentionNode::~AttentionNode() { Stop(); }

void AttentionNode::Start() {
  loop_.Start();
  if (metrics_ != nullptr) metrics_->Start(&scheduler_, &model_->engine());
}

void AttentionNode::Drain(std::chrono::seconds grace) {
  scheduler_.Drain();
  const auto until = std::chrono::steady_clock::now() + grace;
  while (std::chrono::steady_clock::now() < until) {
    const SchedulerLoad load = scheduler_.load();
    if (load.running == 0 && load.waiting == 0) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

void AttentionNode::Stop() {
  loop_.Stop();
  if (metrics_ != nullptr) metrics_->Stop();
}

}  // namespace dmoe
