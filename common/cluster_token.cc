#include "common/cluster_token.h"

#include <fstream>

#include "common/secret_compare.h"

namespace dmoe {

absl::StatusOr<std::string> ReadClusterTokenFile(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError("--cluster-token-file: cannot open " + path);
  std::string token;
  std::getline(in, token);
  while (!token.empty() && (token.back() == '\r' || token.back() == ' ' || token.back() == '\t')) {
    token.pop_back();
  }
  while (!token.empty() && (token.front() == ' ' || token.front() == '\t')) token.erase(0, 1);
  if (token.empty()) {
    return absl::InvalidArgumentError("--cluster-token-file: the first line of " + path +
                                      " is empty");
  }
  // It travels as gRPC metadata, whose values gRPC asserts are printable ASCII (a BOM, a UTF-8
  // letter or random bytes aborted the process at its first call), and as a UCX hello's header.
  for (size_t i = 0; i < token.size(); ++i) {
    const unsigned char c = static_cast<unsigned char>(token[i]);
    if (c < 0x20 || c > 0x7e) {
      return absl::InvalidArgumentError(
          "--cluster-token-file: the token in " + path + " has byte " + std::to_string(c) +
          " at offset " + std::to_string(i) +
          "; only printable ASCII (0x20-0x7e) is allowed (e.g. the output of "
          "`openssl rand -hex 32`)");
    }
  }
  // It travels as the header of every UCX hello, which must fit one small message.
  if (token.size() > kMaxClusterTokenBytes) {
    return absl::InvalidArgumentError("--cluster-token-file: the token in " + path + " is over " +
                                      std::to_string(kMaxClusterTokenBytes) + " bytes");
  }
  return token;
}

bool TokenMatches(const std::string& token, const std::string& presented) {
  return token.empty() || ConstantTimeEquals(token, presented);
}

bool CallAuthorized(const grpc::ServerContextBase& ctx, const std::string& token) {
  if (token.empty()) return true;
  auto it = ctx.client_metadata().find(kClusterTokenHeader);
  if (it == ctx.client_metadata().end()) return false;
  return TokenMatches(token, std::string(it->second.data(), it->second.size()));
}

grpc::Status Unauthenticated() {
  return grpc::Status(grpc::StatusCode::UNAUTHENTICATED,
                      std::string("missing or wrong ") + kClusterTokenHeader);
}

void AddClusterToken(grpc::ClientContext* ctx, const std::string& token) {
  if (!token.empty()) ctx->AddMetadata(kClusterTokenHeader, token);
}

}  // namespace dmoe
