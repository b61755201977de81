// Engine benchmark: prints figures, passes/fails nothing. Every ratio is measured in this one run.
//
//   decode tokens/s and ms/step at batch 1, 16, 64 on the tiny and small presets;
//   small preset, batch 1: effective weight bytes read per second / memcpy bandwidth;
//   sgemm GFLOP/s at the expert shapes / sgemm GFLOP/s of a large square.
#include <cblas.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "attention_service/local_model.h"
#include "bench/shard_process.h"
#include "kernels/cpu/blas_threads.h"
#include "kernels/cpu/invariant_gemm.h"
#include "kernels/cpu/ops.h"
#include "kernels/cpu/small_gemm.h"
#include "model/tiny_model.h"

namespace dmoe {
namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

// Bytes copied per second by memcpy over a buffer far larger than the caches (best of 5).
double MemcpyBandwidth() {
  const size_t n = size_t{512} << 20;
  std::vector<char> a(n, 1), b(n, 2);
  double best = 1e30;
  for (int i = 0; i < 5; ++i) {
    const auto t0 = Clock::now();
    std::memcpy(b.data(), a.data(), n);
    best = std::min(best, Seconds(t0, Clock::now()));
    a[static_cast<size_t>(i)] = b[n - 1 - static_cast<size_t>(i)];
  }
  return static_cast<double>(n) / best;
}

// The engine's own small-M kernel at the same shape.
double SmallMGflops(int m, int n, int k, int reps) {
  std::vector<float> a(static_cast<size_t>(m) * k, 0.5f), b(static_cast<size_t>(n) * k, 0.25f),
      c(static_cast<size_t>(m) * n);
  double best = 1e30;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = Clock::now();
    cpu::SmallMLinear(a.data(), m, k, b.data(), n, c.data(), false);
    best = std::min(best, Seconds(t0, Clock::now()));
  }
  return 2.0 * m * n * k / best / 1e9;
}

// The batch-invariant kernel (the default for every linear layer) at the same shape.
double InvariantGflops(int m, int n, int k, int reps) {
  std::vector<float> a(static_cast<size_t>(m) * k, 0.5f), b(static_cast<size_t>(n) * k, 0.25f),
      c(static_cast<size_t>(m) * n);
  double best = 1e30;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = Clock::now();
    cpu::DotRows(a.data(), m, k, b.data(), n, k, k, c.data(), n);
    best = std::min(best, Seconds(t0, Clock::now()));
  }
  return 2.0 * m * n * k / best / 1e9;
}

double SgemmGflops(int m, int n, int k, int reps) {
  std::vector<float> a(static_cast<size_t>(m) * k, 0.5f), b(static_cast<size_t>(n) * k, 0.25f),
      c(static_cast<size_t>(m) * n);
  double best = 1e30;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = Clock::now();
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, n, k, 1.0f, a.data(), k, b.data(), k,
                0.0f, c.data(), n);
    best = std::min(best, Seconds(t0, Clock::now()));
  }
  return 2.0 * m * n * k / best / 1e9;
}

struct DecodeResult {
  double tokens_per_s;
  double ms_per_step;
};

DecodeResult BenchDecode(Engine& engine, int batch, int steps, int prompt_len) {
  const ModelConfig& c = engine.config();
  std::vector<SequenceKvCache> caches;
  caches.reserve(static_cast<size_t>(batch));
  for (int i = 0; i < batch; ++i) caches.emplace_back(c);
  std::vector<SequenceStep> b(static_cast<size_t>(batch));
  for (int i = 0; i < batch; ++i) {
    b[static_cast<size_t>(i)].cache = &caches[static_cast<size_t>(i)];
    for (int j = 0; j < prompt_len; ++j) {
      b[static_cast<size_t>(i)].tokens.push_back(
          static_cast<int32_t>((i * 131 + j * 17 + 3) % c.vocab_size));
    }
  }
  std::vector<std::vector<float>> logits;
  if (!engine.Step(b, &logits).ok()) std::abort();
  auto next = [&]() {
    for (int i = 0; i < batch; ++i) {
      b[static_cast<size_t>(i)].tokens.assign(
          1, ArgMax(logits[static_cast<size_t>(i)].data(), c.vocab_size));
    }
  };
  next();
  if (!engine.Step(b, &logits).ok()) std::abort();  // warm-up step
  engine.ResetTimings();
  const auto t0 = Clock::now();
  for (int s = 0; s < steps; ++s) {
    next();
    if (!engine.Step(b, &logits).ok()) std::abort();
  }
  const double secs = Seconds(t0, Clock::now());
  return {batch * steps / secs, 1000.0 * secs / steps};
}

