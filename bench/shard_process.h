// dmoe service processes for benchmarks, started from the bazel-bin folder this binary runs from
// and killed and reaped when destroyed.
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
#include <vector>

namespace dmoe {

// A service binary (path relative to bazel-bin) started with `args` + "--ready-file READY";
// grpc() is the address it reports (empty if it did not come up within 2 minutes).
class ServiceProcess {
 public:
  ServiceProcess(const std::string& binary, std::vector<std::string> args,
                 const std::string& ready) {
    char self[4096] = {0};
    const ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);
    std::string bin = std::string(self, n > 0 ? static_cast<size_t>(n) : 0);
    bin = bin.substr(0, bin.rfind("/bench/")) + "/" + binary;
    args.insert(args.begin(), bin);
    args.push_back("--ready-file");
    args.push_back(ready);
    std::remove(ready.c_str());
    pid_ = fork();
    if (pid_ == 0) {
      const int devnull = open("/dev/null", O_WRONLY);
      dup2(devnull, 2);
      std::vector<char*> argv;
      for (auto& a : args) argv.push_back(a.data());
      argv.push_back(nullptr);
      execv(bin.c_str(), argv.data());
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
  ~ServiceProcess() {
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

// A dmoe-expert hosting `spec` of the model in `model` (with --blas-threads when > 0).
class ShardProcess : public ServiceProcess {
 public:
  ShardProcess(const std::string& model, const std::string& spec, const std::string& ready,
               int blas_threads = 0)
      : ServiceProcess("expert_service/dmoe-expert",
                       {"--model", model, "--experts", spec, "--blas-threads",
                        std::to_string(blas_threads)},
                       ready) {}
};

}  // namespace dmoe

#endif  // DMOE_BENCH_SHARD_PROCESS_H_
