#include "attention_service/attention_node.h"

#include <limits>
#include <memory>
#include <new>
#include <stdexcept>
#include <thread>

#include "absl/strings/str_cat.h"
#include "common/logging.h"

namespace dmoe {

absl::StatusOr<std::unique_ptr<LatentKvCache>> MakeKvCache(const ModelConfig& c,
                                                           const KvCacheOptions& o) {
  const int64_t blocks = o.blocks > 0
                             ? o.blocks
                             : LatentKvCache::BlocksForBytes(
                                   c, o.block_tokens, static_cast<uint64_t>(o.mib) << 20, o.dtype);
  if (blocks <= 0) return absl::InvalidArgumentError("--kv-cache-mib: too small for one block");
  if (blocks > std::numeric_limits<int32_t>::max()) {  // (block ids are int32)
    return absl::InvalidArgumentError(
        absl::StrCat("--kv-cache-mib: ", blocks, " KV blocks; at most 2^31-1"));
  }
  std::unique_ptr<LatentKvCache> cache;
  try {  // (the size comes from flags: more than the machine has is an error, not an abort)
    cache = std::make_unique<LatentKvCache>(c, o.block_tokens, blocks, o.dtype);
  } catch (const std::bad_alloc&) {
    return absl::ResourceExhaustedError(
        absl::StrCat("--kv-cache-mib/--kv-blocks: cannot allocate ", blocks, " KV blocks of ",
                     o.block_tokens, " tokens (more memory than this machine gives)"));
  } catch (const std::length_error&) {
    return absl::ResourceExhaustedError(
        absl::StrCat("--kv-cache-mib/--kv-blocks: ", blocks, " KV blocks is too many"));
  }
  spdlog::info("KV cache ({}) {} blocks x {} tokens, {:.1f} MiB, {} bytes/token",
               cpu::KvDTypeName(o.dtype), blocks, o.block_tokens,
               static_cast<double>(blocks * cache->block_bytes()) / (1 << 20),
               cache->bytes_per_token());
  return cache;
}

absl::Status CheckSpeculativeTokens(const ModelConfig& c, int64_t n) {
  if (n < 0 || n > 16) {
    return absl::InvalidArgumentError(
        absl::StrCat("--speculative-tokens: ", n, " is not in [0, 16]"));
  }
  if (n > 0 && c.num_nextn_predict_layers == 0) {
    return absl::InvalidArgumentError(
        "--speculative-tokens: the model has no MTP layer (num_nextn_predict_layers is 0)");
  }
  return absl::OkStatus();
}

namespace {

std::unique_ptr<LatentKvCache> MakeMtpCache(const LocalModel& model, const StepEngine& engine,
                                            const LatentKvCache& main, const SchedulerOptions& o) {
  if (o.speculative_tokens <= 0 || !model.dense().mtp || !engine.has_mtp()) return nullptr;
  const int64_t blocks = MtpCacheBlocks(main.total_blocks(), main.block_tokens(), o);
  auto cache = std::make_unique<LatentKvCache>(Engine::MtpCacheConfig(model.config()),
                                               main.block_tokens(), blocks, main.dtype());
  spdlog::info("MTP cache ({}) {} blocks x {} tokens, {:.1f} MiB; up to {} drafted tokens per step",
               cpu::KvDTypeName(main.dtype()), blocks, main.block_tokens(),
               static_cast<double>(blocks * cache->block_bytes()) / (1 << 20),
               o.speculative_tokens);
  return cache;
}

SchedulerOptions WithMtpCache(SchedulerOptions o, LatentKvCache* mtp_cache) {
  o.mtp_cache = mtp_cache;
  return o;
}

}  // namespace

AttentionNode::AttentionNode(LocalModel* model, std::unique_ptr<LatentKvCache> cache,
                             const SchedulerOptions& options, AttentionMetrics* metrics)
    : AttentionNode(model, &model->engine(), cache.get(), options, metrics) {
  owned_cache_ = std::move(cache);
}

AttentionNode::AttentionNode(LocalModel* model, StepEngine* engine, LatentKvCache* cache,
                             const SchedulerOptions& options, AttentionMetrics* metrics)
    : engine_(engine),
      cache_(cache),
      mtp_cache_(MakeMtpCache(*model, *engine, *cache_, options)),
      metrics_(metrics),
      scheduler_(engine, cache_, WithMtpCache(options, mtp_cache_.get())),
      loop_(&scheduler_),
      service_(&scheduler_, metrics) {
  if (metrics_ != nullptr) loop_.SetStepObserver([m = metrics_](double s) { m->ObserveStep(s); });
}

namespace {

template <typename Make>
absl::StatusOr<std::unique_ptr<AttentionNode>> Checked(const LatentKvCache& main,
                                                       const SchedulerOptions& o, Make make) {
  if (o.speculative_tokens > 0) {
    const int64_t blocks = MtpCacheBlocks(main.total_blocks(), main.block_tokens(), o);
    if (blocks > std::numeric_limits<int32_t>::max()) {
      return absl::InvalidArgumentError(
          absl::StrCat("--speculative-tokens: the MTP cache would need ", blocks,
                       " blocks, over 2^31-1; lower --kv-cache-mib/--kv-blocks or --max-running"));
    }
  }
  try {  // the MTP cache, sized like the main one (which the caller allocated already)
    return make();
  } catch (const std::bad_alloc&) {
    return absl::ResourceExhaustedError(
        "--speculative-tokens: cannot allocate the MTP layer's KV cache (more memory than this "
        "machine gives); lower --kv-cache-mib/--kv-blocks");
  } catch (const std::length_error&) {
    return absl::ResourceExhaustedError(
        "--speculative-tokens: the MTP layer's KV cache is too large");
  }
}

}  // namespace

absl::StatusOr<std::unique_ptr<AttentionNode>> AttentionNode::Create(
    LocalModel* model, std::unique_ptr<LatentKvCache> cache, const SchedulerOptions& options,
    AttentionMetrics* metrics) {
  LatentKvCache& main = *cache;
  return Checked(main, options, [&] {
    return std::make_unique<AttentionNode>(model, std::move(cache), options, metrics);
  });
}

absl::StatusOr<std::unique_ptr<AttentionNode>> AttentionNode::Create(
    LocalModel* model, StepEngine* engine, LatentKvCache* cache, const SchedulerOptions& options,
    AttentionMetrics* metrics) {
  return Checked(*cache, options, [&] {
    return std::make_unique<AttentionNode>(model, engine, cache, options, metrics);
  });
}

AttentionNode::~AttentionNode() { Stop(); }

void AttentionNode::Start() {
  loop_.Start();
  if (metrics_ != nullptr) metrics_->Start(&scheduler_, engine_);
}

void AttentionNode::Drain(std::chrono::seconds grace, bool hand_back_queued) {
  scheduler_.Drain(hand_back_queued);
  const auto until = std::chrono::steady_clock::now() + grace;
  auto idle = [&] {
    const SchedulerLoad load = scheduler_.load();
    return load.running == 0 && load.waiting == 0;
  };
  while (std::chrono::steady_clock::now() < until && !idle()) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  if (idle()) return;
  // Out of time: what is left ends UNAVAILABLE now (those with no token yet are retried on
  // another node by the gateway), not cut off with the process.
  scheduler_.EndAll(absl::UnavailableError(
      "this attention node is shutting down (its drain ran out); retry on another"));
  const auto end = std::chrono::steady_clock::now() + std::chrono::seconds(2);
  while (std::chrono::steady_clock::now() < end && !idle()) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

void AttentionNode::Stop() {
  loop_.Stop();
  if (metrics_ != nullptr) metrics_->Stop();
}

}  // namespace dmoe
