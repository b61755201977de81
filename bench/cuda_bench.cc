// GPU benchmarks (issue [cuda]): prints figures, passes/fails nothing. Without a CUDA device it
// says why and exits 0. Run by scripts/gpu_check.sh.
//
//   device memory bandwidth: the theoretical peak from the device's attributes and a measured
//     device-to-device copy;
//   MLA decode (absorbed, paged cache) at batch 64 and 4096 tokens of context, DeepSeek-V2's
//     shape (128 heads, r 512, dr 64) and the small preset's, fp32 and fp8 caches: the cache
//     bytes read per second as a fraction of both bandwidths;
//   the engine's projections through the batch-invariant GEMM vs cuBLAS, fp32 and bf16, m 1 to
//     256 (the cost of invariance per product);
//   the routed experts' FFN as 64 groups (through the batch-invariant GEMM, then cuBLAS) vs one
//     dense cuBLAS GEMM chain of the same rows and shapes (one weight set): the cost of grouping
//     and of invariance;
//   decode tokens/s of the `small` preset (written once to --model-cache DIR, default
//     /tmp/dmoe-bench/small) at batch 1, 16 and 64: the GPU engine with the experts on the GPU
//     (its products invariant, then through cuBLAS), next to the CPU engine in the same run
//     (--no-engine skips it).
//
//   cuda_bench [--model-cache DIR] [--no-engine]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "attention_service/cuda_engine.h"
#include "attention_service/local_model.h"
#include "kernels/cpu/mla.h"
#include "kernels/cuda/cuda_kernels.h"
#include "kernels/cuda/expert_ffn.h"
#include "model/cuda_experts.h"
#include "model/tiny_model.h"

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
  double fp32 = 0;    // fp32 FMA peak, FLOP/s, from the attributes
};

Bandwidth MeasureBandwidth() {
  Bandwidth bw;
#if DMOE_HAVE_CUDA
  int khz = 0, bits = 0;
  cudaDeviceGetAttribute(&khz, cudaDevAttrMemoryClockRate, 0);
  cudaDeviceGetAttribute(&bits, cudaDevAttrGlobalMemoryBusWidth, 0);
  bw.peak = 2.0 * khz * 1e3 * bits / 8;  // double data rate
  int sms = 0, sm_khz = 0, major = 0, minor = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  cudaDeviceGetAttribute(&sm_khz, cudaDevAttrClockRate, 0);
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0);
  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, 0);
  // fp32 lanes per SM: 64 on P100/V100/A100, 128 from sm_86 on (H100/H200 included).
  const int lanes = (major < 8 || (major == 8 && minor == 0)) ? 64 : 128;
  bw.fp32 = 2.0 * sms * lanes * sm_khz * 1e3;
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
  // roofline: the time of the cache's bytes at the peak bandwidth or of the fp32 FMAs (scores
  // and weighted sums of every head: 2 (2r + dr) FLOP per row and head) at the fp32 peak,
  // whichever is longer, over the measured time.
  std::printf("fp32 peak %.1f TFLOP/s (attributes)\n", bw.fp32 / 1e12);
  std::printf("%-12s %-9s %10s %10s %8s %8s %8s %9s\n", "shape", "cache", "ms", "GB/s read",
              "of peak", "of copy", "TFLOP/s", "roofline");
  for (const Shape& s : shapes) {
    for (cpu::KvDType kv : {cpu::KvDType::kF32, cpu::KvDType::kBf16, cpu::KvDType::kFp8}) {
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
      const double bytes = static_cast<double>(blocks * bt * row_bytes);
      const double flops = 2.0 * b * ctx * s.heads * (2 * s.rank + s.rope);
      const double bound = std::max(bytes / bw.peak, flops / bw.fp32);
      std::printf("%-12s %-9s %10.3f %10.1f %8.2f %8.2f %8.1f %9.2f\n", s.name,
                  cpu::KvDTypeName(kv), t * 1e3, bytes / t / 1e9, bytes / t / bw.peak,
                  bytes / t / bw.copied, flops / t / 1e12, bound / t);
    }
  }
}

