// API keys of the gateway's public APIs (gRPC and HTTP alike): a file with one key per line,
// optionally followed by its own limit of requests in flight.
#ifndef DMOE_GATEWAY_API_KEYS_H_
#define DMOE_GATEWAY_API_KEYS_H_

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "common/mutex.h"

namespace dmoe::gateway {

// Blank lines and lines starting with '#' are ignored. Thread-safe.
class ApiKeys {
 public:
  ApiKeys() = default;  // no keys: every request is allowed
  static absl::StatusOr<std::unique_ptr<ApiKeys>> Load(const std::string& path, int64_t limit);
  bool enabled() const { return !limits_.empty(); }
  // `authorization` is the request's Authorization header / metadata value (empty: none).
  // UNAUTHENTICATED without a known "Bearer KEY"; RESOURCE_EXHAUSTED when the key already has its
  // limit of requests in flight. On OK, *key must be Released later (it stays empty without keys).
  absl::Status Acquire(std::string_view authorization, std::string* key);
  // Checks the key without counting a request (e.g. GET /v1/models).
  absl::Status Check(std::string_view authorization) const;
  void Release(const std::string& key);

 private:
  absl::StatusOr<std::string> KeyOf(std::string_view authorization) const;

  mutable Mutex mu_;
  std::map<std::string, int64_t> limits_;  // fixed after Load
  std::map<std::string, int64_t> active_ ABSL_GUARDED_BY(mu_);
};

}  // namespace dmoe::gateway

#endif  // DMOE_GATEWAY_API_KEYS_H_
