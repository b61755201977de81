// The kernels' one thread pool: runs fn(chunk) for chunks [0, n) on every core (the caller takes
// chunk 0 and helps with the rest). A call made while another runs (from another thread, or from
// inside a chunk of a running call) runs inline. Kernels split work only over independent outputs,
// never inside one output's reduction, so the pool's size and the chunking never change a result
// (batch invariance, DESIGN §6).
#ifndef DMOE_KERNELS_CPU_THREAD_POOL_H_
#define DMOE_KERNELS_CPU_THREAD_POOL_H_

#include <functional>

namespace dmoe::cpu {

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
};

// The process-wide pool, created on first use and never destroyed: SetKernelThreads' count, else
// one thread per usable CPU (the affinity mask, as a container's CPU set restricts it).
KernelPool& ThePool();

// Sizes the pool (n >= 1, the calling thread included). Only before its first use: false (and no
// change) once it exists with another size. Services call it with --threads.
bool SetKernelThreads(int n);

}  // namespace dmoe::cpu

#endif  // DMOE_KERNELS_CPU_THREAD_POOL_H_
