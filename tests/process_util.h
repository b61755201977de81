// Starting and stopping the real dmoe binaries from tests: every child is tracked by PID, killed
// and reaped at the latest when its ChildProcess is destroyed.
#ifndef DMOE_TESTS_PROCESS_UTIL_H_
#define DMOE_TESTS_PROCESS_UTIL_H_

#include <signal.h>
#include <sys/types.h>

#include <chrono>
#include <map>
#include <string>
#include <vector>

namespace dmoe::testing {

// $TEST_SRCDIR/dmoe/<path>, the runfiles path of a binary of this workspace.
std::string Runfile(const std::string& path);
std::string TmpDir();

class ChildProcess {
 public:
  ChildProcess() = default;
  // Starts argv[0] with argv; stdout and stderr go to `log_path`.
  ChildProcess(const std::vector<std::string>& argv, const std::string& log_path);
  ChildProcess(ChildProcess&& o) noexcept : pid_(o.pid_), log_(o.log_) { o.pid_ = -1; }
  ChildProcess& operator=(ChildProcess&& o) noexcept;
  ~ChildProcess() { Kill(SIGKILL); }
  pid_t pid() const { return pid_; }
  const std::string& log_path() const { return log_; }
  // Sends `sig` and reaps the child (if still running). Returns its wait status or -1.
  int Kill(int sig);
  // Waits up to `timeout` for the child to exit; returns its exit code, or -1 on timeout/signal.
  int Wait(std::chrono::milliseconds timeout);
  std::string Log() const;

 private:
  pid_t pid_ = -1;
  std::string log_;
};

// Waits up to `timeout` for a JSON file written by --ready-file; returns its string/number
// fields, or an empty map on timeout.
std::map<std::string, std::string> WaitForReadyFile(const std::string& path,
                                                    std::chrono::milliseconds timeout);

}  // namespace dmoe::testing

#endif  // DMOE_TESTS_PROCESS_UTIL_H_
