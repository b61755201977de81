// GPU benchmarks (issue [cuda]): prints figures, passes/fails nothing. Without a CUDA device it
// says why and exits 0. Run by scripts/gpu_check.sh.
//
//   device memory bandwidth: the theoretical peak from the device's attributes and a measured
//     device-to-device copy;
//   MLA decode (absorbed, paged cache) at batch 64 and 4096 tokens of context, DeepSeek-V2's
//     shape (128 heads, r 512, dr 64) and the small preset's, fp32 and fp8 caches: the cache
//     bytes read per second as a fraction of both bandwidths;
//   the routed experts' FFN as 64 groups through cuBLAS vs one dense GEMM chain of the same rows
//     and shapes (one weight set): the cost of grouping.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "kernels/cpu/mla.h"
#include "kernels/cuda/cuda_kernels.h"
#include "kernels/cuda/expert_ffn.h"

#if DMOE_HAVE_CUDA
#include <cuda_runtime.h>
#endif

namespace dmoe::cuda {
namespace {

using Clock = std::chrono::steady_clock;

void Check(const absl::Status& st, const char* what) {
  if (!st.ok()) {
    std::fprintf(stderr, "%s: %s\n", what, std::string(st.message()).c_str());
    std::exit(1);
  }
}

DeviceBuffer Filled(size_t floats, uint32_t seed, float scale = 1.0f) {
  std::vector<float> v(floats);
  std::mt19937 rng(seed);
  std::normal_distribution<float> d(0.0f, scale);
  for (float& x : v) x = d(rng);
  auto b = DeviceBuffer::Alloc(floats * 4);
  Check(b.status(), "alloc");
  Check(b->Upload(v.data(), floats * 4), "upload");
  return std::move(*b);
}

// Best wall time of `reps` runs of fn (each followed by a device synchronize), in seconds.
template <typename F>
double Best(int reps, F fn) {
  double best = 1e30;
  for (int i = 0; i < reps; ++i) {
    const auto t0 = Clock::now();
    fn();
    Check(Synchronize(), "synchronize");
    best = std::min(best, std::chrono::duration<double>(Clock::now() - t0).count());
  }
  return best;
}

struct Bandwidth {
  double peak = 0;    // bytes/s, from the attributes
  double copied = 0;  // bytes/s read + written by a device-to-device copy
};

Bandwidth MeasureBandwidth() {
  Bandwidth bw;
#if DMOE_HAVE_CUDA
  int khz = 0, bits = 0;
  cudaDeviceGetAttribute(&khz, cudaDevAttrMemoryClockRate, 0);
  cudaDeviceGetAttribute(&bits, cudaDevAttrGlobalMemoryBusWidth, 0);
  bw.peak = 2.0 * khz * 1e3 * bits / 8;  // double data rate
  const size_t bytes = size_t{1} << 30;
  auto a = DeviceBuffer::Alloc(bytes), b = DeviceBuffer::Alloc(bytes);
  Check(a.status(), "alloc");
  Check(b.status(), "alloc");
  const double t =
      Best(5, [&] { cudaMemcpy(b->get(), a->get(), bytes, cudaMemcpyDeviceToDevice); });
  bw.copied = 2.0 * bytes / t;
#endif
  return bw;
}

void MlaDecodeBench(const Bandwidth& bw) {
  struct Shape {
    const char* name;
    int64_t heads, nope, rope, v, rank;
  };
  const Shape shapes[] = {{"DeepSeek-V2", 128, 128, 64, 128, 512}, {"small", 8, 64, 32, 64, 256}};
  const int64_t b = 64, ctx = 4096, bt = 64;
  std::printf("\nMLA decode, batch %lld x %lld tokens of context (one layer)\n",
              static_cast<long long>(b), static_cast<long long>(ctx));
  std::printf("%-12s %-6s %12s %12s %10s %10s\n", "shape", "cache", "ms", "GB/s read", "of peak",
              "of copy");
  for (const Shape& s : shapes) {
    for (cpu::KvDType kv : {cpu::KvDType::kF32, cpu::KvDType::kFp8}) {
      const int64_t row_bytes = cpu::KvRowBytes(kv, s.rank, s.rope);
      const int64_t blocks = b * ctx / bt;
      auto pool = DeviceBuffer::Alloc(static_cast<size_t>(blocks * bt * row_bytes));
      Check(pool.status(), "alloc");
      std::vector<int32_t> table(static_cast<size_t>(blocks)),
          ctxs(static_cast<size_t>(b), static_cast<int32_t>(ctx));
      for (int64_t i = 0; i < blocks; ++i) table[static_cast<size_t>(i)] = static_cast<int32_t>(i);
      std::shuffle(table.begin(), table.end(), std::mt19937(1));
      auto dtable = DeviceBuffer::Alloc(table.size() * 4),
           dctx = DeviceBuffer::Alloc(ctxs.size() * 4);
      Check(dtable.status(), "alloc");
      Check(dctx.status(), "alloc");
      Check(dtable->Upload(table.data(), table.size() * 4), "upload");
      Check(dctx->Upload(ctxs.data(), ctxs.size() * 4), "upload");
      // Zeroed rows: fp32 zeros, and 8-bit zeros with scale 0 (the speed does not depend on it).
      std::vector<uint8_t> zeros(static_cast<size_t>(blocks * bt * row_bytes), 0);
      Check(pool->Upload(zeros.data(), zeros.size()), "upload");
      DeviceBuffer kv_b = Filled(static_cast<size_t>(s.heads * (s.nope + s.v) * s.rank), 2, 0.05f);
      DeviceBuffer q = Filled(static_cast<size_t>(b * s.heads * (s.nope + s.rope)), 3);
      auto o = DeviceBuffer::Alloc(static_cast<size_t>(b * s.heads * s.v) * 4);
      Check(o.status(), "alloc");
      cpu::MlaParams p;
      p.num_heads = s.heads;
      p.nope_dim = s.nope;
      p.rope_dim = s.rope;
      p.v_dim = s.v;
      p.latent_rank = s.rank;
      p.softmax_scale = 0.1f;
      p.kv_b = kv_b.as<float>();
      auto scratch =
          DeviceBuffer::Alloc(static_cast<size_t>(MlaDecodeScratchFloats(p, b, ctx)) * 4);
      Check(scratch.status(), "alloc");
      PagedLatentCache cache;
      cache.pool = pool->get();
      cache.dtype = kv;
      cache.block_tokens = bt;
      cache.block_bytes = bt * row_bytes;
      cache.table = dtable->as<int32_t>();
      cache.table_stride = ctx / bt;
      cache.ctx = dctx->as<int32_t>();
      cache.max_ctx = ctx;
      const double t = Best(5, [&] {
        Check(MlaDecodeAbsorbed(p, q.as<float>(), b, cache, o->as<float>(), scratch->as<float>()),
              "MlaDecodeAbsorbed");
      });
      const double read = static_cast<double>(blocks * bt * row_bytes) / t;
      std::printf("%-12s %-6s %12.3f %12.1f %9.2f %9.2f\n", s.name, cpu::KvDTypeName(kv), t * 1e3,
                  read / 1e9, read / bw.peak, read / bw.copied);
    }
  }
}

void ExpertBench() {
  auto blas = Blas::Create();
  Check(blas.status(), "cuBLAS");
  const int64_t d = 1024, width = 512, groups = 64, per = 16;
  std::printf(
      "\nrouted experts' FFN (D %lld, I %lld): %lld groups of %lld rows vs one chain of "
      "%lld rows\n",
      static_cast<long long>(d), static_cast<long long>(width), static_cast<long long>(groups),
      static_cast<long long>(per), static_cast<long long>(groups * per));
  std::vector<DeviceBuffer> w;
  std::vector<ExpertWeights> ew(static_cast<size_t>(groups));
  for (int64_t g = 0; g < groups; ++g) {
    for (int m = 0; m < 3; ++m) w.push_back(Filled(static_cast<size_t>(d * width), 10 + g, 0.03f));
    ew[static_cast<size_t>(g)] = {w[static_cast<size_t>(3 * g)].as<float>(),
                                  w[static_cast<size_t>(3 * g + 1)].as<float>(),
                                  w[static_cast<size_t>(3 * g + 2)].as<float>()};
  }
  std::vector<int64_t> offsets;
  for (int64_t g = 0; g <= groups; ++g) offsets.push_back(g * per);
  DeviceBuffer x = Filled(static_cast<size_t>(groups * per * d), 4);
  auto y = DeviceBuffer::Alloc(static_cast<size_t>(groups * per * d) * 4);
  auto scratch = DeviceBuffer::Alloc(static_cast<size_t>(2 * groups * per * width) * 4);
  Check(y.status(), "alloc");
  Check(scratch.status(), "alloc");
  const double grouped = Best(10, [&] {
    Check(ExpertFfn(*blas, ew, offsets, d, width, x.as<float>(), y->as<float>(),
                    scratch->as<float>()),
          "ExpertFfn");
  });
  const std::vector<ExpertWeights> one = {ew[0]};
  const std::vector<int64_t> all = {0, groups * per};
  const double dense = Best(10, [&] {
    Check(ExpertFfn(*blas, one, all, d, width, x.as<float>(), y->as<float>(), scratch->as<float>()),
          "ExpertFfn");
  });
  const double flops = 2.0 * 3 * groups * per * d * width;
  std::printf(
      "grouped %.3f ms (%.1f TFLOP/s), dense %.3f ms (%.1f TFLOP/s): grouped / dense "
      "time %.2f\n",
      grouped * 1e3, flops / grouped / 1e12, dense * 1e3, flops / dense / 1e12, grouped / dense);
}

int Main() {
  const DeviceProbe probe = Probe();
  if (probe.count == 0) {
    std::printf("cuda_bench: %s\n", probe.reason.c_str());
    return 0;
  }
  std::printf("device: %s\n", probe.name.c_str());
  const Bandwidth bw = MeasureBandwidth();
  std::printf(
      "memory bandwidth: peak %.0f GB/s (attributes), device-to-device copy %.0f GB/s "
      "(read + write)\n",
      bw.peak / 1e9, bw.copied / 1e9);
  MlaDecodeBench(bw);
  ExpertBench();
  return 0;
}

}  // namespace
}  // namespace dmoe::cuda

int main() { return dmoe::cuda::Main(); }
