#include "bench/read_bandwidth.h"

#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <vector>

#include "common/huge_pages.h"
#include "kernels/cpu/thread_pool.h"

namespace dmoe {
namespace {

// A sum of a slice far larger than the caches: loads and little else.
__attribute__((target("avx2"))) int64_t SumSlice(const uint8_t* p, size_t bytes) {
  const auto* v = reinterpret_cast<const __m256i*>(p);
  __m256i a = _mm256_setzero_si256(), b = a, c = a, d = a;
  for (size_t i = 0; i + 4 <= bytes / 32; i += 4) {
    a = _mm256_add_epi64(a, _mm256_loadu_si256(v + i));
    b = _mm256_add_epi64(b, _mm256_loadu_si256(v + i + 1));
    c = _mm256_add_epi64(c, _mm256_loadu_si256(v + i + 2));
    d = _mm256_add_epi64(d, _mm256_loadu_si256(v + i + 3));
  }
  a = _mm256_add_epi64(_mm256_add_epi64(a, b), _mm256_add_epi64(c, d));
  return _mm256_extract_epi64(a, 0);
}

}  // namespace

int64_t SumBytes(const uint8_t* p, size_t bytes) { return SumSlice(p, bytes); }

double ReadBandwidth(int reps, size_t bytes, size_t offset) {
  using Clock = std::chrono::steady_clock;
  constexpr size_t n = size_t{1} << 30;
  static std::vector<uint8_t>* const kept = [] {
    auto* b = new std::vector<uint8_t>(n, 1);
    UseHugePages(b->data(), n);  // as the weights are (common/huge_pages.h): the machine's best
    return b;
  }();
  const uint8_t* const buf = kept->data() + std::min(offset, n - std::min(bytes, n));
  const int parts = cpu::ThePool().size();
  const size_t per = std::min(bytes, n) / static_cast<size_t>(parts) / 128 * 128;
  std::vector<int64_t> sink(static_cast<size_t>(parts));
  double best = 1e30;
  for (int rep = 0; rep < reps; ++rep) {
    const auto t0 = Clock::now();
    cpu::ThePool().Run(parts, [&](int p) {
      sink[static_cast<size_t>(p)] = SumSlice(buf + per * static_cast<size_t>(p), per);
    });
    best = std::min(best, std::chrono::duration<double>(Clock::now() - t0).count());
  }
  int64_t total = 0;
  for (int64_t v : sink) total += v;
  if (total == 42) std::printf(" ");  // keeps the sums alive
  return static_cast<double>(per * static_cast<size_t>(parts)) / best;
}

}  // namespace dmoe
