// Kernel benchmark: prints figures, passes/fails nothing. How close one linear layer's product at
// few rows (decode) comes to the machine's read bandwidth, measured in the same run: for each
// weight format and shape, LinearW over copies of the matrix that together are far larger than
// the caches (each call reads its weights from memory, as a decode step does), on the kernel pool,
// as GB/s of weights read and as a fraction of the read bandwidth (the best of two probes before
// the row, as engine_bench's limit fraction takes it). Where a batch-1 step falls short of its
// limit, this says whether the products themselves do (the kernels) or the step around them
// (passes, serial work). Beside each row, the same copies read with no products (the probe's
// loads, in LinearW's pool chunks, alternating with it): how far the kernel is from a plain read
// of its bytes, apart from how far a plain read is from the probe.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "bench/read_bandwidth.h"
#include "common/dtype.h"
#include "common/huge_pages.h"
#include "kernels/cpu/bf16dot.h"
#include "kernels/cpu/qlinear.h"
#include "kernels/cpu/thread_pool.h"
#include "kernels/cpu/w8a8.h"

namespace dmoe {
namespace {

using Clock = std::chrono::steady_clock;

struct Shape {
  std::string name;
  int64_t out, in;
};

// The products of a batch-1 decode step, per preset (out x in).
std::vector<Shape> PresetShapes(const std::string& preset) {
  if (preset == "small") {
    return {{"q_a", 384, 1024},         {"q_b", 768, 384},          {"o", 1024, 512},
            {"dense up", 2816, 1024},   {"dense down", 1024, 2816}, {"expert up", 512, 1024},
            {"expert down", 1024, 512}, {"lm_head", 32000, 1024}};
  }
  if (preset == "v2-lite") {
    return {{"q", 3072, 2048},           {"kv_a", 576, 2048},         {"o", 2048, 2048},
            {"dense up", 10944, 2048},   {"dense down", 2048, 10944}, {"expert up", 1408, 2048},
            {"expert down", 2048, 1408}, {"lm_head", 32000, 2048}};
  }
  return {};
}

struct Format {
  const char* name;
  cpu::WeightFormat format;
  bool a16;  // bf16: activations rounded to bf16 (vdpbf16ps)
};

// `copies` packed copies of a random [out, in] matrix in `f`, in 2 MiB pages, and their refs.
struct Copies {
  std::vector<uint8_t> bytes;
  std::vector<float> scales;
  std::vector<int32_t> sums;
  std::vector<cpu::WeightRef> refs;
};

void MakeCopies(const Format& f, const Shape& s, int64_t copies, Copies* c) {
  const bool int8 = f.format == cpu::WeightFormat::kInt8;
  const size_t each = static_cast<size_t>(s.out * s.in) * (int8 ? 1 : 2);
  std::vector<uint8_t> one(each);
  std::mt19937 rng(7);
  if (int8) {
    std::uniform_int_distribution<int> d(-127, 127);
    for (auto& b : one) b = static_cast<uint8_t>(static_cast<int8_t>(d(rng)));
    c->scales.assign(static_cast<size_t>(s.out), 0.01f);
    c->sums.resize(static_cast<size_t>(s.out));
    cpu::Int8RowSums(reinterpret_cast<const int8_t*>(one.data()), s.out, s.in, c->sums.data());
  } else {
    std::normal_distribution<float> d(0.0f, 0.05f);
    auto* h = reinterpret_cast<uint16_t*>(one.data());
    for (size_t i = 0; i < each / 2; ++i) h[i] = FloatToBf16(d(rng));
  }
  cpu::PackRows(f.format, one.data(), s.out, s.in, one.data());
  ReserveHugePages(&c->bytes, each * static_cast<size_t>(copies));
  c->bytes.resize(each * static_cast<size_t>(copies));
  c->refs.clear();
  for (int64_t k = 0; k < copies; ++k) {
    uint8_t* dst = c->bytes.data() + each * static_cast<size_t>(k);
    std::memcpy(dst, one.data(), each);
    cpu::WeightRef r;
    r.format = f.format;
    r.out = s.out;
    r.in = s.in;
    r.packed = true;
    if (int8) {
      r.q = dst;
      r.scales = c->scales.data();
      r.sums = c->sums.data();
    } else {
      r.bf16 = reinterpret_cast<const uint16_t*>(dst);
    }
    c->refs.push_back(r);
  }
}

// LinearW's chunks of a product at one row (kernels/cpu/qlinear.cc, Chunks): one under 2^18
// weights, else two per pool thread (at most one per 64 output rows).
int64_t ReadChunks(const Shape& s) {
  if (s.out * s.in < (int64_t{1} << 18)) return 1;
  return std::min<int64_t>(2 * cpu::ThePool().size(), std::max<int64_t>(1, s.out / 64));
}

struct Options {
  std::vector<std::string> presets = {"small", "v2-lite"};
  std::vector<std::string> formats = {"bf16", "bf16a16", "int8"};
  int64_t rows = 1;
  double seconds = 0.3;    // per figure
  int64_t pool_mib = 512;  // the copies of one shape together
};

// One row: the probes, then passes over the copies for `seconds`; prints the figures.
void Measure(const Options& o, const Format& f, const Shape& s) {
  Copies c;
  const int64_t per = s.out * s.in * (f.format == cpu::WeightFormat::kInt8 ? 1 : 2);
  const int64_t copies = std::max<int64_t>(2, (o.pool_mib << 20) / per);
  MakeCopies(f, s, copies, &c);
  std::vector<float> x(static_cast<size_t>(o.rows * s.in)), y(static_cast<size_t>(o.rows * s.out));
  std::mt19937 rng(11);
  std::normal_distribution<float> d(0.0f, 1.0f);
  for (float& v : x) v = d(rng);
  cpu::SetBf16Activations(f.a16);
  for (const auto& r : c.refs) cpu::LinearW(x.data(), o.rows, r, y.data());  // warm: page tables
  const double probe = std::max(ReadBandwidth(2, size_t{128} << 20, 0),
                                ReadBandwidth(2, size_t{128} << 20, size_t{128} << 20));
  // Passes of LinearW over every copy, each followed by a pass that reads the same copies the
  // probe's way, cut in as many pool chunks as LinearW's: both see the same minutes.
  const int chunks = static_cast<int>(ReadChunks(s));
  const size_t piece = static_cast<size_t>(per) / static_cast<size_t>(chunks) / 128 * 128;
  std::vector<int64_t> sums(static_cast<size_t>(chunks));  // (kept alive below)
  int64_t calls = 0;
  double secs = 0, read_secs = 0;
  while (secs < o.seconds) {
    auto t0 = Clock::now();
    for (const auto& r : c.refs) cpu::LinearW(x.data(), o.rows, r, y.data());
    calls += copies;
    secs += std::chrono::duration<double>(Clock::now() - t0).count();
    t0 = Clock::now();
    for (int64_t k = 0; k < copies; ++k) {
      const uint8_t* base = c.bytes.data() + static_cast<size_t>(per * k);
      cpu::ThePool().Run(chunks, [&](int i) {
        sums[static_cast<size_t>(i)] += SumBytes(base + piece * static_cast<size_t>(i), piece);
      });
    }
    read_secs += std::chrono::duration<double>(Clock::now() - t0).count();
  }
  cpu::SetBf16Activations(false);
  const double bytes = static_cast<double>(per) * static_cast<double>(calls);
  const double gbs = bytes / secs / 1e9;
  const double read_gbs =
      static_cast<double>(piece) * chunks * static_cast<double>(calls) / read_secs / 1e9;
  std::printf("%-8s %-12s %6lld x %-6lld %10.1f %10.1f %8.1f %7.1f%% %8.1f %7.1f%%\n", f.name,
              s.name.c_str(), static_cast<long long>(s.out), static_cast<long long>(s.in),
              secs / static_cast<double>(calls) * 1e6, gbs, probe / 1e9, 100.0 * gbs * 1e9 / probe,
              read_gbs, 100.0 * gbs / read_gbs);
  if (std::count(sums.begin(), sums.end(), 42) > 0) std::printf(" ");
  std::fflush(stdout);
}

const char kUsage[] =
    "usage: kernel_bench [--presets small,v2-lite] [--formats bf16,bf16a16,int8] [--rows 1]\n"
    "                    [--seconds 0.3] [--threads N]\n"
    "Per weight format and product shape of a preset's decode step: us per call of LinearW at\n"
    "--rows rows, the weight bytes it read per second, and that as a fraction of the machine's\n"
    "read bandwidth measured just before the row (best of two 128 MiB probes by every core).\n"
    "Each shape is held in copies of 512 MiB in all, so every call reads from memory.\n"
    "read: the same copies read the probe's way (a sum of loads, no products), cut in as many\n"
    "pool chunks as LinearW cuts them, in passes alternating with LinearW's (the same minutes);\n"
    "of read: the kernel's GB/s over it. Where `of read` is near 100 % and `of probe` is not,\n"
    "the gap is the memory's sustained rate under this access pattern, not the kernel.\n"
    "--threads sizes the kernel pool (default: one thread per usable CPU).\n";

int ParseArgs(int argc, char** argv, Options* o) {
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--help" || a == "-h") {
      std::fputs(kUsage, stdout);
      return 0;
    }
    if (i + 1 >= argc) {
      std::fprintf(stderr, "kernel_bench: %s needs a value\n%s", a.c_str(), kUsage);
      return 2;
    }
    const std::string v = argv[++i];
    bool ok = true;
    int threads = 0;
    if (a == "--presets") {
      o->presets = absl::StrSplit(v, ',');
      for (const auto& p : o->presets) ok = ok && !PresetShapes(p).empty();
    } else if (a == "--formats") {
      o->formats = absl::StrSplit(v, ',');
      for (const auto& f : o->formats) ok = ok && (f == "bf16" || f == "bf16a16" || f == "int8");
    } else if (a == "--rows") {
      ok = absl::SimpleAtoi(v, &o->rows) && o->rows >= 1 && o->rows <= 64;
    } else if (a == "--seconds") {
      ok = absl::SimpleAtod(v, &o->seconds) && o->seconds > 0 && o->seconds <= 60;
    } else if (a == "--threads") {
      ok = absl::SimpleAtoi(v, &threads) && threads >= 1 && cpu::SetKernelThreads(threads);
    } else {
      std::fprintf(stderr, "kernel_bench: unknown option %s\n%s", a.c_str(), kUsage);
      return 2;
    }
    if (!ok) {
      std::fprintf(stderr, "kernel_bench: bad value \"%s\" for %s\n%s", v.c_str(), a.c_str(),
                   kUsage);
      return 2;
    }
  }
  return -1;
}

