#include "attention_service/remote_experts.h"

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "common/mutex.h"
#include "common/status_macros.h"

namespace dmoe {

void ExpertPlacement::Add(int shard, const std::vector<std::pair<int64_t, int64_t>>& experts) {
  for (const auto& [l, e] : experts) {
    if (e < 0 || e >= experts_ || l < 0 ||
        static_cast<size_t>(l * experts_ + e) >= replicas_.size()) {
      continue;
    }
    std::vector<int>& rs = replicas_[static_cast<size_t>(l * experts_ + e)];
    if (std::find(rs.begin(), rs.end(), shard) == rs.end()) rs.push_back(shard);
  }
}

const std::vector<int>& ExpertPlacement::Replicas(int64_t layer, int64_t expert) const {
  if (expert < 0 || expert >= experts_ || layer < 0 ||
      static_cast<size_t>(layer * experts_ + expert) >= replicas_.size()) {
    return none_;
  }
  return replicas_[static_cast<size_t>(layer * experts_ + expert)];
}

absl::Status ExpertPlacement::CheckCovers(const ModelConfig& c) const {
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    if (!c.IsMoeLayer(l)) continue;
    for (int64_t e = 0; e < c.n_routed_experts; ++e) {
      if (Replicas(l, e).empty()) {
        return absl::InvalidArgumentError(
            absl::StrCat("no expert shard hosts expert ", e, " of layer ", l));
      }
    }
  }
  return absl::OkStatus();
}

void PeerHealth::MarkDead(int peer) {
  MutexLock l(&mu_);
  if (peer < 0) return;
  if (static_cast<size_t>(peer) >= dead_.size()) dead_.resize(static_cast<size_t>(peer) + 1, 0);
  dead_[static_cast<size_t>(peer)] = 1;
}

bool PeerHealth::Dead(int peer) const {
  MutexLock l(&mu_);
  return peer >= 0 && static_cast<size_t>(peer) < dead_.size() && dead_[static_cast<size_t>(peer)];
}

void PeerHealth::Snapshot(const std::vector<int>& peers, std::vector<char>* dead) const {
  MutexLock l(&mu_);
  dead->resize(peers.size());
  for (size_t i = 0; i < peers.size(); ++i) {
    const int p = peers[i];
    (*dead)[i] = p >= 0 && static_cast<size_t>(p) < dead_.size() && dead_[static_cast<size_t>(p)];
  }
}

RemoteRoutedExperts::RemoteRoutedExperts(const ModelConfig& c, transport::ClientTransport* client,
                                         std::shared_ptr<const ExpertRouting> routing,
                                         std::shared_ptr<PeerHealth> health,
                                         RemoteExpertsOptions options)
    : hidden_(c.hidden_size),
      n_experts_(c.n_routed_experts),
      client_(client),
      routing_(std::move(routing)),
      health_(std::move(health)),
      options_(std::move(options)),
      calls_(routing_->peers.size()),
      expert_tokens_(new std::atomic<uint64_t>[static_cast<size_t>(
          std::max<int64_t>(1, c.num_hidden_layers * c.n_routed_experts))]()) {}

namespace {

std::shared_ptr<const ExpertRouting> StaticRouting(std::vector<int> peers,
                                                   std::vector<std::string> names,
                                                   ExpertPlacement placement) {
  auto r = std::make_shared<ExpertRouting>();
  r->peers = std::move(peers);
  r->names = std::move(names);
  r->placement = std::move(placement);
  return r;
}

}  // namespace

RemoteRoutedExperts::RemoteRoutedExperts(const ModelConfig& c, transport::ClientTransport* client,
                                         std::vector<int> peers, std::vector<std::string> names,
                                         ExpertPlacement placement, RemoteExpertsOptions options)
    : RemoteRoutedExperts(c, client,
                          StaticRouting(std::move(peers), std::move(names), std::move(placement)),
                          std::make_shared<PeerHealth>(), std::move(options)) {}

void RemoteRoutedExperts::SetRouting(std::shared_ptr<const ExpertRouting> routing) {
  routing_ = std::move(routing);
  calls_.clear();
  calls_.resize(routing_->peers.size());
}

absl::Status RemoteRoutedExperts::Begin(int64_t layer, const float* x, int64_t t,
                                        const int32_t* ids, const float* w, int64_t k) {
  layer_ = layer;
  x_ = x;
  ids_ = ids;
  w_ = w;
  t_ = t;
  k_ = k;
  begun_ = transport::Clock::now();
  deadline_ = begun_ + options_.deadline;
  all_pairs_.resize(static_cast<size_t>(t * k));
  for (int64_t p = 0; p < t * k; ++p) {
    all_pairs_[static_cast<size_t>(p)] = p;
    if (ids[p] >= 0 && ids[p] < n_experts_) {
      expert_tokens_[static_cast<size_t>(layer * n_experts_ + ids[p])].fetch_add(
          1, std::memory_order_relaxed);
    }
  }
  choice_.assign(static_cast<size_t>(t * k), -1);
  avoid_.assign(routing_->peers.size(), 0);
  failed_.clear();
  first_failure_ = absl::OkStatus();
  return Dispatch(all_pairs_, avoid_);
}

