#include "expert_service/shard_client.h"

#include <grpcpp/grpcpp.h>

#include "absl/strings/str_cat.h"
#include "proto/expert_control.grpc.pb.h"
#include "transport/ucx.h"

namespace dmoe {

absl::StatusOr<std::unique_ptr<ExpertShardSet>> ExpertShardSet::Connect(
    const ModelConfig& config, const std::vector<std::string>& control_addresses,
    const ShardClientOptions& options) {
  if (control_addresses.empty()) return absl::InvalidArgumentError("no expert shard addresses");
  auto set = std::unique_ptr<ExpertShardSet>(new ExpertShardSet());
  auto client = transport::NewUcxClient();
  if (!client.ok()) return client.status();
  set->client_ = std::move(client).value();
  ExpertPlacement placement;
  std::vector<int> peers;
  std::vector<std::string> names;
  for (size_t i = 0; i < control_addresses.size(); ++i) {
    const std::string& addr = control_addresses[i];
    auto channel = grpc::CreateChannel(addr, grpc::InsecureChannelCredentials());
    auto stub = internal::ExpertControl::NewStub(channel);
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + options.control_deadline);
    internal::GetInfoRequest req;
    internal::GetInfoReply info;
    const grpc::Status st = stub->GetInfo(&ctx, req, &info);
    if (!st.ok()) {
      return absl::UnavailableError(
          absl::StrCat("expert shard ", addr, ": control API: ", st.error_message()));
    }
    if (info.hidden_size() != config.hidden_size ||
        info.num_hidden_layers() != config.num_hidden_layers ||
        info.n_routed_experts() != config.n_routed_experts) {
      return absl::FailedPreconditionError(
          absl::StrCat("expert shard ", addr, " serves a different model shape (hidden_size ",
                       info.hidden_size(), ", layers ", info.num_hidden_layers(), ", experts ",
                       info.n_routed_experts(), ")"));
    }
    const std::string data = options.connect == UcxConnectMode::kListener
                                 ? info.ucx_address()
                                 : info.ucx_worker_address();
    auto peer = set->client_->Connect(data);
    if (!peer.ok()) {
      return absl::UnavailableError(absl::StrCat("expert shard ", addr, ": data plane ", data, ": ",
                                                 peer.status().message()));
    }
    std::vector<std::pair<int64_t, int64_t>> experts;
    for (const auto& e : info.experts()) experts.emplace_back(e.layer(), e.expert());
    placement.Add(static_cast<int>(i), experts);
    peers.push_back(*peer);
    names.push_back(addr);
  }
  if (auto st = placement.CheckCovers(config); !st.ok()) return st;
  set->experts_b_ = std::make_unique<RemoteRoutedExperts>(config, set->client_.get(), peers, names,
                                                          placement, options.remote);
  set->experts_ =
      std::make_unique<RemoteRoutedExperts>(config, set->client_.get(), std::move(peers),
                                            std::move(names), std::move(placement), options.remote);
  return set;
}

}  // namespace dmoe
