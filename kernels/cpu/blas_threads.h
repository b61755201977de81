// How many threads OpenBLAS uses in this process.
//
// OpenBLAS's idle workers spin (about 2^28 cycles, ~0.1 s) after every multi-threaded call before
// they sleep, and batch-1 decode makes such calls every layer (sgemv goes multi-threaded above a
// few thousand elements). A process alone on its CPUs loses nothing by it; several dmoe processes
// sharing a machine (`dmoe up`, a test cluster, a node running attention and a shard) take each
// other's CPUs: with an attention process and two shards on 2 CPUs, batch-1 decode of the tiny
// preset took 1.22 ms/step with OpenBLAS's default (2 threads each) and 0.53 with 1 each.
#ifndef DMOE_KERNELS_CPU_BLAS_THREADS_H_
#define DMOE_KERNELS_CPU_BLAS_THREADS_H_

#include <cstdint>
#include <string>

#include "absl/status/status.h"

namespace dmoe::cpu {

// n > 0: OpenBLAS uses at most n threads from now on, and the kernel pool (thread_pool.h) has n
// threads: one count for all of this process's compute (FAILED_PRECONDITION if the pool already
// runs with another size); n == 0: leaves both defaults (one per CPU, or OPENBLAS_NUM_THREADS).
// Negative: INVALID_ARGUMENT naming `flag`.
absl::Status SetBlasThreads(int64_t n, const std::string& flag = "--blas-threads");

// The number OpenBLAS uses now.
int BlasThreads();

// The CPUs this process may run on (its affinity mask), at least 1.
int UsableCpus();

// A fair share of this machine's usable CPUs for one of `processes` compute processes on it:
// max(1, cpus / processes).
int BlasThreadsShare(int processes);

}  // namespace dmoe::cpu

#endif  // DMOE_KERNELS_CPU_BLAS_THREADS_H_
