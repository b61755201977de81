// Mutual TLS for the internal gRPC APIs (router, attention nodes, expert shards' control API), an
// option beside the cluster token: with --internal-tls-ca/--internal-tls-cert/--internal-tls-key,
// a process serves its internal API over TLS that requires a client certificate signed by the CA,
// and every internal channel it opens presents its own certificate and checks the server's
// against the CA. Certificates name the service kInternalTlsName (subjectAltName DNS), checked
// instead of the address (pods are reached by IP). Process-wide: set once in main, before any
// channel is made. Without the flags everything is plaintext, as before.
#ifndef DMOE_COMMON_INTERNAL_TLS_H_
#define DMOE_COMMON_INTERNAL_TLS_H_

#include <grpcpp/grpcpp.h>

#include <memory>
#include <set>
#include <string>

#include "absl/status/status.h"
#include "common/flags.h"

namespace dmoe {

inline constexpr char kInternalTlsName[] = "dmoe-internal";

// Help text for the three flags, and their names.
extern const char kInternalTlsHelp[];
std::set<std::string> WithInternalTls(std::set<std::string> flags);

struct InternalTls {
  std::string ca, cert, key;  // PEM
  bool enabled() const { return !ca.empty(); }
};

// Reads the three flags (all or none; INVALID_ARGUMENT / NOT_FOUND naming the flag) and makes
// the result the process's setting.
absl::Status SetInternalTlsFromFlags(const Flags& flags);
// Sets it directly (tests).
void SetInternalTls(InternalTls tls);

// Credentials for serving an internal API: mTLS when set, else plaintext.
std::shared_ptr<grpc::ServerCredentials> InternalServerCredentials();
// A channel to an internal API at `target`: mTLS when set, else plaintext.
std::shared_ptr<grpc::Channel> InternalChannel(const std::string& target,
                                               grpc::ChannelArguments args = {});

}  // namespace dmoe

#endif  // DMOE_COMMON_INTERNAL_TLS_H_
