#include "expert_service/expert_shard.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "common/mutex.h"
#include "transport/wire.h"

namespace dmoe {

ExpertShard::ExpertShard(const ModelConfig& config, std::shared_ptr<const ExpertStore> store,
                         ExpertAccelerator* accelerator)
    : config_(config),
      store_(std::move(store)),
      accelerator_(accelerator),
      batcher_(config.hidden_size, config.moe_intermediate_size),
      expert_tokens_(new std::atomic<uint64_t>[static_cast<size_t>(
          std::max<int64_t>(1, config.num_expert_layers() * config.n_routed_experts))]()) {}

void ExpertShard::SetStore(std::shared_ptr<const ExpertStore> store) {
  MutexLock l(&store_mu_);
  store_ = std::move(store);
}

std::shared_ptr<const ExpertStore> ExpertShard::store() const {
  MutexLock l(&store_mu_);
  return store_;
}

ShardStats ExpertShard::stats() const {
  ShardStats s;
  s.messages = messages_;
  s.rejected = rejected_;
  s.tokens = tokens_;
  s.pairs = pairs_;
  s.batches = batches_;
  s.gemms = gemms_;
  return s;
}

void ExpertShard::Process(const std::vector<const std::vector<uint8_t>*>& requests,
                          std::vector<std::vector<uint8_t>>* replies) {
  const size_t n = requests.size();
  const int64_t d = config_.hidden_size;
  replies->resize(n);
  in_.resize(n);
  out_.resize(n);
  views_.resize(n);
  valid_.assign(n, 0);
  std::vector<wire::MessageView>& views = views_;
  std::vector<char>& valid = valid_;
  batcher_.Clear();
  ++batches_;
  const std::shared_ptr<const ExpertStore> store = this->store();
  for (size_t i = 0; i < n; ++i) {
    ++messages_;
    const std::vector<uint8_t>& bytes = *requests[i];
    auto v = wire::DecodeMessage(bytes.data(), bytes.size());
    std::string error;
    if (!v.ok()) {
      error = std::string(v.status().message());
    } else if (v->header.kind != wire::Kind::kDispatch) {
      error = "expected a dispatch message";
    } else if (v->header.hidden_size != static_cast<uint32_t>(d)) {
      error = absl::StrCat("hidden_size ", v->header.hidden_size, " != model hidden_size ", d);
    } else if (v->header.pair_count > uint64_t{v->header.token_count} *
                                          static_cast<uint64_t>(config_.num_experts_per_tok)) {
      // Each (token, expert) pair is one output row: a few tokens with a million pairs would
      // make this allocate pair_count * hidden_size floats (gigabytes).
      error = absl::StrCat("pair_count ", v->header.pair_count, " > token_count ",
                           v->header.token_count, " x num_experts_per_tok ",
                           config_.num_experts_per_tok);
    } else {
      for (uint32_t p = 0; p < v->header.pair_count && error.empty(); ++p) {
        const wire::Pair pr = v->pair(p);
        if (store->Find(v->header.layer, pr.expert) == nullptr) {
          error = absl::StrCat("expert ", pr.expert, " of layer ", v->header.layer,
                               " is not hosted on this shard");
        }
      }
    }
    if (!error.empty()) {
      ++rejected_;
      wire::Header h = v.ok() ? v->header : wire::Header();
      wire::EncodeError(h, error, &(*replies)[i]);
      continue;
    }
    valid[i] = 1;
    views[i] = std::move(v).value();
    const wire::Header& h = views[i].header;
    in_[i].resize(static_cast<size_t>(h.token_count) * d);
    out_[i].resize(static_cast<size_t>(h.pair_count) * d);  // one unweighted row per pair
    for (uint32_t t = 0; t < h.token_count; ++t) views[i].RowToFloat(t, in_[i].data() + t * d);
    for (uint32_t p = 0; p < h.pair_count; ++p) {
      const wire::Pair pr = views[i].pair(p);
      batcher_.Add(h.layer, pr.expert, in_[i].data() + pr.token * d, out_[i].data() + p * d);
      expert_tokens_[static_cast<size_t>(h.layer * config_.n_routed_experts + pr.expert)].fetch_add(
          1, std::memory_order_relaxed);
    }
    tokens_ += h.token_count;
    pairs_ += h.pair_count;
  }
  const uint64_t gemms_before = batcher_.gemms();
  const absl::Status st = batcher_.Run(*store, accelerator_);  // every expert was checked above
  gemms_ += batcher_.gemms() - gemms_before;
  for (size_t i = 0; i < n; ++i) {
    if (!valid[i]) continue;
    if (!st.ok()) {
      wire::EncodeError(views[i].header, std::string(st.message()), &(*replies)[i]);
      continue;
    }
    wire::Header reply = views[i].header;
    reply.token_count = reply.pair_count;  // a combine carries one row per dispatched pair
    wire::EncodeCombine(reply, out_[i].data(), &(*replies)[i]);
  }
}

}  // namespace dmoe
