// What every dmoe service main does around its own work: one error exit, the stop signals, its
// gRPC server on a flag's address, the ready file, serving until SIGTERM/SIGINT.
//
// Signals: the constructor installs handlers for SIGTERM and SIGINT that hand the signal to a
// thread of its own (through a pipe: whichever thread the kernel picks, libraries' threads
// included). Before the gRPC server is up (loading weights, say) a signal ends the process at
// once (exit 128 + signal: nothing to drain); once it serves, the first signal returns from
// WaitForStop (the service drains), and a second one ends the process at once. One ServiceMain
// per process.
//
//   ServiceMain svc("dmoe-router");       // also: logging with this component (--log-level)
//   svc.BlockStopSignals();               // before any thread starts
//   auto addr = svc.StartGrpc("grpc-listen", listen, {&service});
//   if (!addr.ok()) return svc.Fail(addr.status());
//   WriteReadyFile(path, {{"grpc", *addr}});
//   svc.WaitForStop();
#ifndef DMOE_COMMON_SERVICE_H_
#define DMOE_COMMON_SERVICE_H_

#include <grpcpp/grpcpp.h>
#include <signal.h>

#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/flags.h"
#include "common/mutex.h"
#include "nlohmann/json.hpp"

namespace dmoe {

// The --log-level line of a service's --help.
inline constexpr char kLogLevelHelp[] =
    "  --log-level L           trace, debug, info (default), warn, error, critical or off\n";

class ServiceMain {
 public:
  // `name` ("dmoe-attention") heads every log line of the process.
  explicit ServiceMain(std::string name);
  ServiceMain(const ServiceMain&) = delete;
  ServiceMain& operator=(const ServiceMain&) = delete;
  ~ServiceMain();

  const std::string& name() const { return name_; }
  // Applies --log-level from `flags` (default info).
  absl::Status SetLogLevel(const Flags& flags);
  // Logs "error: <message>" and returns 2, the exit status of a refused start.
  int Fail(const absl::Status& s) const;
  // Starts a gRPC server with `services` on `listen` (the value of --`flag`), grpc.health.v1 and
  // reflection enabled; returns the address with the chosen port ("127.0.0.1:0" picks a free one).
  absl::StatusOr<std::string> StartGrpc(const char* flag, const std::string& listen,
                                        const std::vector<grpc::Service*>& services,
                                        std::shared_ptr<grpc::ServerCredentials> creds = nullptr);
  // The usual start of a service: StartGrpc on --grpc-listen (default 127.0.0.1:0), readiness of
  // `service` (its full gRPC name) set to `ready`, "serving on ..." logged, and --ready-file (if
  // given) written with "grpc", "metrics" and the `extra` fields. Returns the gRPC address.
  absl::StatusOr<std::string> Serve(const Flags& flags, const std::vector<grpc::Service*>& services,
                                    const char* service, const std::string& metrics_address,
                                    nlohmann::json extra = nlohmann::json::object(),
                                    bool ready = true,
                                    std::shared_ptr<grpc::ServerCredentials> creds = nullptr);
  grpc::Server* server() const { return server_.get(); }
  // Blocks until SIGTERM or SIGINT arrives (or has arrived since the server started); returns it.
  int WaitForStop();
  // Stops the gRPC server, letting calls in flight finish for up to `grace`.
  void StopGrpc(std::chrono::milliseconds grace = std::chrono::seconds(2));

 private:
  void WatchSignals();

  std::string name_;
  std::unique_ptr<grpc::Server> server_;
  Mutex mu_;
  CondVar signalled_;
  bool serving_ ABSL_GUARDED_BY(mu_) = false;  // a signal now means "drain", not "exit"
  int signal_ ABSL_GUARDED_BY(mu_) = 0;
  std::thread signal_thread_;
};

// Starts a gRPC server with `services` on `listen` (the value of --`flag`), grpc.health.v1 and
// reflection enabled, into *server; returns the address with the chosen port.
absl::StatusOr<std::string> StartGrpcServer(const char* flag, const std::string& listen,
                                            const std::vector<grpc::Service*>& services,
                                            std::shared_ptr<grpc::ServerCredentials> creds,
                                            std::unique_ptr<grpc::Server>* server);

// Writes `fields` and "pid" as one JSON object to `path`, atomically (written aside, then
// renamed): a reader sees all of it or nothing. Errors name --ready-file.
absl::Status WriteReadyFile(const std::string& path, nlohmann::json fields);

// Reads a ready file once it exists and parses (a launcher's side of WriteReadyFile); NotFound
// while it does not exist yet.
absl::StatusOr<nlohmann::json> ReadReadyFile(const std::string& path);

}  // namespace dmoe

#endif  // DMOE_COMMON_SERVICE_H_