// `groups` experts of `per` rows each (D d, I width).
void ExpertBench(int64_t d, int64_t width, int64_t groups, int64_t per) {
  auto blas = Blas::Create();
  Check(blas.status(), "cuBLAS");
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
  const std::vector<ExpertWeights> one = {ew[0]};
  const std::vector<int64_t> all = {0, groups * per};
  const double flops = 2.0 * 3 * groups * per * d * width;
  // The dense reference is always cuBLAS's; the grouped products run both ways.
  blas->set_cublas(true);
  const double dense = Best(10, [&] {
    Check(ExpertFfn(*blas, one, all, d, width, x.as<float>(), y->as<float>(), scratch->as<float>()),
          "ExpertFfn");
  });
  for (const bool cublas : {false, true}) {
    blas->set_cublas(cublas);
    const double grouped = Best(10, [&] {
      Check(ExpertFfn(*blas, ew, offsets, d, width, x.as<float>(), y->as<float>(),
                      scratch->as<float>()),
            "ExpertFfn");
    });
    std::printf(
        "grouped (%s) %.3f ms (%.1f TFLOP/s), dense cuBLAS %.3f ms (%.1f TFLOP/s): grouped / "
        "dense time %.2f\n",
        cublas ? "cuBLAS" : "batch-invariant GEMM", grouped * 1e3, flops / grouped / 1e12,
        dense * 1e3, flops / dense / 1e12, grouped / dense);
  }
}

// The engine's projections (y [m, n] = x [m, k] @ w [n, k]^T) through the batch-invariant GEMM
// and through cuBLAS, fp32 and bf16 weights, at decode and prefill row counts: what standing rule
// 1 costs per product. Times are per product, averaged over 20 back-to-back launches.
void GemmBench(const Bandwidth& bw) {
  auto blas = Blas::Create();
  Check(blas.status(), "cuBLAS");
  struct Shape {
    const char* name;
    int64_t n, k;
  };
  const Shape shapes[] = {{"small q_a", 384, 1024},       {"small o", 1024, 512},
                          {"small lm_head", 32000, 1024}, {"V2 q_a", 1536, 5120},
                          {"V2 kv_a", 576, 5120},         {"V2 o", 5120, 16384}};
  std::printf("\nprojections: batch-invariant GEMM vs cuBLAS (ms per product; GB/s of weights)\n");
  std::printf("%-14s %-5s %5s %11s %11s %8s %10s %8s\n", "shape", "dtype", "m", "invariant",
              "cuBLAS", "inv/cub", "inv GB/s", "of peak");
  const int64_t max_m = 256;
  for (const Shape& sh : shapes) {
    DeviceBuffer x = Filled(static_cast<size_t>(max_m * sh.k), 5);
    DeviceBuffer w = Filled(static_cast<size_t>(sh.n * sh.k), 6, 0.03f);
    auto wb = DeviceBuffer::Alloc(static_cast<size_t>(sh.n * sh.k) * 2);
    auto y = DeviceBuffer::Alloc(static_cast<size_t>(max_m * sh.n) * 4);
    Check(wb.status(), "alloc");
    Check(y.status(), "alloc");
    Check(ToBf16(w.as<float>(), sh.n * sh.k, wb->as<uint16_t>()), "ToBf16");
    for (const bool bf16 : {false, true}) {
      const DeviceWeight dw{bf16 ? wb->get() : w.get(), bf16};
      for (const int64_t m : {int64_t{1}, int64_t{16}, int64_t{64}, max_m}) {
        double t[2];
        for (const bool cublas : {false, true}) {
          blas->set_cublas(cublas);
          t[cublas] =
              Best(3,
                   [&] {
                     for (int i = 0; i < 20; ++i) {
                       Check(Linear(*blas, x.as<float>(), m, dw, sh.n, sh.k, y->as<float>()),
                             "Linear");
                     }
                   }) /
              20;
        }
        const double bytes = static_cast<double>(sh.n * sh.k) * (bf16 ? 2 : 4);
        std::printf("%-14s %-5s %5lld %11.4f %11.4f %8.2f %10.1f %8.2f\n", sh.name,
                    bf16 ? "bf16" : "f32", static_cast<long long>(m), t[0] * 1e3, t[1] * 1e3,
                    t[0] / t[1], bytes / t[0] / 1e9, bytes / t[0] / bw.peak);
      }
    }
  }
}

// Decode steps per second of `engine` for `batch` sequences of 16 prompt tokens each (prefilled
// first, not timed), over `steps` steps of one token per sequence.
double DecodeTokensPerSecond(StepEngine& engine, int64_t batch, int steps) {
  std::vector<std::unique_ptr<KvSequence>> seqs;
  std::vector<SequenceStep> b(static_cast<size_t>(batch));
  for (int64_t i = 0; i < batch; ++i) {
    seqs.push_back(engine.NewSequence());
    b[static_cast<size_t>(i)].cache = seqs.back().get();
    for (int j = 0; j < 16; ++j) b[static_cast<size_t>(i)].tokens.push_back((i * 31 + j) % 1000);
  }
  std::vector<std::vector<float>> logits;
  Check(engine.Step(b, &logits), "prefill");
  const auto t0 = Clock::now();
  for (int s = 0; s < steps; ++s) {
    for (auto& x : b) x.tokens.assign(1, (s * 7 + 1) % 1000);
    Check(engine.Step(b, &logits), "decode step");
  }
  const double secs = std::chrono::duration<double>(Clock::now() - t0).count();
  return static_cast<double>(batch * steps) / secs;
}

