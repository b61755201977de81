#include "kernels/cpu/blas_threads.h"

#include <cblas.h>
#include <sched.h>

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "kernels/cpu/thread_pool.h"

namespace dmoe::cpu {

absl::Status SetBlasThreads(int64_t n, const std::string& flag) {
  if (n < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(flag, ": ", n, " is negative (0 = OpenBLAS's default)"));
  }
  if (n > 0) {
    openblas_set_num_threads(static_cast<int>(std::min<int64_t>(n, 1024)));
    if (!SetKernelThreads(static_cast<int>(std::min<int64_t>(n, 1024)))) {
      return absl::FailedPreconditionError(absl::StrCat(
          flag, ": the kernel thread pool already runs with ", ThePool().size(), " threads"));
    }
  }
  return absl::OkStatus();
}

int BlasThreads() { return openblas_get_num_threads(); }

int UsableCpus() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) != 0) return 1;
  return std::max(1, CPU_COUNT(&set));
}

int BlasThreadsShare(int processes) { return std::max(1, UsableCpus() / std::max(1, processes)); }

}  // namespace dmoe::cpu
