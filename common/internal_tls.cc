#include "common/internal_tls.h"

#include <fstream>
#include <sstream>

#include "common/mutex.h"

namespace dmoe {
namespace {

Mutex g_mu;
InternalTls* g_tls ABSL_GUARDED_BY(g_mu) = nullptr;

InternalTls Current() {
  MutexLock l(&g_mu);
  return g_tls == nullptr ? InternalTls() : *g_tls;
}

absl::StatusOr<std::string> ReadPem(const char* flag, const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(std::string("--") + flag + ": cannot open " + path);
  std::stringstream s;
  s << in.rdbuf();
  if (s.str().find("-----BEGIN ") == std::string::npos) {
    return absl::InvalidArgumentError(std::string("--") + flag + ": " + path + " is not PEM");
  }
  return s.str();
}

}  // namespace

const char kInternalTlsHelp[] = R"(
Internal mTLS (optional; all three or none; every process of a cluster alike):
  --internal-tls-ca F     CA certificate (PEM) that signs every process's certificate
  --internal-tls-cert F   this process's certificate (PEM), subjectAltName DNS:dmoe-internal
  --internal-tls-key F    its private key (PEM)
)";

std::set<std::string> WithInternalTls(std::set<std::string> flags) {
  flags.insert({"internal-tls-ca", "internal-tls-cert", "internal-tls-key"});
  return flags;
}

absl::Status SetInternalTlsFromFlags(const Flags& flags) {
  const int given =
      flags.Has("internal-tls-ca") + flags.Has("internal-tls-cert") + flags.Has("internal-tls-key");
  if (given == 0) return absl::OkStatus();
  if (given != 3) {
    return absl::InvalidArgumentError(
        "--internal-tls-ca, --internal-tls-cert, --internal-tls-key: give all three or none");
  }
  InternalTls t;
  for (auto [flag, field] : {std::pair<const char*, std::string*>{"internal-tls-ca", &t.ca},
                             {"internal-tls-cert", &t.cert},
                             {"internal-tls-key", &t.key}}) {
    auto pem = ReadPem(flag, flags.StringOr(flag, ""));
    if (!pem.ok()) return pem.status();
    *field = *std::move(pem);
  }
  SetInternalTls(std::move(t));
  return absl::OkStatus();
}

void SetInternalTls(InternalTls tls) {
  MutexLock l(&g_mu);
  delete g_tls;
  g_tls = new InternalTls(std::move(tls));
}

std::shared_ptr<grpc::ServerCredentials> InternalServerCredentials() {
  const InternalTls t = Current();
  if (!t.enabled()) return grpc::InsecureServerCredentials();
  grpc::SslServerCredentialsOptions o(GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  o.pem_root_certs = t.ca;
  o.pem_key_cert_pairs.push_back({t.key, t.cert});
  return grpc::SslServerCredentials(o);
}

std::shared_ptr<grpc::Channel> InternalChannel(const std::string& target,
                                               grpc::ChannelArguments args) {
  const InternalTls t = Current();
  if (!t.enabled()) {
    return grpc::CreateCustomChannel(target, grpc::InsecureChannelCredentials(), args);
  }
  grpc::SslCredentialsOptions o;
  o.pem_root_certs = t.ca;
  o.pem_private_key = t.key;
  o.pem_cert_chain = t.cert;
  args.SetSslTargetNameOverride(kInternalTlsName);
  return grpc::CreateCustomChannel(target, grpc::SslCredentials(o), args);
}

}  // namespace dmoe