int Main(int argc, char** argv) {
  Options o;
  if (int rc = ParseArgs(argc, argv, &o); rc >= 0) return rc;
  const Format kFormats[] = {{"bf16", cpu::WeightFormat::kBf16, false},
                             {"bf16a16", cpu::WeightFormat::kBf16, true},
                             {"int8", cpu::WeightFormat::kInt8, false}};
  cpu::SetInt8Activations(true);
  std::printf("kernel pool: %d threads; rows %lld\n", cpu::ThePool().size(),
              static_cast<long long>(o.rows));
  std::printf("%-8s %-12s %15s %10s %10s %8s %8s %8s %8s\n", "format", "product", "out x in",
              "us/call", "GB/s", "probe", "of probe", "read", "of read");
  for (const std::string& preset : o.presets) {
    std::printf("-- %s\n", preset.c_str());
    for (const Format& f : kFormats) {
      if (std::find(o.formats.begin(), o.formats.end(), f.name) == o.formats.end()) continue;
      for (const Shape& s : PresetShapes(preset)) Measure(o, f, s);
    }
  }
  return 0;
}

}  // namespace
}  // namespace dmoe

int main(int argc, char** argv) {
  dmoe::ReexecForHugePageMalloc(argv);  // as the services load (common/huge_pages.h)
  return dmoe::Main(argc, argv);
}
