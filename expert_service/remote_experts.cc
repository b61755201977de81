#include "expert_service/remote_experts.h"

#include <cstring>

#include "absl/strings/str_cat.h"

namespace dmoe {

void ExpertPlacement::Add(int shard, const std::vector<std::pair<int64_t, int64_t>>& experts) {
  for (const auto& e : experts) shard_.emplace(e, shard);
}

int ExpertPlacement::ShardOf(int64_t layer, int64_t expert) const {
  auto it = shard_.find({layer, expert});
  return it == shard_.end() ? -1 : it->second;
}

absl::Status ExpertPlacement::CheckCovers(const ModelConfig& c) const {
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    if (!c.IsMoeLayer(l)) continue;
    for (int64_t e = 0; e < c.n_routed_experts; ++e) {
      if (ShardOf(l, e) < 0) {
        return absl::InvalidArgumentError(
            absl::StrCat("no expert shard hosts expert ", e, " of layer ", l));
      }
    }
  }
  return absl::OkStatus();
}

RemoteRoutedExperts::RemoteRoutedExperts(const ModelConfig& c, transport::ClientTransport* client,
                                         std::vector<int> peers, std::vector<std::string> names,
                                         ExpertPlacement placement, RemoteExpertsOptions options)
    : hidden_(c.hidden_size),
      client_(client),
      peers_(std::move(peers)),
      names_(std::move(names)),
      placement_(std::move(placement)),
      options_(options),
      calls_(peers_.size()) {}

absl::Status RemoteRoutedExperts::Begin(int64_t layer, const float* x, int64_t t,
                                        const int32_t* ids, const float* w, int64_t k) {
  layer_ = layer;
  begun_ = transport::Clock::now();
  deadline_ = begun_ + options_.deadline;
  const int64_t nshards = static_cast<int64_t>(peers_.size());
  local_index_.assign(static_cast<size_t>(t * nshards), -1);
  for (ShardCall& c : calls_) {
    c.posted = false;
    c.tokens.clear();
  }
  // Plan: unique tokens per destination shard.
  for (int64_t i = 0; i < t; ++i) {
    for (int64_t j = 0; j < k; ++j) {
      const int s = placement_.ShardOf(layer, ids[i * k + j]);
      if (s < 0) {
        return absl::UnavailableError(absl::StrCat("no live expert shard hosts expert ",
                                                   ids[i * k + j], " of layer ", layer));
      }
      int64_t& li = local_index_[static_cast<size_t>(i * nshards + s)];
      if (li < 0) {
        li = static_cast<int64_t>(calls_[static_cast<size_t>(s)].tokens.size());
        calls_[static_cast<size_t>(s)].tokens.push_back(i);
      }
    }
  }
  ++seq_;
  for (int s = 0; s < nshards; ++s) {
    ShardCall& call = calls_[static_cast<size_t>(s)];
    if (call.tokens.empty()) continue;
    const int64_t n = static_cast<int64_t>(call.tokens.size());
    rows_.resize(static_cast<size_t>(n * hidden_));
    pairs_.clear();
    for (int64_t li = 0; li < n; ++li) {
      const int64_t i = call.tokens[static_cast<size_t>(li)];
      std::memcpy(rows_.data() + li * hidden_, x + i * hidden_,
                  sizeof(float) * static_cast<size_t>(hidden_));
      for (int64_t j = 0; j < k; ++j) {
        if (placement_.ShardOf(layer, ids[i * k + j]) == s) {
          pairs_.push_back(wire::Pair{static_cast<uint32_t>(li),
                                      static_cast<uint32_t>(ids[i * k + j]), w[i * k + j]});
        }
      }
    }
    wire::Header h;
    h.sender_id = options_.sender_id;
    h.step_seq = seq_;
    h.layer = static_cast<uint32_t>(layer);
    h.token_count = static_cast<uint32_t>(n);
    h.hidden_size = static_cast<uint32_t>(hidden_);
    h.dtype = options_.dtype;
    std::vector<uint8_t> msg = client_->AcquireBuffer();
    wire::EncodeDispatch(h, rows_.data(), pairs_, &msg);
    call.bytes_out = msg.size();
    auto id = client_->Post(peers_[static_cast<size_t>(s)], std::move(msg));
    if (!id.ok()) {
      // Collect what was already posted, so that no request stays in flight.
      for (ShardCall& c : calls_) {
        if (!c.posted) continue;
        c.posted = false;
        client_->Wait(c.id, transport::Clock::now(), &reply_).IgnoreError();
        client_->ReleaseBuffer(std::move(reply_));
        reply_ = std::vector<uint8_t>();
      }
      return absl::UnavailableError(absl::StrCat("expert shard ", names_[static_cast<size_t>(s)],
                                                 ": ", id.status().message()));
    }
    call.id = *id;
    call.posted = true;
  }
  return absl::OkStatus();
}

absl::Status RemoteRoutedExperts::Finish(float* out) {
  absl::Status first_error;
  row_.resize(static_cast<size_t>(hidden_));
  for (size_t s = 0; s < calls_.size(); ++s) {
    ShardCall& call = calls_[s];
    if (!call.posted) continue;
    call.posted = false;
    const absl::Status st = client_->Wait(call.id, deadline_, &reply_);
    ++round_trips_;
    if (options_.observer) {
      options_.observer(static_cast<int>(s),
                        std::chrono::duration<double>(transport::Clock::now() - begun_).count(),
                        static_cast<int64_t>(call.tokens.size()), call.bytes_out,
                        st.ok() ? reply_.size() : 0, st.ok());
    }
    if (!st.ok()) {
      if (first_error.ok()) {
        first_error = absl::Status(
            st.code() == absl::StatusCode::kDeadlineExceeded ? absl::StatusCode::kDeadlineExceeded
                                                             : absl::StatusCode::kUnavailable,
            absl::StrCat("expert shard ", names_[s], " (layer ", layer_, "): ", st.message()));
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
               v->header.token_count != call.tokens.size() ||
               v->header.hidden_size != static_cast<uint32_t>(hidden_)) {
      bad = absl::InternalError("combine does not match its dispatch");
    }
    if (!bad.ok()) {
      if (first_error.ok()) {
        first_error = absl::UnavailableError(
            absl::StrCat("expert shard ", names_[s], " (layer ", layer_, "): ", bad.message()));
      }
    } else {
      for (uint32_t li = 0; li < v->header.token_count; ++li) {
        v->RowToFloat(li, row_.data());
        float* dst = out + call.tokens[li] * hidden_;
        for (int64_t j = 0; j < hidden_; ++j) dst[j] += row_[static_cast<size_t>(j)];
      }
    }
    client_->ReleaseBuffer(std::move(reply_));
    reply_ = std::vector<uint8_t>();
  }
  return first_error;
}

}  // namespace dmoe
