// Batch invariance of the CPU kernels (DESIGN §6): a row's result is the same bits whatever the
// rows around it, their number, the tile it lands in, the thread split, and the AVX2/portable
// path. Every comparison is memcmp, never a tolerance. The goldens for the canonical orders are
// written out here (DotRowsGolden, AxpyRowsGolden), independently of the kernels' code.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "common/dtype.h"
#include "gtest/gtest.h"
#include "kernels/cpu/invariant_gemm.h"
#include "kernels/cpu/mla.h"
#include "kernels/cpu/ops.h"
#include "kernels/cpu/qlinear.h"

namespace dmoe::cpu {
namespace {

std::vector<float> Random(size_t n, uint32_t seed, float scale = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = d(rng);
  return v;
}

bool SameBits(const float* a, const float* b, size_t n) {
  return std::memcmp(a, b, sizeof(float) * n) == 0;
}

// The documented DotRows order for one output: 8 lanes of fma chains, the fixed lane tree, then
// the tail in order.
float DotRowsGolden(const float* x, const float* w, int64_t k) {
  float lane[8] = {};
  const int64_t k8 = k / 8 * 8;
  for (int64_t j = 0; j < k8; ++j) lane[j % 8] = std::fma(x[j], w[j], lane[j % 8]);
  float s =
      ((lane[0] + lane[4]) + (lane[1] + lane[5])) + ((lane[2] + lane[6]) + (lane[3] + lane[7]));
  for (int64_t j = k8; j < k; ++j) s = std::fma(x[j], w[j], s);
  return s;
}

// A row alone equals the same row at every position of batches of 2..64 random companions, and
// the written-out canonical order; on the AVX2 path and on the portable one.
TEST(Invariance, DotRowsRowAloneEqualsRowInAnyBatch) {
  for (bool portable : {false, true}) {
    ForcePortableInvariantForTesting(portable);
    for (auto [n, k] : {std::pair<int64_t, int64_t>{37, 29}, {64, 512}, {1024, 1024}, {5, 8}}) {
      const auto w = Random(static_cast<size_t>(n * k), 1);
      const auto target = Random(static_cast<size_t>(k), 2);
      std::vector<float> alone(static_cast<size_t>(n));
      DotRows(target.data(), 1, k, w.data(), n, k, k, alone.data(), n);
      for (int64_t o = 0; o < n; ++o) {
        const float g = DotRowsGolden(target.data(), w.data() + o * k, k);
        ASSERT_EQ(0, std::memcmp(&g, &alone[static_cast<size_t>(o)], 4))
            << "n " << n << " k " << k << " o " << o << " portable " << portable;
      }
      for (int64_t m : {2, 3, 4, 5, 7, 16, 64}) {
        auto x = Random(static_cast<size_t>(m * k), static_cast<uint32_t>(m));
        const int64_t at = (m * 7) % m;
        std::copy(target.begin(), target.end(), x.begin() + at * k);
        std::vector<float> y(static_cast<size_t>(m * n));
        DotRows(x.data(), m, k, w.data(), n, k, k, y.data(), n);
        EXPECT_TRUE(SameBits(y.data() + at * n, alone.data(), static_cast<size_t>(n)))
            << "n " << n << " k " << k << " m " << m << " portable " << portable;
      }
    }
  }
  ForcePortableInvariantForTesting(false);
}

// AVX2 and portable give the same bits (the portable path is the same order, only slower).
TEST(Invariance, DotRowsAvx2EqualsPortable) {
  const int64_t m = 11, n = 300, k = 203;
  const auto x = Random(static_cast<size_t>(m * k), 3), w = Random(static_cast<size_t>(n * k), 4);
  std::vector<float> a(static_cast<size_t>(m * n)), b(a.size());
  DotRows(x.data(), m, k, w.data(), n, k, k, a.data(), n);
  ForcePortableInvariantForTesting(true);
  DotRows(x.data(), m, k, w.data(), n, k, k, b.data(), n);
  ForcePortableInvariantForTesting(false);
  EXPECT_TRUE(SameBits(a.data(), b.data(), a.size()));
}

// AxpyRows: one fma chain per element in k order. A row alone == in a batch; K split into two
// accumulating calls == one call; the written-out chain is the golden; at every ISA level
// (AVX-512's 256-column tile of one row, 64- and 16-column tiles, AVX2's 32 and 8, the scalar
// tail).
TEST(Invariance, AxpyRowsRowAloneEqualsRowInAnyBatchAndKSplits) {
  const int64_t k = 45;
  for (int level : {0, 1, 2}) {
    const int used = SetGemmIsaForTesting(level);
    for (int64_t n : {77, 141, 256, 333}) {  // 256 and 333: the 256-column tile of one row
      const auto w = Random(static_cast<size_t>(k * n), 5);
      const auto target = Random(static_cast<size_t>(k), 6);
      std::vector<float> alone(static_cast<size_t>(n));
      AxpyRows(target.data(), 1, k, w.data(), k, n, n, alone.data(), n, false);
      for (int64_t c = 0; c < n; ++c) {
        float acc = 0;
        for (int64_t j = 0; j < k; ++j)
          acc = std::fma(target[static_cast<size_t>(j)], w[static_cast<size_t>(j * n + c)], acc);
        ASSERT_EQ(0, std::memcmp(&acc, &alone[static_cast<size_t>(c)], 4))
            << "level " << used << " n " << n << " column " << c;
      }
      for (int64_t m : {2, 3, 4, 5, 16, 64}) {
        auto x = Random(static_cast<size_t>(m * k), static_cast<uint32_t>(10 + m));
        const int64_t at = m / 2;
        std::copy(target.begin(), target.end(), x.begin() + at * k);
        std::vector<float> y(static_cast<size_t>(m * n));
        AxpyRows(x.data(), m, k, w.data(), k, n, n, y.data(), n, false);
        EXPECT_TRUE(SameBits(y.data() + at * n, alone.data(), static_cast<size_t>(n)))
            << "level " << used << " n " << n << " m " << m;
      }
      std::vector<float> split(static_cast<size_t>(n));
      AxpyRows(target.data(), 1, k, w.data(), 20, n, n, split.data(), n, false);
      AxpyRows(target.data() + 20, 1, k, w.data() + 20 * n, k - 20, n, n, split.data(), n, true);
      EXPECT_TRUE(SameBits(split.data(), alone.data(), static_cast<size_t>(n)))
          << "level " << used << " n " << n;
    }
  }
  SetGemmIsaForTesting(-1);
}

// AxpyRowsBf16 (MLA's W_UK held bf16) gives exactly AxpyRows' bits on the fp32 upcast, at
// every ISA level (the 64- and 16-column AVX-512 tiles, AVX2's 32 and 8, the scalar tail), M from
// 1 to 64, accumulating or not.
TEST(Invariance, AxpyRowsBf16EqualsItsFp32UpcastAtEveryIsaLevel) {
  std::printf("gemm ISA levels checked: 0..%d (2 = AVX-512, 1 = AVX2)\n", SetGemmIsaForTesting(-1));
  for (int level : {0, 1, 2}) {
    const int used = SetGemmIsaForTesting(level);
    for (auto [k, n] : {std::pair<int64_t, int64_t>{45, 77}, {16, 141}, {128, 512}, {3, 256}}) {
      const auto wf = Random(static_cast<size_t>(k * n), 21);
      std::vector<uint16_t> h(wf.size());
      FloatToBf16N(wf.data(), wf.size(), h.data());
      std::vector<float> up(wf.size());
      Bf16ToFloatN(h.data(), h.size(), up.data());
      for (int64_t m : {1, 2, 3, 5, 64}) {
        const auto x = Random(static_cast<size_t>(m * k), static_cast<uint32_t>(30 + m));
        for (bool acc : {false, true}) {
          auto want = Random(static_cast<size_t>(m * n), 7);
          auto got = want;
          AxpyRows(x.data(), m, k, up.data(), k, n, n, want.data(), n, acc);
          AxpyRowsBf16(x.data(), m, k, h.data(), k, n, n, got.data(), n, acc);
          ASSERT_TRUE(SameBits(want.data(), got.data(), want.size()))
              << "level " << used << " k " << k << " n " << n << " m " << m << " acc " << acc;
        }
      }
    }
  }
  SetGemmIsaForTesting(-1);
}

// bf16 weights held as bf16 give exactly the bits of their fp32 upcast through DotRows (the
// kernel widens them in registers): every shape class (tails of k, of n, tiles of 1..3 rows),
// M from 1 to 512, AVX2 and portable, in the invariant mode and through LinearW.
TEST(Invariance, Bf16WeightsEqualTheirFp32UpcastBitForBit) {
  for (bool portable : {false, true}) {
    ForcePortableInvariantForTesting(portable);
    for (auto [n, k] : {std::pair<int64_t, int64_t>{37, 29},
                        {64, 512},
                        {512, 1024},
                        {5, 8},
                        {1024, 512},
                        {288, 1024}}) {
      const auto wf = Random(static_cast<size_t>(n * k), 11);
      std::vector<uint16_t> h(wf.size());
      FloatToBf16N(wf.data(), wf.size(), h.data());
      std::vector<float> up(wf.size());
      Bf16ToFloatN(h.data(), h.size(), up.data());
      const WeightRef ref{WeightFormat::kBf16, nullptr, nullptr, nullptr, n, k, h.data()};
      for (int64_t m : {1, 2, 3, 4, 5, 6, 7, 13, 16, 64, 512}) {
        if (portable && m * n * k > (int64_t{1} << 26)) continue;  // the slow path: fewer
        const auto x = Random(static_cast<size_t>(m * k), static_cast<uint32_t>(100 + m));
        std::vector<float> want(static_cast<size_t>(m * n)), got(want.size()), via(want.size());
        DotRows(x.data(), m, k, up.data(), n, k, k, want.data(), n);
        DotRowsBf16(x.data(), m, k, h.data(), n, k, k, got.data(), n);
        LinearW(x.data(), m, ref, via.data());
        ASSERT_TRUE(SameBits(want.data(), got.data(), want.size()))
            << "n " << n << " k " << k << " m " << m << " portable " << portable;
        ASSERT_TRUE(SameBits(want.data(), via.data(), want.size()))
            << "n " << n << " k " << k << " m " << m << " portable " << portable;
      }
    }
  }
  ForcePortableInvariantForTesting(false);
}

// Packed bf16 (the layout models load into) gives the bits of the fp32 upcast through DotRows at
// every ISA level this CPU has (forced: portable, AVX2, AVX-512), M from 1 to 512, through
// DotRowsBf16Packed and LinearW; Dequantize reads its rows back exactly.
TEST(Invariance, PackedBf16EqualsFp32UpcastAtEveryIsaLevel) {
  const int top = SetGemmIsaForTesting(-1);
  std::printf("gemm ISA levels checked: 0..%d (2 = AVX-512, 1 = AVX2)\n", top);
  for (auto [n, k] : {std::pair<int64_t, int64_t>{8, 8},
                      {64, 512},
                      {512, 1024},
                      {1024, 512},
                      {288, 1024},
                      {768, 384},
                      {4000, 256}}) {
    ASSERT_TRUE(Bf16Packable(n, k));
    const auto wf = Random(static_cast<size_t>(n * k), 12);
    std::vector<uint16_t> h(wf.size()), packed(wf.size());
    FloatToBf16N(wf.data(), wf.size(), h.data());
    PackRows(WeightFormat::kBf16, h.data(), n, k, packed.data());
    std::vector<uint16_t> in_place = h;
    PackRows(WeightFormat::kBf16, in_place.data(), n, k, in_place.data());
    ASSERT_EQ(in_place, packed);
    std::vector<float> up(wf.size());
    Bf16ToFloatN(h.data(), h.size(), up.data());
    WeightRef ref{WeightFormat::kBf16, nullptr, nullptr, nullptr, n, k, packed.data()};
    ref.packed = true;
    std::vector<float> back(up.size());
    Dequantize(ref, 0, n, back.data());
    ASSERT_TRUE(SameBits(up.data(), back.data(), up.size()));
    for (int level = 0; level <= top; ++level) {
      SetGemmIsaForTesting(level);
      // (every AVX-512 tile size 1..6, and 7 = 4 + 3, 13 = 5 + 4 + 4: tiles.h)
      for (int64_t m : {1, 2, 3, 4, 5, 6, 7, 13, 16, 64, 512}) {
        if (level == 0 && m * n * k > (int64_t{1} << 26)) continue;  // the slow path: fewer
        const auto x = Random(static_cast<size_t>(m * k), static_cast<uint32_t>(200 + m));
        std::vector<float> want(static_cast<size_t>(m * n)), got(want.size()), via(want.size());
        SetGemmIsaForTesting(-1);
        DotRows(x.data(), m, k, up.data(), n, k, k, want.data(), n);
        SetGemmIsaForTesting(level);
        DotRowsBf16Packed(x.data(), m, k, packed.data(), n, k, got.data(), n);
        LinearW(x.data(), m, ref, via.data());
        ASSERT_TRUE(SameBits(want.data(), got.data(), want.size()))
            << "n " << n << " k " << k << " m " << m << " level " << level;
        ASSERT_TRUE(SameBits(want.data(), via.data(), want.size()))
            << "n " << n << " k " << k << " m " << m << " level " << level;
      }
    }
    SetGemmIsaForTesting(-1);
  }
}

// Linear (fp32) and LinearW (int8, fp8, bf16): a row alone == the same row in batches of 2..40 rows
// (crossing the register kernel's 8-row groups and the old 16-row BLAS switch).
TEST(Invariance, LinearWEveryFormatRowAloneEqualsRowInAnyBatch) {
  const int64_t out = 300, in = 260;
  const auto wf = Random(static_cast<size_t>(out * in), 7, 0.05f);
  std::vector<uint8_t> q8, qf8;
  std::vector<float> s8, sf8;
  QuantizeInt8PerChannel(wf.data(), out, in, &q8, &s8);
  QuantizeFp8Blocks(wf.data(), out, in, &qf8, &sf8);
  std::vector<uint16_t> h(wf.size());
  FloatToBf16N(wf.data(), wf.size(), h.data());
  WeightRef refs[4];
  refs[0] = {WeightFormat::kF32, wf.data(), nullptr, nullptr, out, in};
  refs[1] = {WeightFormat::kInt8, nullptr, q8.data(), s8.data(), out, in};
  refs[2] = {WeightFormat::kFp8, nullptr, qf8.data(), sf8.data(), out, in};
  refs[3] = {WeightFormat::kBf16, nullptr, nullptr, nullptr, out, in, h.data()};
  const auto target = Random(static_cast<size_t>(in), 8);
  for (const WeightRef& w : refs) {
    std::vector<float> alone(static_cast<size_t>(out));
    LinearW(target.data(), 1, w, alone.data());
    for (int64_t m : {2, 7, 8, 9, 16, 17, 40}) {
      auto x = Random(static_cast<size_t>(m * in), static_cast<uint32_t>(20 + m));
      const int64_t at = m - 1;
      std::copy(target.begin(), target.end(), x.begin() + at * in);
      std::vector<float> y(static_cast<size_t>(m * out));
      LinearW(x.data(), m, w, y.data());
      EXPECT_TRUE(SameBits(y.data() + at * out, alone.data(), static_cast<size_t>(out)))
          << WeightFormatName(w.format) << " m " << m;
    }
  }
}

// The control: the BLAS mode is not invariant on these shapes (so the tests above can fail).
TEST(Invariance, BlasModeIsNotInvariantWhichIsWhyItIsOptIn) {
  SetKernelMode(KernelMode::kBlas);
  const int64_t out = 512, in = 1024, m = 64;
  const auto w = Random(static_cast<size_t>(out * in), 9);
  auto x = Random(static_cast<size_t>(m * in), 10);
  std::vector<float> alone(static_cast<size_t>(out)), y(static_cast<size_t>(m * out));
  Linear(x.data(), 1, in, w.data(), out, alone.data());
  Linear(x.data(), m, in, w.data(), out, y.data());
  SetKernelMode(KernelMode::kInvariant);
  EXPECT_FALSE(SameBits(y.data(), alone.data(), static_cast<size_t>(out)));
}

// MLA: the output for a query position is the same bits whether it is computed in a prefill
// chunk of 1, 3, 16 or all the positions, or in batched decode beside other sequences; for fp32
// and 8-bit caches, paged in blocks of 4 rows.
TEST(Invariance, MlaPositionIsTheSameInEveryChunkAndInBatchedDecode) {
  MlaParams p;
  // Shapes large enough that OpenBLAS's blocking depends on M (the BLAS mode fails this test).
  p.num_heads = 4;
  p.nope_dim = 32;
  p.rope_dim = 8;
  p.v_dim = 32;
  p.latent_rank = 128;
  p.softmax_scale = 0.1f;
  const int64_t h = 4, r = 128, dr = 8, qd = 40, lc = r + dr, ov = h * 32, ctx = 70, bt = 16;
  const auto kv_b = Random(static_cast<size_t>(h * (32 + 32) * r), 11);
  p.kv_b = kv_b.data();
  const auto rows = Random(static_cast<size_t>(ctx * lc), 12);
  const auto q = Random(static_cast<size_t>(ctx * h * qd), 13);
  for (KvDType dt : {KvDType::kF32, KvDType::kInt8, KvDType::kFp8, KvDType::kBf16}) {
    // The cache, paged in blocks of bt rows, stored as dt.
    const int64_t rb = KvRowBytes(dt, r, dr);
    std::vector<std::vector<float>> fblocks;
    std::vector<std::vector<uint8_t>> qblocks;
    std::vector<const float*> fptr;
    std::vector<const uint8_t*> qptr;
    for (int64_t first = 0; first < ctx; first += bt) {
      fblocks.emplace_back(rows.begin() + first * lc,
                           rows.begin() + std::min(ctx, first + bt) * lc);
      fblocks.back().resize(static_cast<size_t>(bt * lc));
      qblocks.emplace_back(static_cast<size_t>(bt * rb));
      for (int64_t u = first; u < std::min(ctx, first + bt); ++u) {
        QuantizeKvRow(dt, rows.data() + u * lc, r, dr, qblocks.back().data() + (u - first) * rb);
      }
    }
    for (auto& b : fblocks) fptr.push_back(b.data());
    for (auto& b : qblocks) qptr.push_back(b.data());
    LatentRows cache;
    cache.block_tokens = bt;
    if (dt == KvDType::kF32) {
      cache.blocks = fptr.data();
    } else {
      cache.qblocks = qptr.data();
      cache.dtype = dt;
      cache.r = r;
      cache.dr = dr;
    }
    // Spans of 256 (one span here), 16 (5 spans) and 7 (spans starting inside 16-row blocks),
    // each run with the split chosen by the call, a task per query, a task per span (also in
    // waves of one span's results), a task per head group in one pass (3 groups too), and at the
    // AVX2 and portable ISA levels: one result per span length.
    struct Variant {
      int mode, isa;
      int64_t wave_bytes, head_groups;
    };
    const Variant variants[] = {{0, -1, 0, 0}, {1, -1, 0, 0}, {2, -1, 0, 0}, {2, -1, 1, 0},
                                {2, -1, 0, 3}, {2, -1, 1, 4}, {3, -1, 0, 0}, {3, -1, 0, 3},
                                {3, 1, 0, 0},  {0, 1, 0, 0},  {0, 0, 0, 0}};
    for (int64_t span : {256, 16, 7}) {
      SetMlaSpanForTesting(span);
      std::vector<float> scratch;
      std::vector<float> whole(static_cast<size_t>(ctx * ov));
      SetMlaAttendModeForTesting(0);
      MlaAttentionAbsorbed(p, q.data(), ctx, cache, ctx, 0, whole.data(), &scratch);
      for (const Variant& v : variants) {
        SetMlaAttendModeForTesting(v.mode);
        SetMlaWaveBytesForTesting(v.wave_bytes);
        SetMlaHeadGroupsForTesting(v.head_groups);
        const int isa = SetGemmIsaForTesting(v.isa);
        const std::string what = std::string(KvDTypeName(dt)) + " span " + std::to_string(span) +
                                 " mode " + std::to_string(v.mode) + " isa " + std::to_string(isa) +
                                 " wave bytes " + std::to_string(v.wave_bytes) + " head groups " +
                                 std::to_string(v.head_groups);
        for (int64_t chunk : {1, 3, 16, 64, 70}) {
          std::vector<float> got(whole.size());
          for (int64_t pos0 = 0; pos0 < ctx; pos0 += chunk) {
            const int64_t t = std::min(chunk, ctx - pos0);
            MlaAttentionAbsorbed(p, q.data() + pos0 * h * qd, t, cache, pos0 + t, pos0,
                                 got.data() + pos0 * ov, &scratch);
          }
          EXPECT_TRUE(SameBits(got.data(), whole.data(), whole.size()))
              << what << " chunk " << chunk;
        }
        // Batched decode: position pos of our sequence beside 4 others (other caches, lengths).
        const auto other_q = Random(static_cast<size_t>(5 * h * qd), 14);
        for (int64_t pos : {int64_t{0}, int64_t{5}, int64_t{16}, int64_t{40}, ctx - 1}) {
          std::vector<float> bq(other_q);
          std::copy(q.begin() + pos * h * qd, q.begin() + (pos + 1) * h * qd,
                    bq.begin() + 2 * h * qd);
          const LatentRows caches[5] = {cache, cache, cache, cache, cache};
          const int64_t lens[5] = {ctx, 3, pos + 1, 1, 37};
          std::vector<float> o(static_cast<size_t>(5 * ov));
          MlaDecodeAbsorbedBatch(p, bq.data(), 5, caches, lens, o.data(), &scratch);
          EXPECT_TRUE(SameBits(o.data() + 2 * ov, whole.data() + pos * ov, static_cast<size_t>(ov)))
              << what << " pos " << pos;
          // Alone (batch 1: its spans side by side on every core under mode 0).
          MlaDecodeAbsorbedBatch(p, bq.data() + 2 * h * qd, 1, caches, lens + 2, o.data(),
                                 &scratch);
          EXPECT_TRUE(SameBits(o.data(), whole.data() + pos * ov, static_cast<size_t>(ov)))
              << what << " alone, pos " << pos;
        }
      }
    }
    SetMlaSpanForTesting(0);
    SetMlaAttendModeForTesting(0);
    SetMlaWaveBytesForTesting(0);
    SetMlaHeadGroupsForTesting(0);
    SetGemmIsaForTesting(-1);
  }
}

}  // namespace
}  // namespace dmoe::cpu
