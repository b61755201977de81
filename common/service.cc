#include "common/service.h"

#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "common/grpc_setup.h"
#include "common/logging.h"

namespace dmoe {

ServiceMain::ServiceMain(std::string name) : name_(std::move(name)) {
  sigemptyset(&stop_);
  sigaddset(&stop_, SIGTERM);
  sigaddset(&stop_, SIGINT);
  (void)InitLogging(name_, "info");
}

ServiceMain::~ServiceMain() { StopGrpc(std::chrono::milliseconds(0)); }

absl::Status ServiceMain::SetLogLevel(const Flags& flags) {
  return InitLogging(name_, flags.StringOr("log-level", "info"));
}

int ServiceMain::Fail(const absl::Status& s) const {
  spdlog::error("error: {}", std::string(s.message()));
  return 2;
}

void ServiceMain::BlockStopSignals() { pthread_sigmask(SIG_BLOCK, &stop_, nullptr); }

absl::StatusOr<std::string> ServiceMain::StartGrpc(const char* flag, const std::string& listen,
                                                   const std::vector<grpc::Service*>& services,
                                                   std::shared_ptr<grpc::ServerCredentials> creds) {
  EnableHealthAndReflection();
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(listen, creds ? creds : grpc::InsecureServerCredentials(), &port);
  for (grpc::Service* s : services) builder.RegisterService(s);
  server_ = builder.BuildAndStart();
  if (server_ == nullptr || port == 0) {
    server_.reset();
    return absl::UnavailableError(absl::StrCat("--", flag, ": cannot listen on ", listen));
  }
  return absl::StrCat(listen.substr(0, listen.rfind(':')), ":", port);
}

absl::StatusOr<std::string> ServiceMain::Serve(const Flags& flags,
                                               const std::vector<grpc::Service*>& services,
                                               const char* service,
                                               const std::string& metrics_address,
                                               nlohmann::json extra, bool ready,
                                               std::shared_ptr<grpc::ServerCredentials> creds) {
  auto addr =
      StartGrpc("grpc-listen", flags.StringOr("grpc-listen", "127.0.0.1:0"), services, creds);
  if (!addr.ok()) return addr.status();
  SetReadiness(server(), service, ready);
  spdlog::info("serving on {}, metrics on http://{}/metrics", *addr, metrics_address);
  if (flags.Has("ready-file")) {
    extra["grpc"] = *addr;
    extra["metrics"] = metrics_address;
    if (auto s = WriteReadyFile(flags.StringOr("ready-file", ""), extra); !s.ok()) return s;
  }
  return addr;
}

int ServiceMain::WaitForStop() {
  int sig = 0;
  sigwait(&stop_, &sig);
  return sig;
}

void ServiceMain::StopGrpc(std::chrono::milliseconds grace) {
  if (server_ == nullptr) return;
  server_->Shutdown(std::chrono::system_clock::now() + grace);
  server_.reset();
}

absl::Status WriteReadyFile(const std::string& path, nlohmann::json fields) {
  fields["pid"] = static_cast<int64_t>(getpid());
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp);
    out << fields.dump() << "\n";
    if (!out.flush()) return absl::InternalError(absl::StrCat("--ready-file: cannot write ", tmp));
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    return absl::InternalError(absl::StrCat("--ready-file: cannot rename ", tmp, " to ", path));
  }
  return absl::OkStatus();
}

absl::StatusOr<nlohmann::json> ReadReadyFile(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat(path, ": not written yet"));
  std::stringstream ss;
  ss << in.rdbuf();
  nlohmann::json j = nlohmann::json::parse(ss.str(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) {
    return absl::DataLossError(absl::StrCat(path, ": not a JSON object: ", ss.str()));
  }
  return j;
}

}  // namespace dmoe