absl::Status RemoteRoutedExperts::Dispatch(const std::vector<int64_t>& todo,
                                           const std::vector<char>& avoid) {
  const int64_t ns = static_cast<int64_t>(routing_->peers.size());
  health_->Snapshot(routing_->peers, &dead_);
  for (ShardCall& c : calls_) {
    c.tokens.clear();
    c.pairs.clear();
  }
  local_index_.assign(static_cast<size_t>(t_ * ns), -1);
  assigned_.assign(static_cast<size_t>(ns), 0);
  RETURN_IF_ERROR(PlanReplicas(todo, avoid));
  ++seq_;
  for (int s = 0; s < ns; ++s) {
    if (!calls_[static_cast<size_t>(s)].tokens.empty()) Post(s, todo);
  }
  return absl::OkStatus();
}

absl::Status RemoteRoutedExperts::PlanReplicas(const std::vector<int64_t>& todo,
                                               const std::vector<char>& avoid) {
  const ExpertRouting& r = *routing_;
  const int64_t ns = static_cast<int64_t>(r.peers.size());
  // Plan: a live replica per pair, unique tokens per destination shard.
  for (int64_t p : todo) {
    const int64_t i = p / k_;
    const std::vector<int>& reps = r.placement.Replicas(layer_, ids_[p]);
    int best = -1;
    for (int s : reps) {
      if (dead_[static_cast<size_t>(s)] || avoid[static_cast<size_t>(s)]) continue;
      if (local_index_[static_cast<size_t>(i * ns + s)] >= 0) {
        best = s;
        break;
      }
      if (best < 0 || assigned_[static_cast<size_t>(s)] < assigned_[static_cast<size_t>(best)]) {
        best = s;
      }
    }
    if (best < 0) {
      return absl::UnavailableError(
          absl::StrCat("no live expert shard serves expert ", ids_[p], " of layer ", layer_));
    }
    choice_[static_cast<size_t>(p)] = best;
    int64_t& li = local_index_[static_cast<size_t>(i * ns + best)];
    if (li < 0) {
      li = static_cast<int64_t>(calls_[static_cast<size_t>(best)].tokens.size());
      calls_[static_cast<size_t>(best)].tokens.push_back(i);
      ++assigned_[static_cast<size_t>(best)];
    }
  }
  return absl::OkStatus();
}

void RemoteRoutedExperts::Post(int s, const std::vector<int64_t>& todo) {
  const ExpertRouting& r = *routing_;
  const int64_t ns = static_cast<int64_t>(r.peers.size());
  ShardCall& call = calls_[static_cast<size_t>(s)];
  const int64_t n = static_cast<int64_t>(call.tokens.size());
  rows_.resize(static_cast<size_t>(n * hidden_));
  pairs_.clear();
  for (int64_t li = 0; li < n; ++li) {
    std::memcpy(rows_.data() + li * hidden_, x_ + call.tokens[static_cast<size_t>(li)] * hidden_,
                sizeof(float) * static_cast<size_t>(hidden_));
  }
  for (int64_t p : todo) {
    if (choice_[static_cast<size_t>(p)] != s) continue;
    const int64_t li = local_index_[static_cast<size_t>((p / k_) * ns + s)];
    pairs_.push_back(wire::Pair{static_cast<uint32_t>(li), static_cast<uint32_t>(ids_[p]), w_[p]});
    call.pairs.push_back(p);
  }
  wire::Header h;
  h.sender_id = options_.sender_id;
  h.step_seq = seq_;
  h.layer = static_cast<uint32_t>(layer_);
  h.token_count = static_cast<uint32_t>(n);
  h.hidden_size = static_cast<uint32_t>(hidden_);
  h.dtype = options_.dtype;
  std::vector<uint8_t> msg = client_->AcquireBuffer();
  wire::EncodeDispatch(h, rows_.data(), pairs_, &msg);
  call.bytes_out = msg.size();
  auto id = client_->Post(r.peers[static_cast<size_t>(s)], std::move(msg));
  if (!id.ok()) {
    // The peer is known to have failed: Finish sends its pairs elsewhere.
    health_->MarkDead(r.peers[static_cast<size_t>(s)]);
    failed_.push_back(s);
    if (first_failure_.ok()) {
      first_failure_ = absl::UnavailableError(absl::StrCat(
          "expert shard ", r.names[static_cast<size_t>(s)], ": ", id.status().message()));
    }
    return;
  }
  call.id = *id;
  call.posted = true;
}

