#include "router/member.h"

#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <fstream>

#include "common/internal_tls.h"
#include "common/logging.h"
#include "common/mutex.h"

namespace dmoe::router {
namespace {

int64_t NowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

}  // namespace

void ExitOnRefusal(const std::string& why) {
  spdlog::error("exiting: the router refused this node ({})", why);
  spdlog::default_logger()->flush();
  std::fflush(nullptr);
  std::_Exit(2);
}

std::string AdvertisedAddress(const std::string& listen_address, const std::string& host) {
  const size_t colon = listen_address.rfind(':');
  if (host.empty() || colon == std::string::npos) return listen_address;
  return host + listen_address.substr(colon);
}

RouterMember::RouterMember(MemberOptions options) : options_(std::move(options)) {
  grpc::ChannelArguments args;
  // Reconnect quickly after a router restart.
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 500);
  // A router host that dies without closing its connections (or is cut off) is noticed within
  // ~10 s: a keepalive ping every 5 s while the watch is open, unanswered for 5 s, closes the
  // connection, and the next call reconnects (to a new router at the same address). Else the
  // watch waited on it until TCP gave up (about 15 min) and heartbeats timed out on it.
  args.SetInt(GRPC_ARG_KEEPALIVE_TIME_MS, 5000);
  args.SetInt(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, 5000);
  args.SetInt(GRPC_ARG_HTTP2_MAX_PINGS_WITHOUT_DATA, 0);  // a quiet watch pings on
  channel_ = InternalChannel(options_.router_address, args);
  stub_ = internal::RouterService::NewStub(channel_);
}

RouterMember::~RouterMember() { Stop(); }

void RouterMember::Authorize(grpc::ClientContext* ctx) const {
  AddClusterToken(ctx, options_.cluster_token);
  ctx->set_deadline(std::chrono::system_clock::now() + options_.rpc_deadline);
}

void RouterMember::StartWatch(bool targets,
                              std::function<void(const internal::PlacementUpdate&)> on_update) {
  watch_thread_ = std::thread([this, targets, on_update = std::move(on_update)] {
    bool warned = false;
    while (!stop_) {
      grpc::ClientContext ctx;
      AddClusterToken(&ctx, options_.cluster_token);
      {
        MutexLock l(&watch_mu_);
        if (stop_) break;
        watch_ctx_ = &ctx;
      }
      internal::WatchRequest req;
      req.set_targets(targets);
      auto stream = stub_->WatchPlacement(&ctx, req);
      internal::PlacementUpdate u;
      while (stream->Read(&u)) {
        warned = false;
        const uint64_t seen = std::max(u.version(), u.active_version());
        if (seen > known_version_) known_version_ = seen;
        on_update(u);
      }
      const grpc::Status st = stream->Finish();
      {
        MutexLock l(&watch_mu_);
        watch_ctx_ = nullptr;
      }
      if (stop_) break;
      if (!warned) {
        spdlog::warn("router watch: {} (keeping the last map; retrying)", st.error_message());
        warned = true;
      }
      for (int i = 0; i < 5 && !stop_; ++i)
        std::this_thread::sleep_for(std::chrono::milliseconds(40));
    }
  });
}

bool RouterMember::RegisterOnce() {
  grpc::ClientContext ctx;
  Authorize(&ctx);
  internal::RegisterRequest req = registration_;
  // Everything this node has seen, ready targets included: a restarted router must number its
  // next target above them, or a stale "ready" could activate a map the node has not loaded.
  uint64_t known = known_version_;
  if (ready_version_) known = std::max(known, ready_version_());
  req.set_placement_version(known);
  internal::RegisterReply reply;
  const grpc::Status st = stub_->Register(&ctx, req, &reply);
  if (st.error_code() == grpc::StatusCode::FAILED_PRECONDITION) {
    if (ever_registered_) {
      // It was in the cluster (the router restarted, or its lease lapsed, and an unlike node
      // registered first): serving on is safer than dying mid-stream; keep trying.
      spdlog::error("the router refuses this node now: {} (serving on; retrying)",
                    st.error_message());
      return false;
    }
    spdlog::error("the router refused this node: {}", st.error_message());
    if (on_refused_) on_refused_(st.error_message());
    refused_ = true;
    return false;
  }
  if (!st.ok()) return false;
  ever_registered_ = true;
  lease_ms_ = std::max<int64_t>(30, reply.lease_ms());
  last_ok_ns_ = NowNs();
  return true;
}

