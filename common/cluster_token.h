// The cluster token: a shared secret that every internal gRPC call carries in the
// "x-dmoe-cluster-token" metadata (router, attention nodes' API, expert shards' control API) and
// that UCX peers present when they connect to a shard. A process started without one
// (--cluster-token-file absent) checks nothing: a local development cluster.
#ifndef DMOE_COMMON_CLUSTER_TOKEN_H_
#define DMOE_COMMON_CLUSTER_TOKEN_H_

#include <grpcpp/grpcpp.h>

#include <cstddef>
#include <string>

#include "absl/status/statusor.h"

namespace dmoe {

inline constexpr char kClusterTokenHeader[] = "x-dmoe-cluster-token";
inline constexpr size_t kMaxClusterTokenBytes = 512;

// The token on the first line of `path` (trailing spaces and CR removed). NOT_FOUND naming the
// flag when the file cannot be read; INVALID_ARGUMENT when the token is empty or longer than
// kMaxClusterTokenBytes.
absl::StatusOr<std::string> ReadClusterTokenFile(const std::string& path);

// True when `token` is empty or equal to `presented` (compared in constant time).
bool TokenMatches(const std::string& token, const std::string& presented);

// True when no token is required or the call carries it.
bool CallAuthorized(const grpc::ServerContextBase& ctx, const std::string& token);

// The status of a call without the right token.
grpc::Status Unauthenticated();

// Adds the token to an outgoing call (nothing when empty).
void AddClusterToken(grpc::ClientContext* ctx, const std::string& token);

// A server-streaming reactor that ends its call at once with `status` (e.g. Unauthenticated()).
template <typename Response>
class RefusedStream : public grpc::ServerWriteReactor<Response> {
 public:
  explicit RefusedStream(grpc::Status status) { this->Finish(std::move(status)); }
  void OnDone() override { delete this; }
};

}  // namespace dmoe

#endif  // DMOE_COMMON_CLUSTER_TOKEN_H_
