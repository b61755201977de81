// dmoe service processes for benchmarks, started from the bazel-bin folder this binary runs from
// (common/process.h) and killed and reaped when destroyed.
#ifndef DMOE_BENCH_SHARD_PROCESS_H_
#define DMOE_BENCH_SHARD_PROCESS_H_

#include <fstream>
#include <string>
#include <vector>

#include "common/process.h"

namespace dmoe {

// A service binary (path relative to bazel-bin) started with `args` + "--ready-file READY";
// grpc() is the address it reports (empty if it did not come up within 2 minutes).
class ServiceProcess {
 public:
  ServiceProcess(const std::string& binary, std::vector<std::string> args,
                 const std::string& ready) {
    args.insert(args.begin(), BinDirOfThisExecutable() + "/" + binary);
    args.push_back("--ready-file");
    args.push_back(ready);
    std::remove(ready.c_str());
    child_ = ChildProcess(args, "/dev/null");
    auto j = WaitForReady(ready, std::chrono::minutes(2), child_.pid());
    if (j.ok()) grpc_ = j->value("grpc", "");
  }
  const std::string& grpc() const { return grpc_; }
  double RssMiB() const {
    std::ifstream in("/proc/" + std::to_string(child_.pid()) + "/status");
    std::string line;
    while (std::getline(in, line)) {
      if (line.rfind("VmRSS:", 0) == 0) return std::stod(line.substr(6)) / 1024.0;
    }
    return -1;
  }

 private:
  ChildProcess child_;
  std::string grpc_;
};

// A dmoe-expert hosting `spec` of the model in `model` (with --blas-threads when > 0).
class ShardProcess : public ServiceProcess {
 public:
  ShardProcess(const std::string& model, const std::string& spec, const std::string& ready,
               int blas_threads = 0)
      : ServiceProcess(
            "expert_service/dmoe-expert",
            {"--model", model, "--experts", spec, "--blas-threads", std::to_string(blas_threads)},
            ready) {}
};

}  // namespace dmoe

#endif  // DMOE_BENCH_SHARD_PROCESS_H_
