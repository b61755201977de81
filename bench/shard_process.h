// A dmoe-expert child process for benchmarks, started from the bazel-bin folder this binary runs
// from; killed and reaped when destroyed.
#ifndef DMOE_BENCH_SHARD_PROCESS_H_
#define DMOE_BENCH_SHARD_PROCESS_H_

#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <string>
#include <thread>

namespace dmoe {

// A dmoe-expert child process, started next to this binary's bazel-bin folder.
class ShardProcess {
 public:
  ShardProcess(const std::string& model, const std::string& spec, const std::string& ready) {
    char self[4096] = {0};
    const ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);
    std::string bin = std::string(self, n > 0 ? static_cast<size_t>(n) : 0);
    bin = bin.substr(0, bin.rfind("/bench/")) + "/expert_service/dmoe-expert";
    std::remove(ready.c_str());
    pid_ = fork();
    if (pid_ == 0) {
      const int devnull = open("/dev/null", O_WRONLY);
      dup2(devnull, 2);
      execl(bin.c_str(), bin.c_str(), "--model", model.c_str(), "--experts", spec.c_str(),
            "--ready-file", ready.c_str(), nullptr);
      _exit(127);
    }
    for (int i = 0; i < 1200 && grpc_.empty(); ++i) {
      std::ifstream in(ready);
      std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
      const size_t at = text.find("\"grpc\": \"");
      if (at != std::string::npos) grpc_ = text.substr(at + 9, text.find('"', at + 9) - at - 9);
      if (grpc_.empty()) std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
  }
  ~ShardProcess() {
    if (pid_ > 0) {
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
    }
  }
  const std::string& grpc() const { return grpc_; }
  double RssMiB() const {
    std::ifstream in("/proc/" + std::to_string(pid_) + "/status");
    std::string line;
    while (std::getline(in, line)) {
      if (line.rfind("VmRSS:", 0) == 0) return std::stod(line.substr(6)) / 1024.0;
    }
    return -1;
  }

 private:
  pid_t pid_ = -1;
  std::string grpc_;
};

}  // namespace dmoe

#endif  // DMOE_BENCH_SHARD_PROCESS_H_
