// The kernels' one thread pool: runs fn(chunk) for chunks [0, n) on every core (the caller takes
// chunk 0 and helps with the rest). A call made while another runs (from another thread, or from
// inside a chunk of a running call) runs inline. Kernels split work only over independent outputs,
// never inside one output's reduction, so the pool's size and the chunking never change a result
// (batch invariance, DESIGN §6).
#ifndef DMOE_KERNELS_CPU_THREAD_POOL_H_
#define DMOE_KERNELS_CPU_THREAD_POOL_H_

#include <cstdint>
#include <functional>

namespace dmoe::cpu {

// Where a pooled call's time goes (KernelPool::CountStats): for finding the idle time of a
// batch-1 decode step, which makes dozens of small passes.
struct PoolStats {
  uint64_t passes = 0;           // calls that ran over the workers
  uint64_t chunks = 0;           // their chunks
  uint64_t caller_wait_ns = 0;   // the caller, its chunks done, waiting for the workers' last
  uint64_t caller_alone_ns = 0;  // from the end of one pass to the start of the next: the caller
                                 // alone (norms, routing, the step's ends), the workers idle
};

class KernelPool {
 public:
  virtual ~KernelPool() = default;
  virtual int size() const = 0;
  virtual void Run(int n, const std::function<void(int)>& fn) = 0;
  // Run for a callable of any size without a heap allocation: std::function keeps a lambda of at
  // most 16 bytes of captures in place and allocates for a larger one (a [&] lambda naming three
  // locals), once per call; this hands it a lambda holding one pointer to `fn`.
  template <typename F>
  void RunEach(int n, const F& fn) {
    Run(n, [f = &fn](int chunk) { (*f)(chunk); });
  }
  // Zeroes the PoolStats and counts them from now on while on; off (the default) times nothing.
  virtual void CountStats(bool on) = 0;
  virtual PoolStats stats() const = 0;
};

// Rows a kernel's per-thread (thread_local) scratch makes room for at its first use. A pass's
// tasks run on whichever thread is free, so a thread meeting a larger group of rows for the first
// time late in a stream would allocate in the middle of serving; up to this many rows it never
// does.
inline constexpr int64_t kThreadScratchRows = 16;

// The process-wide pool, created on first use and never destroyed: SetKernelThreads' count, else
// one thread per usable CPU (the affinity mask, as a container's CPU set restricts it).
KernelPool& ThePool();

// Sizes the pool (n >= 1, the calling thread included). Only before its first use: false (and no
// change) once it exists with another size. Services call it with --threads.
bool SetKernelThreads(int n);

}  // namespace dmoe::cpu

#endif  // DMOE_KERNELS_CPU_THREAD_POOL_H_
