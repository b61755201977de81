#include "common/service.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "common/build_info.h"
#include "common/grpc_setup.h"
#include "common/logging.h"

namespace dmoe {

namespace {

// SIGTERM/SIGINT -> one byte on this pipe (write is async-signal-safe); 0 wakes the watcher to end.
int g_signal_pipe[2] = {-1, -1};

void OnStopSignal(int sig) {
  const int saved = errno;
  const unsigned char b = static_cast<unsigned char>(sig);
  if (write(g_signal_pipe[1], &b, 1) < 0) {
  }
  errno = saved;
}

}  // namespace

ServiceMain::ServiceMain(std::string name) : name_(std::move(name)) {
  (void)InitLogging(name_, "info");
  if (pipe2(g_signal_pipe, O_CLOEXEC) != 0) {
    std::fprintf(stderr, "%s: pipe: %s\n", name_.c_str(), std::strerror(errno));
    std::_Exit(2);
  }
  struct sigaction sa;
  std::memset(&sa, 0, sizeof(sa));
  sa.sa_handler = OnStopSignal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;
  sigaction(SIGTERM, &sa, nullptr);
  sigaction(SIGINT, &sa, nullptr);
  // A write to a closed pipe fails (EPIPE) instead of killing the service. UCX prints its
  // warnings to stdout from its own threads: a shard whose stdout was a pipe its reader had
  // closed died of SIGPIPE at the next one (seen with the transport tests' server process).
  signal(SIGPIPE, SIG_IGN);
  signal_thread_ = std::thread([this] { WatchSignals(); });
}

ServiceMain::~ServiceMain() {
  StopGrpc(std::chrono::milliseconds(0));
  const unsigned char end = 0;
  if (write(g_signal_pipe[1], &end, 1) < 0) {
  }
  signal_thread_.join();
  signal(SIGTERM, SIG_DFL);
  signal(SIGINT, SIG_DFL);
  close(g_signal_pipe[0]);
  close(g_signal_pipe[1]);
  g_signal_pipe[0] = g_signal_pipe[1] = -1;
}

void ServiceMain::WatchSignals() {
  for (;;) {
    unsigned char b = 0;
    const ssize_t n = read(g_signal_pipe[0], &b, 1);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0 || b == 0) return;
    const int sig = b;
    MutexLock l(&mu_);
    if (!serving_ || signal_ != 0) {  // starting up, or a second signal while draining
      std::fprintf(stderr, "%s: signal %d %s: exiting now\n", name_.c_str(), sig,
                   serving_ ? "again while stopping" : "during start-up");
      std::_Exit(128 + sig);
    }
    signal_ = sig;
    signalled_.SignalAll();
  }
}

absl::Status ServiceMain::SetLogLevel(const Flags& flags) {
  return InitLogging(name_, flags.StringOr("log-level", "info"));
}

int ServiceMain::Fail(const absl::Status& s) const {
  if (spdlog::should_log(spdlog::level::err)) {
    spdlog::error("error: {}", std::string(s.message()));
  } else {  // a refused start is always said, whatever --log-level
    std::fprintf(stderr, "%s: error: %s\n", name_.c_str(), std::string(s.message()).c_str());
  }
  return 2;
}

absl::StatusOr<std::string> StartGrpcServer(const char* flag, const std::string& listen,
                                            const std::vector<grpc::Service*>& services,
                                            std::shared_ptr<grpc::ServerCredentials> creds,
                                            std::unique_ptr<grpc::Server>* server) {
  EnableHealthAndReflection();
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(listen, creds ? creds : grpc::InsecureServerCredentials(), &port);
  // Clients' keepalive pings (the gateway's, every --node-keepalive-ms while a stream is open) are
  // answered, not counted as abuse: by default a server sends GOAWAY to a client that pings more
  // often than every 5 minutes without data.
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS, 500);
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MAX_PING_STRIKES, 0);
  for (grpc::Service* s : services) builder.RegisterService(s);
  *server = builder.BuildAndStart();
  if (*server == nullptr || port == 0) {
    server->reset();
    return absl::UnavailableError(absl::StrCat(flag, ": cannot listen on ", listen));
  }
  return absl::StrCat(listen.substr(0, listen.rfind(':')), ":", port);
}

absl::StatusOr<std::string> ServiceMain::StartGrpc(const char* flag, const std::string& listen,
                                                   const std::vector<grpc::Service*>& services,
                                                   std::shared_ptr<grpc::ServerCredentials> creds) {
  auto addr = StartGrpcServer(absl::StrCat("--", flag).c_str(), listen, services, creds, &server_);
  if (addr.ok()) {
    MutexLock l(&mu_);
    serving_ = true;
  }
  return addr;
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
  spdlog::info("{}: serving on {}, metrics on http://{}/metrics", VersionLine(name_), *addr,
               metrics_address);
  if (flags.Has("ready-file")) {
    extra["grpc"] = *addr;
    extra["metrics"] = metrics_address;
    if (auto s = WriteReadyFile(flags.StringOr("ready-file", ""), extra); !s.ok()) return s;
  }
  return addr;
}

int ServiceMain::WaitForStop() {
  MutexLock l(&mu_);
  serving_ = true;
  while (signal_ == 0) signalled_.Wait(&mu_);
  return signal_;
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
