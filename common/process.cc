#include "common/process.h"

#include <fcntl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>
#include <thread>

#include "absl/strings/str_cat.h"
#include "common/service.h"

namespace dmoe {
namespace {

// Closes every descriptor >= first (between fork and exec). Without close_range (Linux < 5.9) it
// closes up to sysconf's limit, at most 65536.
void CloseFrom(int first) {
#ifdef SYS_close_range
  if (syscall(SYS_close_range, static_cast<unsigned>(first), ~0u, 0u) == 0) return;
#endif
  const long max = sysconf(_SC_OPEN_MAX);
  for (long fd = first; fd < (max > 0 && max < 65536 ? max : 65536); ++fd)
    close(static_cast<int>(fd));
}

}  // namespace

ChildProcess::ChildProcess(const std::vector<std::string>& argv, const std::string& log_path,
                           bool detach)
    : log_(log_path) {
  std::vector<char*> args;
  for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  pid_ = fork();
  if (pid_ < 0) {
    std::fprintf(stderr, "cannot start %s: fork: %s\n", args[0], std::strerror(errno));
    pid_ = -1;
    return;
  }
  if (pid_ == 0) {
    if (detach) setsid();
    const int fd = open(log_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    const int null_in = open("/dev/null", O_RDONLY);
    if (null_in >= 0) dup2(null_in, 0);
    if (fd >= 0) {
      dup2(fd, 1);
      dup2(fd, 2);
    }
    // Nothing else of the launcher's reaches the child: a listening socket or a pipe held open
    // by a service would keep its port bound (or its reader waiting) after the launcher is gone.
    CloseFrom(3);
    execv(args[0], args.data());
    // (write, not stdio: another thread may have held stderr's lock at the fork)
    const char* what = std::strerror(errno);
    const char* parts[] = {"cannot run ", args[0], ": ", what, "\n"};
    for (const char* part : parts) {
      if (write(2, part, std::strlen(part)) < 0) break;
    }
    _exit(127);
  }
}

ChildProcess& ChildProcess::operator=(ChildProcess&& o) noexcept {
  if (this != &o) {
    Kill(SIGKILL);
    pid_ = o.pid_;
    log_ = o.log_;
    o.pid_ = -1;
  }
  return *this;
}

int ChildProcess::Kill(int sig) {
  if (pid_ <= 0) return -1;
  kill(pid_, sig);
  int status = -1;
  waitpid(pid_, &status, 0);
  pid_ = -1;
  return status;
}

int ChildProcess::Wait(std::chrono::milliseconds timeout) {
  if (pid_ <= 0) return -1;
  const auto end = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < end) {
    int status = 0;
    const pid_t r = waitpid(pid_, &status, WNOHANG);
    if (r == pid_) {
      pid_ = -1;
      return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return -1;
}

pid_t ChildProcess::Release() {
  const pid_t p = pid_;
  pid_ = -1;
  return p;
}

std::string ChildProcess::Log() const {
  std::ifstream in(log_);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

bool ProcessAlive(pid_t pid) {
  int status;
  const pid_t r = waitpid(pid, &status, WNOHANG);
  if (r == pid) return false;
  if (kill(pid, 0) != 0) return false;
  std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
  std::string line;
  std::getline(stat, line);
  const size_t paren = line.rfind(')');
  return paren != std::string::npos && paren + 2 < line.size() && line[paren + 2] != 'Z';
}

absl::StatusOr<nlohmann::json> WaitForReady(const std::string& path,
                                            std::chrono::milliseconds timeout, pid_t pid) {
  const auto end = std::chrono::steady_clock::now() + timeout;
  while (true) {
    auto j = ReadReadyFile(path);
    if (j.ok()) return j;
    if (pid > 0 && !ProcessAlive(pid)) {
      return absl::UnavailableError(absl::StrCat("process ", pid, " exited before writing ", path));
    }
    if (std::chrono::steady_clock::now() >= end) {
      return absl::DeadlineExceededError(absl::StrCat(
          path, ": not written within ", timeout.count(), " ms (", j.status().message(), ")"));
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

void StopProcesses(const std::vector<pid_t>& all, std::chrono::milliseconds grace) {
  std::vector<pid_t> pids;  // never kill(-1) or kill(0): those signal every process we may
  for (pid_t p : all) {
    if (p > 0) pids.push_back(p);
  }
  for (pid_t p : pids) kill(p, SIGTERM);
  auto any_alive = [&] {
    for (pid_t p : pids) {
      if (ProcessAlive(p)) return true;
    }
    return false;
  };
  auto wait = [&](std::chrono::milliseconds d) {
    const auto until = std::chrono::steady_clock::now() + d;
    while (any_alive() && std::chrono::steady_clock::now() < until) {
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
  };
  wait(grace);
  for (pid_t p : pids) {
    if (ProcessAlive(p)) kill(p, SIGKILL);
  }
  wait(std::chrono::seconds(5));
}

std::string BinDirOfThisExecutable() {
  char self[4096] = {0};
  const ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);
  std::string exe(self, n > 0 ? static_cast<size_t>(n) : 0);
  exe = exe.substr(0, exe.rfind('/'));
  return exe.substr(0, exe.rfind('/'));
}

}  // namespace dmoe