// Bytes of weights one batch-1 decode step reads: everything but the embedding table (one row)
// and the routed experts, plus top-k experts per MoE layer.
double BytesPerBatch1Step(const LocalModel& m) {
  const ModelConfig& c = m.config();
  const double expert = 4.0 * 3 * c.hidden_size * c.moe_intermediate_size;
  int moe_layers = 0;
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) moe_layers += c.IsMoeLayer(l);
  const double routed_all = static_cast<double>(m.experts().bytes());
  const double embed = 4.0 * c.vocab_size * c.hidden_size;
  return static_cast<double>(m.weight_bytes()) - routed_all - embed + embed / c.vocab_size +
         moe_layers * c.num_experts_per_tok * expert;
}

int Main(int argc, char** argv) {
  std::string presets = "tiny,small", cache_dir = "/tmp/dmoe-bench";
  std::vector<int> batches = {1, 16, 64};
  int steps = 0;
  int distributed = 2;
  int blas_threads = -1;  // -1: each process's share of the CPUs in the distributed run
  bool shard_memory = true;
  int kernel_rounds = 3;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() { return i + 1 < argc ? std::string(argv[++i]) : std::string(); };
    if (a == "--presets") {
      presets = value();
    } else if (a == "--model-cache") {
      cache_dir = value();
    } else if (a == "--distributed") {
      distributed = std::atoi(value().c_str());
    } else if (a == "--blas-threads") {
      blas_threads = std::max(0, std::atoi(value().c_str()));
    } else if (a == "--no-shard-memory") {
      shard_memory = false;
    } else if (a == "--kernel-rounds") {
      if (!absl::SimpleAtoi(value(), &kernel_rounds) || kernel_rounds < 0) return 2;
    } else if (a == "--steps") {
      steps = std::atoi(value().c_str());
    } else if (a == "--batches") {
      batches.clear();
      for (auto s : absl::StrSplit(value(), ',')) {
        int v;
        if (absl::SimpleAtoi(s, &v) && v > 0) batches.push_back(v);
      }
    } else {
      std::printf(
          "usage: engine_bench [--presets tiny,small] [--batches 1,16,64] [--steps N]\n"
          "                    [--model-cache DIR] [--distributed N] [--no-shard-memory]\n"
          "                    [--blas-threads T] [--kernel-rounds R]\n"
          "Writes the preset checkpoints into DIR once (small: ~1.6 GB bf16), then prints decode\n"
          "tokens/s and ms/step per batch size, the batch-1 weight-read bandwidth of the small\n"
          "preset against memcpy bandwidth, and sgemm GFLOP/s at expert shapes against 2048^3.\n"
          "With --distributed N (default 2; 0 = off) the same decode runs with the routed experts\n"
          "on N dmoe-expert processes over UCX (UCX_TLS from the environment, default tcp,self)\n"
          "and the ratio distributed / in-process is printed; on the small preset it also prints\n"
          "the resident memory of a shard hosting 1/4 of the experts and of one hosting all.\n"
          "In-process runs use OpenBLAS's default threads (one per CPU); in the distributed run "
          "the\n"
          "bench process and every shard use CPUs / (N + 1) (as `dmoe up` gives each process its\n"
          "share), unless --blas-threads T sets T for them (0 = OpenBLAS's default).\n"
          "--kernel-rounds R (default 3; 0 = off): decode with the batch-invariant kernels (the\n"
          "default) and with the previous BLAS kernels (cpu::KernelMode::kBlas) in R alternating\n"
          "rounds per batch size; prints the medians and invariant / blas.\n");
      return a == "--help" || a == "-h" ? 0 : 2;
    }
  }
  const double memcpy_bw = MemcpyBandwidth();
  std::printf("memcpy bandwidth: %.2f GB/s\n", memcpy_bw / 1e9);
  for (absl::string_view preset_view : absl::StrSplit(presets, ',')) {
    const std::string preset(preset_view);
    auto config = PresetConfig(preset);
    if (!config.ok()) {
      std::fprintf(stderr, "%s\n", std::string(config.status().message()).c_str());
      return 2;
    }
    const std::string dir = cache_dir + "/" + preset;
    struct stat st;
    if (::stat((dir + "/config.json").c_str(), &st) != 0) {
      std::printf("writing the %s preset to %s ...\n", preset.c_str(), dir.c_str());
      std::fflush(stdout);
      TinyModelOptions o;
      o.dtype = preset == "small" ? DType::kBF16 : DType::kF32;
      if (auto s = WriteTinyModel(dir, *config, o); !s.ok()) {
        std::fprintf(stderr, "%s\n", std::string(s.message()).c_str());
        return 1;
      }
    }
    auto model = LocalModel::Load(dir, {}, /*log_progress=*/true);
    if (!model.ok()) {
      std::fprintf(stderr, "%s\n", std::string(model.status().message()).c_str());
      return 1;
    }
    std::printf("\n== preset %s: %.1f MiB of fp32 weights in memory\n", preset.c_str(),
                static_cast<double>((*model)->weight_bytes()) / (1 << 20));
    std::printf("%8s %12s %10s\n", "batch", "tokens/s", "ms/step");
    for (int b : batches) {
      int n = steps > 0 ? steps : (preset == "small" ? (b == 1 ? 20 : 8) : 32);
      n = static_cast<int>(std::min<int64_t>(n, config->max_position_embeddings - 16 - 2));
      const DecodeResult r = BenchDecode((*model)->engine(), b, n, 16);
      const EngineTimings& t = (*model)->engine().timings();
      const double ms = 1000.0 / n;
      std::printf(
          "%8d %12.1f %10.3f   (ms/step: attention %.2f, dense mlp %.2f, router %.2f, "
          "routed experts %.2f, shared %.2f, lm_head %.2f)\n",
          b, r.tokens_per_s, r.ms_per_step, t.attention * ms, t.dense_mlp * ms, t.router * ms,
          t.routed * ms, t.shared * ms, t.lm_head * ms);
      if (b == 1 && preset == "small") {
        const double bytes = BytesPerBatch1Step(**model);
        const double bw = bytes / (r.ms_per_step / 1000.0);
        std::printf(
            "  batch-1 weights read per step: %.1f MiB; %.2f GB/s = %.2f x memcpy bandwidth\n",
            bytes / (1 << 20), bw / 1e9, bw / memcpy_bw);
      }
    }
    if (kernel_rounds > 0) {
      std::printf(
          "-- kernels: batch-invariant (default) vs BLAS (opt-in), medians of %d "
          "alternating rounds\n",
          kernel_rounds);
      std::printf("%8s %16s %16s %10s\n", "batch", "invariant tok/s", "blas tok/s", "inv/blas");
      for (int b : batches) {
        int n = steps > 0 ? steps : (preset == "small" ? (b == 1 ? 20 : 8) : 32);
        n = static_cast<int>(std::min<int64_t>(n, config->max_position_embeddings - 16 - 2));
        std::vector<double> inv, blas;
        for (int round = 0; round < kernel_rounds; ++round) {
          for (cpu::KernelMode m : {cpu::KernelMode::kInvariant, cpu::KernelMode::kBlas}) {
            cpu::SetKernelMode(m);
            const DecodeResult r = BenchDecode((*model)->engine(), b, n, 16);
            (m == cpu::KernelMode::kInvariant ? inv : blas).push_back(r.tokens_per_s);
          }
        }
        cpu::SetKernelMode(cpu::KernelMode::kInvariant);
        auto median = [](std::vector<double> v) {
          std::sort(v.begin(), v.end());
          return v[v.size() / 2];
        };
        std::printf("%8d %16.1f %16.1f %10.3f\n", b, median(inv), median(blas),
                    median(inv) / median(blas));
      }
    }
    if (distributed > 0) {
      setenv("UCX_NET_DEVICES", "lo", 0);
      setenv("UCX_TLS", "tcp,self", 0);
      std::vector<std::unique_ptr<ShardProcess>> shards;
      LocalModelOptions o;
      const int dist_threads =
          blas_threads >= 0 ? blas_threads : cpu::BlasThreadsShare(distributed + 1);
      for (int i = 0; i < distributed; ++i) {
        shards.push_back(std::make_unique<ShardProcess>(
            dir, std::to_string(i) + "/" + std::to_string(distributed),
            cache_dir + "/ready" + std::to_string(i) + ".json", dist_threads));
        o.expert_shards.push_back(shards.back()->grpc());
      }
      auto remote = LocalModel::Load(dir, o);
      if (!remote.ok()) {
        std::fprintf(stderr, "%s\n", std::string(remote.status().message()).c_str());
        return 1;
      }
      const int local_threads = cpu::BlasThreads();
      const int remote_threads = dist_threads > 0 ? dist_threads : local_threads;
      std::printf(
          "-- routed experts on %d dmoe-expert processes over UCX (%s, bf16 wire); OpenBLAS "
          "threads: %d in-process, %d per process distributed\n",
          distributed, std::getenv("UCX_TLS"), local_threads, remote_threads);
      std::printf("%8s %12s %14s %14s %8s\n", "batch", "tokens/s", "ms/step dist", "ms/step local",
                  "ratio");
      for (int b : batches) {
        int n = steps > 0 ? steps : (preset == "small" ? (b == 1 ? 20 : 8) : 32);
        n = static_cast<int>(std::min<int64_t>(n, config->max_position_embeddings - 16 - 2));
        cpu::SetBlasThreads(local_threads).IgnoreError();
        const DecodeResult local = BenchDecode((*model)->engine(), b, n, 16);
        // OpenBLAS's idle workers of the in-process run spin on for ~0.1 s (2^28 cycles) after
        // its last call: let them go to sleep before the distributed run shares the CPUs.
        cpu::SetBlasThreads(remote_threads).IgnoreError();
        std::this_thread::sleep_for(std::chrono::milliseconds(300));
        const DecodeResult dist = BenchDecode((*remote)->engine(), b, n, 16);
        cpu::SetBlasThreads(local_threads).IgnoreError();
        std::printf("%8d %12.1f %14.3f %14.3f %8.2f\n", b, dist.tokens_per_s, dist.ms_per_step,
                    local.ms_per_step, dist.ms_per_step / local.ms_per_step);
      }
    }
    if (preset == "small" && shard_memory) {
      uint64_t all_bytes = 0;
      const ModelConfig& c = *config;
      for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
        if (c.IsMoeLayer(l))
          all_bytes += 4ull * 3 * c.hidden_size * c.moe_intermediate_size * c.n_routed_experts;
      }
      ShardProcess quarter(dir, "0/4", cache_dir + "/ready_q.json");
      const double q = quarter.RssMiB();
      ShardProcess all(dir, "*:*", cache_dir + "/ready_a.json");
      const double a = all.RssMiB();
      std::printf(
          "\nshard resident memory: 1/4 of the experts %.1f MiB, all experts %.1f MiB "
          "(expert bytes: all %.1f MiB, 1/4 %.1f MiB); (all - quarter) / (3/4 of the "
          "expert bytes) = %.2f\n",
          q, a, all_bytes / 1048576.0, all_bytes / 4 / 1048576.0,
          (a - q) / (0.75 * all_bytes / 1048576.0));
    }
    if (preset == "small") {
      const double square = SgemmGflops(2048, 2048, 2048, 3);
      std::printf("\nsgemm 2048^3: %.1f GFLOP/s\n", square);
      const int d = static_cast<int>(config->hidden_size),
                im = static_cast<int>(config->moe_intermediate_size);
      std::printf("%-26s %14s %10s %16s %16s\n", "expert shape (M x N x K)", "sgemm GFLOP/s",
                  "vs square", "invariant GFLOP/s", "small-M GFLOP/s");
      for (int m : {1, 2, 8, 16, 64, 512}) {
        for (int down = 0; down < 2; ++down) {
          const int n = down ? d : im, k = down ? im : d;
          const double g = SgemmGflops(m, n, k, 20);
          std::printf("%-7s %4d x %4d x %4d %14.1f %9.1f%%", down ? "down" : "gate/up", m, n, k, g,
                      100 * g / square);
          std::printf(" %16.1f", InvariantGflops(m, n, k, 20));
          if (m <= cpu::kSmallMMax) std::printf(" %16.1f", SmallMGflops(m, n, k, 20));
          std::printf("\n");
        }
      }
    }
  }
  return 0;
}

}  // namespace
}  // namespace dmoe

int main(int argc, char** argv) { return dmoe::Main(argc, argv); }