bool RouterMember::HeartbeatOnce(bool reregister) {
  grpc::ClientContext ctx;
  Authorize(&ctx);
  internal::HeartbeatRequest req;
  req.set_node_id(registration_.node_id());
  if (ready_version_) req.set_ready_version(ready_version_());
  internal::HeartbeatReply reply;
  const grpc::Status st = stub_->Heartbeat(&ctx, req, &reply);
  if (st.error_code() == grpc::StatusCode::NOT_FOUND) {
    // The router forgot us (restart, or our lease lapsed): register again, then report.
    return reregister && RegisterOnce() && HeartbeatOnce(/*reregister=*/false);
  }
  if (!st.ok()) return false;
  lease_ms_ = std::max<int64_t>(30, reply.lease_ms());
  if (reply.placement_version() > known_version_) known_version_ = reply.placement_version();
  last_ok_ns_ = NowNs();
  return true;
}

void RouterMember::StartMembership(internal::RegisterRequest registration,
                                   std::function<uint64_t()> ready_version,
                                   std::function<void(const std::string& why)> on_refused) {
  registration_ = std::move(registration);
  ready_version_ = std::move(ready_version);
  on_refused_ = std::move(on_refused);
  beat_thread_ = std::thread([this] {
    bool warned = false;
    while (!stop_) {
      const bool ok =
          registered_ ? HeartbeatOnce() : (registered_ = RegisterOnce()) && HeartbeatOnce();
      if (refused_) break;
      if (!ok && !warned) {
        spdlog::warn("router {}: unreachable (serving on; retrying)", options_.router_address);
      }
      warned = !ok;
      MutexLock l(&mu_);
      const auto until =
          std::chrono::steady_clock::now() + std::chrono::milliseconds(ok ? lease_ms_ / 3 : 100);
      while (!stop_ && !beat_now_ && wake_.WaitUntil(&mu_, until)) {
      }
      beat_now_ = false;
    }
  });
}

void RouterMember::HeartbeatNow() {
  MutexLock l(&mu_);
  beat_now_ = true;
  wake_.SignalAll();
}

absl::StatusOr<bool> RouterMember::Deregister() {
  grpc::ClientContext ctx;
  Authorize(&ctx);
  internal::DeregisterRequest req;
  req.set_node_id(registration_.node_id());
  internal::DeregisterReply reply;
  const grpc::Status st = stub_->Deregister(&ctx, req, &reply);
  if (!st.ok()) {
    return absl::Status(static_cast<absl::StatusCode>(st.error_code()), st.error_message());
  }
  return reply.planned_out();
}

absl::StatusOr<internal::ListNodesReply> RouterMember::ListNodes() {
  grpc::ClientContext ctx;
  Authorize(&ctx);
  internal::ListNodesReply reply;
  const grpc::Status st = stub_->ListNodes(&ctx, internal::ListNodesRequest(), &reply);
  if (!st.ok()) {
    return absl::Status(static_cast<absl::StatusCode>(st.error_code()), st.error_message());
  }
  return reply;
}

absl::Status RouterMember::ReportLoad(const internal::LoadReport& report) {
  grpc::ClientContext ctx;
  Authorize(&ctx);
  internal::LoadReply reply;
  const grpc::Status st = stub_->ReportLoad(&ctx, report, &reply);
  if (!st.ok()) {
    return absl::Status(static_cast<absl::StatusCode>(st.error_code()), st.error_message());
  }
  return absl::OkStatus();
}

void RouterMember::Stop() {
  {
    MutexLock l(&mu_);
    stop_ = true;
    wake_.SignalAll();
  }
  {
    MutexLock l(&watch_mu_);
    if (watch_ctx_ != nullptr) watch_ctx_->TryCancel();
  }
  if (watch_thread_.joinable()) watch_thread_.join();
  if (beat_thread_.joinable()) beat_thread_.join();
}

double RouterMember::heartbeat_age_seconds() const {
  const int64_t last = last_ok_ns_;
  if (last == 0) return -1;
  return static_cast<double>(NowNs() - last) * 1e-9;
}

}  // namespace dmoe::router
