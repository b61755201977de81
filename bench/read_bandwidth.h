// The machine's multi-threaded read bandwidth, as the benchmarks measure it beside their figures
// (engine_bench's limit fractions, kernel_bench's fractions of it).
#ifndef DMOE_BENCH_READ_BANDWIDTH_H_
#define DMOE_BENCH_READ_BANDWIDTH_H_

#include <cstddef>
#include <cstdint>

namespace dmoe {

// Bytes per second read by every core of the kernel pool at once, each summing its own slice of
// a 1 GiB buffer (made once, in 2 MiB pages as the weights are held, and kept): the best of
// `reps` reads of `bytes` starting at `offset`.
double ReadBandwidth(int reps = 5, size_t bytes = size_t{1} << 30, size_t offset = 0);

// The probe's read of `bytes` at p (a sum of 32-byte loads, four chains; bytes a multiple of
// 128), for a benchmark to read other memory the way the probe does.
int64_t SumBytes(const uint8_t* p, size_t bytes);

}  // namespace dmoe

#endif  // DMOE_BENCH_READ_BANDWIDTH_H_
