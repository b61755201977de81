// Child processes of a launcher (`dmoe up`, tests, benchmarks): started with their output in a
// log file, tracked by PID, stopped and reaped; and the launcher's side of --ready-file.
#ifndef DMOE_COMMON_PROCESS_H_
#define DMOE_COMMON_PROCESS_H_

#include <signal.h>
#include <sys/types.h>

#include <chrono>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"

namespace dmoe {

class ChildProcess {
 public:
  ChildProcess() = default;
  // Starts argv[0] with argv; stdout and stderr go to `log_path` (truncated), stdin is /dev/null.
  // pid() is -1 when the process could not be forked.
  // `detach`: in its own session, so that it outlives the launcher once Release()d.
  ChildProcess(const std::vector<std::string>& argv, const std::string& log_path,
               bool detach = false);
  ChildProcess(ChildProcess&& o) noexcept : pid_(o.pid_), log_(o.log_) { o.pid_ = -1; }
  ChildProcess& operator=(ChildProcess&& o) noexcept;
  ~ChildProcess() { Kill(SIGKILL); }
  pid_t pid() const { return pid_; }
  const std::string& log_path() const { return log_; }
  // Sends `sig` and reaps the child (if still running). Returns its wait status or -1.
  int Kill(int sig);
  // Sends `sig` only (e.g. SIGSTOP, after which the child does not exit).
  void Signal(int sig) const {
    if (pid_ > 0) kill(pid_, sig);
  }
  // Waits up to `timeout` for the child to exit; returns its exit code, or -1 on timeout/signal.
  int Wait(std::chrono::milliseconds timeout);
  // Forgets the child without stopping it (it keeps running; the caller owns its PID now).
  pid_t Release();
  std::string Log() const;

 private:
  pid_t pid_ = -1;
  std::string log_;
};

// True while `pid` runs: reaps it if it is our child; otherwise looks at /proc (an orphan that
// has exited may linger as a zombie until init reaps it).
bool ProcessAlive(pid_t pid);

// Waits up to `timeout` for the JSON object a service writes to its --ready-file. Fails early
// (Unavailable, naming the file) when `pid` (if > 0) exits first; DeadlineExceeded on timeout.
absl::StatusOr<nlohmann::json> WaitForReady(const std::string& path,
                                            std::chrono::milliseconds timeout, pid_t pid = -1);

// SIGTERM to each, SIGKILL to those still running after `grace`; waits (bounded) until all are
// gone.
void StopProcesses(const std::vector<pid_t>& pids,
                   std::chrono::milliseconds grace = std::chrono::seconds(5));

// The folder two levels above this executable: bazel-bin for bazel-bin/<package>/<binary>.
std::string BinDirOfThisExecutable();

}  // namespace dmoe

#endif  // DMOE_COMMON_PROCESS_H_
