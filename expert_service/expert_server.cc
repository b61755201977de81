#include "expert_service/expert_server.h"

#include <set>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace dmoe {

void ExpertServer::Start() {
  stop_ = false;
  thread_ = std::thread([this] { Loop(); });
}

void ExpertServer::Stop() {
  stop_ = true;
  if (thread_.joinable()) thread_.join();
}

void ExpertServer::Loop() {
  std::vector<transport::ServerRequest> batch;
  std::vector<const std::vector<uint8_t>*> views;
  std::vector<std::vector<uint8_t>> replies;
  while (!stop_) {
    batch.clear();
    transport_->Receive(std::chrono::milliseconds(50), &batch);
    if (batch.empty()) continue;
    const auto start = std::chrono::steady_clock::now();
    if (delay_.count() > 0) std::this_thread::sleep_for(delay_);
    views.clear();
    for (const auto& r : batch) views.push_back(&r.bytes);
    replies.resize(batch.size());
    for (auto& r : replies) {
      if (r.capacity() == 0) r = transport_->AcquireBuffer();
    }
    shard_->Process(views, &replies);
    for (size_t i = 0; i < batch.size(); ++i) {
      transport_->Reply(batch[i].token, std::move(replies[i]));
      replies[i] = std::vector<uint8_t>();
      transport_->ReleaseBuffer(std::move(batch[i].bytes));
    }
    if (on_batch_) {
      on_batch_(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
    }
  }
}

namespace {

absl::Status Bad(const std::string& spec, absl::string_view why) {
  return absl::InvalidArgumentError(absl::StrCat("--experts \"", spec, "\": ", why));
}

// "*", "N" or "A-B" within [0, limit).
bool ParseRange(absl::string_view s, int64_t limit, int64_t* lo, int64_t* hi) {
  if (s == "*") {
    *lo = 0;
    *hi = limit - 1;
    return true;
  }
  std::vector<absl::string_view> ab = absl::StrSplit(s, '-');
  if (ab.size() == 1) {
    if (!absl::SimpleAtoi(ab[0], lo)) return false;
    *hi = *lo;
  } else if (ab.size() != 2 || !absl::SimpleAtoi(ab[0], lo) || !absl::SimpleAtoi(ab[1], hi)) {
    return false;
  }
  return *lo >= 0 && *lo <= *hi && *hi < limit;
}

}  // namespace

absl::StatusOr<std::vector<std::pair<int64_t, int64_t>>> ParseExpertSpec(const std::string& spec,
                                                                         const ModelConfig& c) {
  if (c.n_routed_experts <= 0) return Bad(spec, "the model has no routed experts");
  std::set<std::pair<int64_t, int64_t>> out;
  std::vector<absl::string_view> slash = absl::StrSplit(spec, '/');
  if (slash.size() == 2) {
    int64_t i, n;
    if (!absl::SimpleAtoi(slash[0], &i) || !absl::SimpleAtoi(slash[1], &n) || n <= 0 || i < 0 ||
        i >= n || n > c.n_routed_experts) {
      return Bad(spec, absl::StrCat("expected I/N with 0 <= I < N <= n_routed_experts ",
                                    c.n_routed_experts));
    }
    const int64_t e = c.n_routed_experts;
    for (int64_t l = 0; l < c.num_expert_layers(); ++l) {
      if (!c.IsMoeLayer(l)) continue;
      for (int64_t x = i * e / n; x < (i + 1) * e / n; ++x) out.insert({l, x});
    }
    return std::vector<std::pair<int64_t, int64_t>>(out.begin(), out.end());
  }
  for (absl::string_view item : absl::StrSplit(spec, ',')) {
    std::vector<absl::string_view> le = absl::StrSplit(item, ':');
    int64_t l0, l1, e0, e1;
    if (le.size() != 2) return Bad(spec, absl::StrCat("item \"", item, "\" is not LAYERS:EXPERTS"));
    if (!ParseRange(le[0], c.num_expert_layers(), &l0, &l1)) {
      return Bad(spec, absl::StrCat("layers \"", le[0], "\" are not *, N or A-B below ",
                                    c.num_expert_layers()));
    }
    if (!ParseRange(le[1], c.n_routed_experts, &e0, &e1)) {
      return Bad(spec, absl::StrCat("experts \"", le[1], "\" are not *, N or A-B below ",
                                    c.n_routed_experts));
    }
    for (int64_t l = l0; l <= l1; ++l) {
      if (!c.IsMoeLayer(l)) continue;
      for (int64_t x = e0; x <= e1; ++x) out.insert({l, x});
    }
  }
  if (out.empty()) return Bad(spec, "names no expert of a MoE layer");
  return std::vector<std::pair<int64_t, int64_t>>(out.begin(), out.end());
}

}  // namespace dmoe