absl::Status RemoteRoutedExperts::Collect(std::vector<int>* failed) {
  const ExpertRouting& r = *routing_;
  for (size_t s = 0; s < calls_.size(); ++s) {
    ShardCall& call = calls_[s];
    if (!call.posted) continue;
    call.posted = false;
    const absl::Status st = client_->Wait(call.id, deadline_, &reply_);
    ++round_trips_;
    // Reported once its reply is judged: a corrupt or error reply is a failed round trip too.
    auto observe = [&](bool ok) {
      if (!options_.observer) return;
      options_.observer(r.names[s],
                        std::chrono::duration<double>(transport::Clock::now() - begun_).count(),
                        static_cast<int64_t>(call.tokens.size()), call.bytes_out,
                        st.ok() ? reply_.size() : 0, ok);
    };
    if (!st.ok()) {
      observe(false);
      health_->MarkDead(r.peers[s]);
      failed->push_back(static_cast<int>(s));
      if (first_failure_.ok()) {
        first_failure_ = absl::Status(
            st.code() == absl::StatusCode::kDeadlineExceeded ? absl::StatusCode::kDeadlineExceeded
                                                             : absl::StatusCode::kUnavailable,
            absl::StrCat("expert shard ", r.names[s], " (layer ", layer_, "): ", st.message()));
      }
      continue;
    }
    auto v = wire::DecodeMessage(reply_.data(), reply_.size());
    absl::Status bad;
    if (!v.ok()) {
      bad = v.status();
    } else if (v->header.kind == wire::Kind::kError) {
      bad = absl::InternalError(v->error);
    } else if (v->header.kind != wire::Kind::kCombine || v->header.step_seq != seq_ ||
               v->header.layer != static_cast<uint32_t>(layer_) ||
               v->header.token_count != call.pairs.size() ||
               v->header.hidden_size != static_cast<uint32_t>(hidden_)) {
      bad = absl::InternalError("combine does not match its dispatch");
    }
    observe(bad.ok());
    if (!bad.ok()) {
      // The shard is alive but could not serve this (e.g. it no longer hosts the expert):
      // try another replica.
      failed->push_back(static_cast<int>(s));
      if (first_failure_.ok()) {
        first_failure_ = absl::UnavailableError(
            absl::StrCat("expert shard ", r.names[s], " (layer ", layer_, "): ", bad.message()));
      }
    } else {
      for (uint32_t li = 0; li < v->header.token_count; ++li) {
        v->RowToFloat(li, pair_rows_.data() + call.pairs[li] * hidden_);
      }
    }
    client_->ReleaseBuffer(std::move(reply_));
    reply_ = std::vector<uint8_t>();
  }
  return absl::OkStatus();
}

absl::Status RemoteRoutedExperts::Finish(float* out) {
  // failed_ may already hold shards whose Post failed in Begin.
  pair_rows_.resize(static_cast<size_t>(t_ * k_ * hidden_));
  Collect(&failed_).IgnoreError();
  const size_t ns = routing_->peers.size();
  for (size_t attempt = 0; !failed_.empty(); ++attempt) {
    if (attempt >= ns) break;
    for (int s : failed_) avoid_[static_cast<size_t>(s)] = 1;
    retry_pairs_.clear();
    for (int64_t p = 0; p < t_ * k_; ++p) {
      const int c = choice_[static_cast<size_t>(p)];
      if (c >= 0 && std::find(failed_.begin(), failed_.end(), c) != failed_.end()) {
        retry_pairs_.push_back(p);
      }
    }
    failed_.clear();
    rerouted_ += retry_pairs_.size();
    // The retry is a new round trip with its own deadline: reusing the first one (already passed
    // when the failure was a deadline) failed the healthy replica at once and marked it dead.
    deadline_ = transport::Clock::now() + options_.deadline;
    // Pairs already combined must not be sent again: only the retried ones get a choice.
    for (int& c : choice_) c = -1;
    const absl::Status st = Dispatch(retry_pairs_, avoid_);
    if (!st.ok()) {
      absl::Status first = first_failure_;
      first_failure_ = absl::OkStatus();
      return absl::Status(
          first.ok() ? st.code() : first.code(),
          absl::StrCat(first.ok() ? "" : first.message(), first.ok() ? "" : "; ", st.message()));
    }
    Collect(&failed_).IgnoreError();
  }
  const absl::Status first = first_failure_;
  first_failure_ = absl::OkStatus();
  if (!failed_.empty()) {
    failed_.clear();
    return first;
  }
  CombineRanked(pair_rows_.data(), w_, t_, k_, hidden_, out);
  return absl::OkStatus();
}

}  // namespace dmoe
