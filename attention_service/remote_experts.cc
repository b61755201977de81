#include "attention_service/remote_experts.h"

#include <algorithm>
#include <cstring>
#include <utility>

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
  for (int64_t l = 0; l < c.num_expert_layers(); ++l) {
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

PeerHealth::Peer& PeerHealth::At(int peer) {
  if (static_cast<size_t>(peer) >= peers_.size()) peers_.resize(static_cast<size_t>(peer) + 1);
  return peers_[static_cast<size_t>(peer)];
}

void PeerHealth::MarkDead(int peer) {
  if (peer < 0) return;
  MutexLock l(&mu_);
  Peer& p = At(peer);
  if (p.state == kSetAside) {
    probes_.fetch_sub(1, std::memory_order_relaxed);
    // Its probe (if not being looked at now) still needs its one Wait: CheckProbes abandons it.
    if (p.probe != 0) {
      orphans_.push_back(p.probe);
      orphan_count_.fetch_add(1, std::memory_order_relaxed);
    }
    p.probe = 0;
  }
  p.state = kDead;
}

bool PeerHealth::Dead(int peer) const {
  MutexLock l(&mu_);
  return peer >= 0 && static_cast<size_t>(peer) < peers_.size() &&
         peers_[static_cast<size_t>(peer)].state == kDead;
}

bool PeerHealth::SetAside(int peer) const {
  MutexLock l(&mu_);
  return peer >= 0 && static_cast<size_t>(peer) < peers_.size() &&
         peers_[static_cast<size_t>(peer)].state == kSetAside;
}

void PeerHealth::Snapshot(const std::vector<int>& peers, std::vector<char>* state) const {
  MutexLock l(&mu_);
  state->resize(peers.size());
  for (size_t i = 0; i < peers.size(); ++i) {
    const int p = peers[i];
    (*state)[i] = p >= 0 && static_cast<size_t>(p) < peers_.size()
                      ? peers_[static_cast<size_t>(p)].state
                      : kLive;
  }
}

void PeerHealth::RecordRoundTrip(int peer, std::chrono::nanoseconds rtt) {
  if (peer < 0) return;
  MutexLock l(&mu_);
  Peer& p = At(peer);
  p.misses = 0;
  if (p.ring.empty()) p.ring.assign(kRing, 0);
  p.ring[static_cast<size_t>(p.next)] = rtt.count();
  p.next = (p.next + 1) % kRing;
  p.samples = std::min(p.samples + 1, kRing);
  int64_t first = 0, second = 0;
  for (int i = 0; i < p.samples; ++i) {
    const int64_t v = p.ring[static_cast<size_t>(i)];
    if (v > first) {
      second = first;
      first = v;
    } else if (v > second) {
      second = v;
    }
  }
  p.p99_ns = second;
}

transport::Clock::duration PeerHealth::HedgeAfter(int peer, const HedgeOptions& o) const {
  if (o.factor <= 0) return transport::Clock::duration::max();
  int64_t p99 = -1;
  {
    MutexLock l(&mu_);
    if (peer >= 0 && static_cast<size_t>(peer) < peers_.size() &&
        peers_[static_cast<size_t>(peer)].samples >= 16) {
      p99 = peers_[static_cast<size_t>(peer)].p99_ns;
    }
  }
  if (p99 < 0) return o.initial;
  const auto after = std::chrono::nanoseconds(static_cast<int64_t>(o.factor * p99));
  return std::max<transport::Clock::duration>(after, o.floor);
}

bool PeerHealth::LostRace(int peer, uint64_t id, const HedgeOptions& o) {
  if (peer < 0) return false;
  MutexLock l(&mu_);
  Peer& p = At(peer);
  if (p.state != kLive) return false;
  if (++p.misses < o.set_aside_after) return false;
  p.state = kSetAside;
  p.probe = id;
  probes_.fetch_add(1, std::memory_order_relaxed);
  set_aside_total_.fetch_add(1, std::memory_order_relaxed);
  return true;
}

void PeerHealth::CheckProbes(transport::ClientTransport* client) {
  if (probes_.load(std::memory_order_relaxed) == 0 &&
      orphan_count_.load(std::memory_order_relaxed) == 0) {
    return;
  }
  std::vector<std::pair<int, uint64_t>> done;
  std::vector<uint64_t> orphans;
  {
    MutexLock l(&mu_);
    // Claimed here (probe = 0) so that no other caller Waits it too.
    for (size_t i = 0; i < peers_.size(); ++i) {
      Peer& p = peers_[i];
      if (p.state != kSetAside || p.probe == 0 || !client->Poll(p.probe)) continue;
      done.emplace_back(static_cast<int>(i), p.probe);
      p.probe = 0;
    }
    orphans.swap(orphans_);
    orphan_count_.store(0, std::memory_order_relaxed);
  }
  std::vector<uint8_t> reply;
  for (uint64_t id : orphans) {
    if (client->Wait(id, transport::Clock::now(), &reply).ok()) {
      client->ReleaseBuffer(std::move(reply));
    }
  }
  for (const auto& [peer, id] : done) {
    const absl::Status st = client->Wait(id, transport::Clock::now(), &reply);
    if (st.ok()) client->ReleaseBuffer(std::move(reply));
    MutexLock l(&mu_);
    Peer& p = At(peer);
    if (p.state != kSetAside) continue;  // marked dead meanwhile
    probes_.fetch_sub(1, std::memory_order_relaxed);
    p.misses = 0;
    // Any answer, even an error reply, shows the shard serving again; a failed endpoint does not.
    p.state = st.ok() ? kLive : kDead;
    if (st.ok()) revived_total_.fetch_add(1, std::memory_order_relaxed);
  }
}

int64_t MaxPairsPerMessage(int64_t hidden, wire::WireDType dtype) {
  const int64_t row_bytes = hidden * static_cast<int64_t>(wire::WireDTypeSize(dtype));
  const int64_t by_bytes =
      static_cast<int64_t>(wire::kMaxPayloadBytes) / (row_bytes + wire::kPairBytes);
  return std::max<int64_t>(1, std::min<int64_t>(wire::kMaxTokens, by_bytes));
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
      expert_tokens_(new std::atomic<uint64_t>[static_cast<size_t>(
          std::max<int64_t>(1, c.num_expert_layers() * c.n_routed_experts))]()) {}

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
}

absl::Status RemoteRoutedExperts::Begin(int64_t layer, const float* x, int64_t t,
                                        const int32_t* ids, const float* w, int64_t k) {
  layer_ = layer;
  x_ = x;
  ids_ = ids;
  w_ = w;
  t_ = t;
  k_ = k;
  const int64_t max_pairs = options_.max_pairs_per_call > 0
                                ? options_.max_pairs_per_call
                                : MaxPairsPerMessage(hidden_, options_.dtype);
  call_tokens_ = static_cast<size_t>(std::max<int64_t>(1, max_pairs / std::max<int64_t>(1, k)));
  const size_t np = static_cast<size_t>(t * k);
  all_pairs_.resize(np);
  for (int64_t p = 0; p < t * k; ++p) {
    all_pairs_[static_cast<size_t>(p)] = p;
    if (ids[p] >= 0 && ids[p] < n_experts_) {
      expert_tokens_[static_cast<size_t>(layer * n_experts_ + ids[p])].fetch_add(
          1, std::memory_order_relaxed);
    }
  }
  choice_.assign(np, -1);
  pair_done_.assign(np, 0);
  pair_open_.assign(np, 0);
  pair_tried_.assign(np, 0);
  chosen_j_.assign(np, 0);
  pairs_left_ = t * k;
  avoid_.assign(routing_->peers.size(), 0);
  n_calls_ = 0;
  post_failed_.clear();
  first_failure_ = absl::OkStatus();
  fatal_ = absl::OkStatus();
  health_->CheckProbes(client_);
  return Dispatch(all_pairs_);
}

absl::Status RemoteRoutedExperts::Dispatch(const std::vector<int64_t>& todo) {
  const size_t ns = routing_->peers.size();
  health_->Snapshot(routing_->peers, &state_);
  round_call_.assign(ns, -1);
  local_index_.assign(static_cast<size_t>(t_) * ns, -1);
  local_call_.assign(static_cast<size_t>(t_) * ns, -1);
  assigned_.assign(ns, 0);
  const size_t first = n_calls_;
  const absl::Status st = PlanReplicas(todo);
  if (!st.ok()) {
    n_calls_ = first;
    return st;
  }
  ++seq_;
  for (size_t c = first; c < n_calls_; ++c) Post(c, todo);
  return absl::OkStatus();
}

absl::Status RemoteRoutedExperts::PlanReplicas(const std::vector<int64_t>& todo) {
  const ExpertRouting& r = *routing_;
  const int64_t ns = static_cast<int64_t>(r.peers.size());
  // A replica per pair: a live one the token already goes to, else the live one with the fewest
  // tokens so far; set-aside shards and shards hedged away from in this layer only where no live
  // replica is left (first those the pair has not been to); failed ones never.
  for (int64_t p : todo) {
    const int64_t i = p / k_;
    const std::vector<int>& reps = r.placement.Replicas(layer_, ids_[p]);
    const uint32_t tried = pair_tried_[static_cast<size_t>(p)];
    int best = -1, best_rank = -1, best_j = -1;
    for (int j = 0; j < static_cast<int>(reps.size()); ++j) {
      const int s = reps[static_cast<size_t>(j)];
      const char st = state_[static_cast<size_t>(s)];
      const char avoid = avoid_[static_cast<size_t>(s)];
      if (st == PeerHealth::kDead || avoid == kFailed) continue;
      // 2: live; 1: slow, not yet tried for this pair; 0: slow and tried.
      const int rank = st == PeerHealth::kLive && avoid == kUsable ? 2
                       : j < 32 && (tried >> j & 1u) == 0          ? 1
                                                                   : 0;
      if (rank == 2 && local_index_[static_cast<size_t>(i * ns + s)] >= 0) {
        best = s;
        best_j = j;
        break;
      }
      if (rank > best_rank || (rank == best_rank && assigned_[static_cast<size_t>(s)] <
                                                        assigned_[static_cast<size_t>(best)])) {
        best = s;
        best_rank = rank;
        best_j = j;
      }
    }
    if (best < 0) return NoReplica(p);
    choice_[static_cast<size_t>(p)] = best;
    chosen_j_[static_cast<size_t>(p)] = best_j;
    int64_t& li = local_index_[static_cast<size_t>(i * ns + best)];
    if (li < 0) {
      const size_t c = RoundCall(best);
      ShardCall& call = calls_[c];
      li = static_cast<int64_t>(call.tokens.size());
      call.tokens.push_back(i);
      local_call_[static_cast<size_t>(i * ns + best)] = static_cast<int>(c);
      ++assigned_[static_cast<size_t>(best)];
    }
  }
  // Marked only once every pair has a replica (a failed plan posts nothing).
  for (int64_t p : todo) {
    const int j = chosen_j_[static_cast<size_t>(p)];
    if (j < 32) pair_tried_[static_cast<size_t>(p)] |= 1u << j;
  }
  return absl::OkStatus();
}

absl::Status RemoteRoutedExperts::NoReplica(int64_t p) const {
  // Names the shards that host it and why each is out, for the operator.
  std::string why;
  for (int s : routing_->placement.Replicas(layer_, ids_[p])) {
    const char* state = state_[static_cast<size_t>(s)] == PeerHealth::kDead ? "failed"
                        : avoid_[static_cast<size_t>(s)] == kFailed         ? "failed in this step"
                                                                            : "set aside";
    absl::StrAppend(&why, why.empty() ? " (" : ", ", routing_->names[static_cast<size_t>(s)], ": ",
                    state);
  }
  if (!why.empty()) why += ")";
  return absl::UnavailableError(
      absl::StrCat("no live expert shard serves expert ", ids_[p], " of layer ", layer_, why));
}

size_t RemoteRoutedExperts::RoundCall(int s) {
  int& c = round_call_[static_cast<size_t>(s)];
  if (c >= 0 && calls_[static_cast<size_t>(c)].tokens.size() < call_tokens_) {
    return static_cast<size_t>(c);
  }
  if (n_calls_ == calls_.size()) calls_.emplace_back();
  ShardCall& call = calls_[n_calls_];
  call.shard = s;
  call.open = call.hedged = false;
  call.tokens.clear();
  call.pairs.clear();
  c = static_cast<int>(n_calls_++);
  return static_cast<size_t>(c);
}

void RemoteRoutedExperts::Post(size_t c, const std::vector<int64_t>& todo) {
  const ExpertRouting& r = *routing_;
  const int64_t ns = static_cast<int64_t>(r.peers.size());
  ShardCall& call = calls_[c];
  const int s = call.shard;
  const int peer = r.peers[static_cast<size_t>(s)];
  const int64_t n = static_cast<int64_t>(call.tokens.size());
  rows_.resize(static_cast<size_t>(n * hidden_));
  pairs_.clear();
  for (int64_t li = 0; li < n; ++li) {
    std::memcpy(rows_.data() + li * hidden_, x_ + call.tokens[static_cast<size_t>(li)] * hidden_,
                sizeof(float) * static_cast<size_t>(hidden_));
  }
  for (int64_t p : todo) {
    if (choice_[static_cast<size_t>(p)] != s) continue;
    const size_t ts = static_cast<size_t>((p / k_) * ns + s);
    if (local_call_[ts] != static_cast<int>(c)) continue;  // in another call to s
    const int64_t li = local_index_[ts];
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
  call.seq = seq_;
  auto id = client_->Post(peer, std::move(msg));
  if (!id.ok()) {
    // The peer is known to have failed: Finish sends these pairs elsewhere.
    health_->MarkDead(peer);
    avoid_[static_cast<size_t>(s)] = kFailed;
    RecordFailure(absl::UnavailableError(absl::StrCat(
        "expert shard ", r.names[static_cast<size_t>(s)], ": ", id.status().message())));
    post_failed_.push_back(c);
    return;
  }
  call.id = *id;
  call.open = true;
  call.posted = transport::Clock::now();
  call.deadline = call.posted + options_.deadline;
  // A hedge comes no later than a quarter of the deadline (nor sooner than the floor): a p99
  // inflated by a few slow round trips (a loaded machine, a long prefill chunk) would otherwise
  // put it past the deadline, where it can no longer save the call. A set-aside shard is used
  // only where no live replica is left, yet its call is hedged too: the pair's other replica may
  // be set aside as well but serving (one lost race on a loaded machine sets a shard aside), and
  // Hedge finds out whether there is anywhere left to go.
  const transport::Clock::duration after = health_->HedgeAfter(peer, options_.hedge);
  call.hedge_at = after == transport::Clock::duration::max()
                      ? call.deadline
                      : call.posted + std::min<transport::Clock::duration>(
                                          after, std::max<transport::Clock::duration>(
                                                     options_.deadline / 4, options_.hedge.floor));
  for (int64_t p : call.pairs) ++pair_open_[static_cast<size_t>(p)];
}

void RemoteRoutedExperts::RecordFailure(absl::Status st) {
  if (first_failure_.ok()) first_failure_ = std::move(st);
}

void RemoteRoutedExperts::Resend(const std::vector<int64_t>& pairs) {
  if (pairs.empty()) return;
  rerouted_ += pairs.size();
  const absl::Status st = Dispatch(pairs);
  if (st.ok()) return;
  const absl::Status& first = first_failure_;
  fatal_ = absl::Status(
      first.ok() ? st.code() : first.code(),
      absl::StrCat(first.ok() ? "" : first.message(), first.ok() ? "" : "; ", st.message()));
}

void RemoteRoutedExperts::ResendOrphans(size_t c) {
  // Pairs another open call carries (the original of a hedge, a hedge of it) are left to it.
  retry_pairs_.clear();
  for (int64_t p : calls_[c].pairs) {
    if (!pair_done_[static_cast<size_t>(p)] && pair_open_[static_cast<size_t>(p)] == 0) {
      retry_pairs_.push_back(p);
    }
  }
  Resend(retry_pairs_);
}

void RemoteRoutedExperts::Complete(size_t c) {
  const ExpertRouting& r = *routing_;
  const size_t s = static_cast<size_t>(calls_[c].shard);
  calls_[c].open = false;
  for (int64_t p : calls_[c].pairs) --pair_open_[static_cast<size_t>(p)];
  const absl::Status st = client_->Wait(calls_[c].id, calls_[c].deadline, &reply_);
  const transport::Clock::time_point now = transport::Clock::now();
  ++round_trips_;
  const ShardCall& call = calls_[c];
  // Reported once its reply is judged: a corrupt or error reply is a failed round trip too.
  auto observe = [&](bool ok) {
    if (!options_.observer) return;
    options_.observer(r.names[s], std::chrono::duration<double>(now - call.posted).count(),
                      static_cast<int64_t>(call.tokens.size()), call.bytes_out,
                      st.ok() ? reply_.size() : 0, ok);
  };
  absl::Status bad;
  if (!st.ok()) {
    observe(false);
    health_->MarkDead(r.peers[s]);
    // UNAVAILABLE for a shard's deadline too: the client's own deadline has not passed, and the
    // message says what happened.
    RecordFailure(absl::UnavailableError(
        absl::StrCat("expert shard ", r.names[s], " (layer ", layer_, "): ", st.message())));
  } else {
    auto v = wire::DecodeMessage(reply_.data(), reply_.size());
    if (!v.ok()) {
      bad = v.status();
    } else if (v->header.kind == wire::Kind::kError) {
      bad = absl::InternalError(v->error);
    } else if (v->header.kind != wire::Kind::kCombine || v->header.step_seq != call.seq ||
               v->header.layer != static_cast<uint32_t>(layer_) ||
               v->header.token_count != call.pairs.size() ||
               v->header.hidden_size != static_cast<uint32_t>(hidden_)) {
      bad = absl::InternalError("combine does not match its dispatch");
    }
    observe(bad.ok());
    if (bad.ok()) {
      health_->RecordRoundTrip(r.peers[s], now - call.posted);
      for (uint32_t li = 0; li < v->header.token_count; ++li) {
        const int64_t p = call.pairs[li];
        if (pair_done_[static_cast<size_t>(p)]) continue;  // a faster replica answered it
        v->RowToFloat(li, pair_rows_.data() + p * hidden_);
        pair_done_[static_cast<size_t>(p)] = 1;
        --pairs_left_;
      }
    } else {
      // The shard is alive but could not serve this (e.g. it no longer hosts the expert): try
      // another replica.
      RecordFailure(absl::UnavailableError(
          absl::StrCat("expert shard ", r.names[s], " (layer ", layer_, "): ", bad.message())));
    }
    client_->ReleaseBuffer(std::move(reply_));
    reply_ = std::vector<uint8_t>();
  }
  if (st.ok() && bad.ok()) return;
  avoid_[s] = kFailed;
  ResendOrphans(c);
}

void RemoteRoutedExperts::Hedge(size_t c) {
  // Only pairs not yet answered that another replica can take (not failed, and one the pair has
  // not been to) go: the rest stay with this call. With none, the call just waits for its
  // deadline. A slow replica counts: on a loaded machine the other replica of a stopped shard
  // may be set aside or hedged away from, and it still answers long before the deadline.
  health_->Snapshot(routing_->peers, &state_);
  retry_pairs_.clear();
  for (int64_t p : calls_[c].pairs) {
    if (pair_done_[static_cast<size_t>(p)]) continue;
    const std::vector<int>& reps = routing_->placement.Replicas(layer_, ids_[p]);
    const uint32_t tried = pair_tried_[static_cast<size_t>(p)];
    for (int j = 0; j < static_cast<int>(reps.size()) && j < 32; ++j) {
      const int o = reps[static_cast<size_t>(j)];
      if (state_[static_cast<size_t>(o)] != PeerHealth::kDead &&
          avoid_[static_cast<size_t>(o)] != kFailed && (tried >> j & 1u) == 0) {
        retry_pairs_.push_back(p);
        break;
      }
    }
  }
  if (retry_pairs_.empty()) {
    calls_[c].hedge_at = calls_[c].deadline;
    return;
  }
  calls_[c].hedged = true;
  hedged_.fetch_add(1, std::memory_order_relaxed);
  const size_t s = static_cast<size_t>(calls_[c].shard);
  if (avoid_[s] == kUsable) avoid_[s] = kHedgedAway;
  Dispatch(retry_pairs_).IgnoreError();
}

void RemoteRoutedExperts::DropLate() {
  const transport::Clock::time_point now = transport::Clock::now();
  const bool answered = pairs_left_ == 0;
  for (size_t c = 0; c < n_calls_; ++c) {
    ShardCall& call = calls_[c];
    if (!call.open) continue;
    call.open = false;
    for (int64_t p : call.pairs) --pair_open_[static_cast<size_t>(p)];
    late_dropped_.fetch_add(1, std::memory_order_relaxed);
    // A hedged call outrun by its hedge (the layer was answered without it) lost a race; its
    // reply may become the shard's probe.
    const int peer = routing_->peers[static_cast<size_t>(call.shard)];
    if (answered && call.hedged && health_->LostRace(peer, call.id, options_.hedge)) continue;
    if (client_->Wait(call.id, now, &reply_).ok()) {
      client_->ReleaseBuffer(std::move(reply_));
      reply_ = std::vector<uint8_t>();
    }
  }
}

absl::Status RemoteRoutedExperts::Finish(float* out) {
  pair_rows_.resize(static_cast<size_t>(t_ * k_ * hidden_));
  // Bounded: a hedge sends a pair only to a replica it has not been to, and every failure adds a
  // shard to avoid_, so a pair is in at most about twice as many calls as it has replicas, and
  // each ends by its deadline.
  while (pairs_left_ > 0 && fatal_.ok()) {
    if (!post_failed_.empty()) {
      const size_t c = post_failed_.back();
      post_failed_.pop_back();
      ResendOrphans(c);
      continue;
    }
    wait_ids_.clear();
    wait_calls_.clear();
    transport::Clock::time_point next = transport::Clock::time_point::max();
    for (size_t c = 0; c < n_calls_; ++c) {
      const ShardCall& call = calls_[c];
      if (!call.open) continue;
      wait_ids_.push_back(call.id);
      wait_calls_.push_back(c);
      next = std::min(next, call.hedged ? call.deadline : std::min(call.hedge_at, call.deadline));
    }
    if (wait_ids_.empty()) break;
    const int i = client_->WaitAny(wait_ids_.data(), wait_ids_.size(), next);
    if (i >= 0) {
      Complete(wait_calls_[static_cast<size_t>(i)]);
      continue;
    }
    const transport::Clock::time_point now = transport::Clock::now();
    for (size_t c : wait_calls_) {
      if (!calls_[c].open) continue;
      if (now >= calls_[c].deadline) {
        Complete(c);
      } else if (!calls_[c].hedged && now >= calls_[c].hedge_at) {
        Hedge(c);
      }
    }
  }
  DropLate();
  absl::Status first = std::move(first_failure_);
  first_failure_ = absl::OkStatus();
  if (!fatal_.ok()) return std::exchange(fatal_, absl::OkStatus());
  if (pairs_left_ > 0) {
    return first.ok() ? absl::InternalError("expert pairs left unanswered") : first;
  }
  CombineRanked(pair_rows_.data(), w_, t_, k_, hidden_, out);
  return absl::OkStatus();
}

}  // namespace dmoe