void EngineBench(const std::string& cache_dir) {
  const std::string dir = cache_dir + "/small";
  if (!LoadModelConfig(dir).ok()) {
    std::printf("writing the small preset to %s (bf16, ~1.6 GB) ...\n", dir.c_str());
    TinyModelOptions o;
    o.dtype = DType::kBF16;
    Check(WriteTinyModel(dir, *PresetConfig("small"), o), "make the small preset");
  }
  auto ck = LoadModelConfig(dir);
  Check(ck.status(), "config");
  auto experts = CudaExperts::Create(*ck, 0);
  Check(experts.status(), "CudaExperts");
  LocalModelOptions lo;
  lo.expert_accelerator = experts->get();
  auto gpu_model = LocalModel::Load(dir, lo);
  Check(gpu_model.status(), "load");
  Check((*experts)->Preload((*gpu_model)->experts()), "copy the experts to the GPU");
  auto cpu_model = LocalModel::Load(dir);
  Check(cpu_model.status(), "load");
  CudaEngineOptions g;
  g.kv_blocks = 64 * 4;  // 64 sequences of up to 64 tokens
  auto gpu = CudaEngine::Create(*ck, (*gpu_model)->dense(), (*gpu_model)->routed_experts(), g);
  Check(gpu.status(), "CudaEngine");
  g.cublas_gemms = true;  // the engine's own products through cuBLAS (not batch-invariant)
  auto fast = CudaEngine::Create(*ck, (*gpu_model)->dense(), (*gpu_model)->routed_experts(), g);
  Check(fast.status(), "CudaEngine (cuBLAS)");
  std::printf(
      "decode tokens/s, small preset (bf16 weights: bf16 activations on the GPU, the fp32 "
      "upcast's arithmetic on the CPU); gpu: the batch-invariant GEMM (default), gpu-cublas: the "
      "engine's products through cuBLAS (the experts' stay invariant):\n");
  std::printf("%6s %12s %12s %12s %8s %14s\n", "batch", "gpu", "gpu-cublas", "cpu", "gpu/cpu",
              "gpu/gpu-cublas");
  for (int64_t batch : {1, 16, 64}) {
    DecodeTokensPerSecond(**gpu, batch, 2);  // warm-up: experts copied, buffers grown
    DecodeTokensPerSecond(**fast, batch, 2);
    const double on_gpu = DecodeTokensPerSecond(**gpu, batch, 16);
    const double on_cublas = DecodeTokensPerSecond(**fast, batch, 16);
    const double on_cpu = DecodeTokensPerSecond((*cpu_model)->engine(), batch, batch == 1 ? 8 : 3);
    std::printf("%6lld %12.1f %12.1f %12.1f %8.2f %14.2f\n", static_cast<long long>(batch), on_gpu,
                on_cublas, on_cpu, on_gpu / on_cpu, on_gpu / on_cublas);
  }
}

int Main(int argc, char** argv) {
  std::string cache_dir = "/tmp/dmoe-bench";
  bool engine = true;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--model-cache" && i + 1 < argc) {
      cache_dir = argv[++i];
    } else if (a == "--no-engine") {
      engine = false;
    } else {
      std::fprintf(stderr, "usage: cuda_bench [--model-cache DIR] [--no-engine]\n");
      return 2;
    }
  }
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
  GemmBench(bw);
  ExpertBench(1024, 512, 64, 16);  // small's shapes, a prefill-sized batch
  ExpertBench(5120, 1536, 6, 1);   // V2's, batch-1 decode (top-6)
  if (engine) EngineBench(cache_dir);
  // Which path cuBLAS-mode experts' products took (ExpertBench's fp32 run; bf16 is known only
  // where a cuBLAS-mode run had bf16 experts, which the engine rows above do not).
  std::printf("\nexperts' grouped cuBLAS call: fp32 inputs %s, bf16 inputs %s\n",
              GroupedGemmRefused(false) ? "one product per expert" : "grouped",
              GroupedGemmRefused(true) ? "one product per expert" : "grouped (or not yet tried)");
  return 0;
}

}  // namespace
}  // namespace dmoe::cuda

int main(int argc, char** argv) { return dmoe::cuda::Main(argc, argv); }
