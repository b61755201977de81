// 8-bit weights: fp8 e4m3 encoding against its definition, quantizer error bounds, and the int8 /
// fp8 linear kernels (row counts 1-9 and the group / dequantize boundaries, odd sizes, AVX2 tails,
// chunking) against a float64 computation written here from the stored bytes and scales.
#include "kernels/cpu/qlinear.h"

#include <immintrin.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>

#include "common/dtype.h"
#include "gtest/gtest.h"
#include "kernels/cpu/bf16dot.h"
#include "kernels/cpu/invariant_gemm.h"
#include "kernels/cpu/w8a8.h"

namespace dmoe::cpu {
namespace {

// e4m3 by its definition: sign, 4-bit exponent (bias 7), 3-bit mantissa, no infinities.
double Fp8Definition(uint8_t v) {
  const int e = (v >> 3) & 15, m = v & 7;
  const double mag = e == 0 ? m * std::pow(2.0, -9) : (1 + m / 8.0) * std::pow(2.0, e - 7);
  return (v & 0x80) ? -mag : mag;
}

TEST(Fp8, EveryCodeDecodesAndRoundTrips) {
  for (int c = 0; c < 256; ++c) {
    const uint8_t v = static_cast<uint8_t>(c);
    if ((v & 0x7f) == 0x7f) {
      EXPECT_TRUE(std::isnan(Fp8E4M3ToFloat(v)));
      continue;
    }
    EXPECT_EQ(Fp8E4M3ToFloat(v), static_cast<float>(Fp8Definition(v))) << c;
    EXPECT_EQ(FloatToFp8E4M3(Fp8E4M3ToFloat(v)), v) << c;
  }
  EXPECT_EQ(Fp8E4M3ToFloat(0x7e), 448.0f);
  EXPECT_EQ(FloatToFp8E4M3(1e6f), 0x7e);  // saturates
  EXPECT_EQ(FloatToFp8E4M3(-1e6f), 0xfe);
  EXPECT_EQ(FloatToFp8E4M3(1.0625f), 0x38);  // a tie between 1 and 1.125: to even (1)
  EXPECT_EQ(FloatToFp8E4M3(1.1875f), 0x3a);  // a tie between 1.125 and 1.25: to even (1.25)
  EXPECT_EQ(FloatToFp8E4M3(std::ldexp(3.0f, -10)), 0x02);  // 1.5 subnormal steps: to even (2)
}

TEST(Quantizers, ErrorsStayWithinHalfAStep) {
  std::mt19937 rng(5);
  std::normal_distribution<float> nd(0, 0.05f);
  const int64_t out = 200, in = 300;
  std::vector<float> w(out * in);
  for (float& v : w) v = nd(rng);
  std::vector<uint8_t> q;
  std::vector<float> s;
  QuantizeInt8PerChannel(w.data(), out, in, &q, &s);
  for (int64_t o = 0; o < out; ++o) {
    for (int64_t i = 0; i < in; ++i) {
      const double deq = static_cast<int8_t>(q[o * in + i]) * static_cast<double>(s[o]);
      EXPECT_LE(std::fabs(deq - w[o * in + i]), s[o] * 0.5 + 1e-9);
    }
  }
  QuantizeFp8Blocks(w.data(), out, in, &q, &s);
  ASSERT_EQ(s.size(), 2u * 3u);  // ceil(200/128) x ceil(300/128)
  for (int64_t o = 0; o < out; ++o) {
    for (int64_t i = 0; i < in; ++i) {
      const double sc = s[(o / 128) * 3 + i / 128];
      const double deq = Fp8Definition(q[o * in + i]) * sc;
      const double x = w[o * in + i];
      // Relative 2^-4 for normals; absolute half a subnormal step (2^-10 * scale) below them.
      EXPECT_LE(std::fabs(deq - x), std::max(std::fabs(x) / 16, sc * std::ldexp(1.0, -10)) + 1e-12);
    }
  }
}

// The int8 weight quantizer's AVX2 path gives the portable path's bytes and scales: tails of 0..7
// columns, an all-zero row, halfway ties (to even), NaN and infinities in the vector part and in
// the tail, an all-NaN row and a row whose maximum is subnormal.
TEST(Quantizers, Int8PerChannelAvx2EqualsPortable) {
  std::mt19937 rng(9);
  std::normal_distribution<float> nd(0, 1);
  for (int64_t in : {8, 9, 10, 11, 12, 13, 14, 15, 64, 301}) {
    const int64_t out = 9;
    std::vector<float> w(out * in);
    for (float& v : w) v = nd(rng);
    auto at = [&](int64_t o, int64_t i) -> float& { return w[static_cast<size_t>(o * in + i)]; };
    for (int64_t i = 0; i < in; ++i) {
      at(1, i) = 0.0f;                                                    // zeros
      at(2, i) = static_cast<float>(i % 2 == 0 ? 127 : (i % 50) - 24.5);  // ties
      at(7, i) = std::ldexp(static_cast<float>(i % 7) - 3.0f, -140);      // subnormal max
      at(8, i) = std::nanf("");                                           // all NaN
    }
    at(3, in / 2) = std::nanf("");
    at(4, 1) = -INFINITY;
    at(5, in - 1) = std::nanf("");
    at(6, in - 1) = INFINITY;
    std::vector<uint8_t> q0, q1;
    std::vector<float> s0, s1;
    QuantizeInt8PerChannel(w.data(), out, in, &q1, &s1);
    ForcePortableKernelsForTesting(true);
    QuantizeInt8PerChannel(w.data(), out, in, &q0, &s0);
    ForcePortableKernelsForTesting(false);
    EXPECT_EQ(q0, q1) << "in " << in;
    ASSERT_EQ(s0.size(), s1.size());
    EXPECT_EQ(0, std::memcmp(s0.data(), s1.data(), 4 * s0.size())) << "in " << in;
    EXPECT_EQ(static_cast<int8_t>(q1[static_cast<size_t>(2 * in + 1)]), -24) << "a tie to even";
  }
}

// The W8A8 definition, written out: each row of x to int8 with its own scale, exact integer sums.
void QuantizeRowGolden(const float* x, int64_t k, std::vector<int>* q, float* scale) {
  float amax = 0;
  for (int64_t i = 0; i < k; ++i) amax = std::max(amax, std::fabs(x[i]));
  const float inv = amax > 0 ? 127.0f / amax : 0.0f;
  *scale = amax / 127.0f;
  q->resize(static_cast<size_t>(k));
  for (int64_t i = 0; i < k; ++i) {
    (*q)[static_cast<size_t>(i)] =
        static_cast<int>(std::max(-127.0f, std::min(127.0f, std::nearbyint(x[i] * inv))));
  }
}

// With W8A8 (the default for int8 weights) the int8 case checks the definition above; with
// W8A16 (SetInt8Activations(false)) the fp32 activations.
void CheckLinear(WeightFormat f, int64_t out, int64_t in) {
  const bool w8a8 = f == WeightFormat::kInt8 && Int8ActivationsW8A8();
  std::mt19937 rng(static_cast<unsigned>(out * 7 + in));
  std::normal_distribution<float> nd(0, 0.1f);
  std::vector<float> w(out * in);
  for (float& v : w) v = nd(rng);
  std::vector<uint8_t> q;
  std::vector<float> s;
  if (f == WeightFormat::kInt8) {
    QuantizeInt8PerChannel(w.data(), out, in, &q, &s);
  } else {
    QuantizeFp8Blocks(w.data(), out, in, &q, &s);
  }
  WeightRef ref;
  ref.format = f;
  ref.q = q.data();
  ref.scales = s.data();
  ref.out = out;
  ref.in = in;
  const int64_t nb = (in + 127) / 128;
  for (int64_t t : {1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 17, 32, 33, 40}) {
    std::vector<float> x(t * in), y(t * out);
    for (float& v : x) v = nd(rng);
    LinearW(x.data(), t, ref, y.data());
    for (int64_t m = 0; m < t; ++m) {
      std::vector<int> qx;
      float sx = 0;
      QuantizeRowGolden(x.data() + m * in, in, &qx, &sx);
      for (int64_t o = 0; o < out; ++o) {
        if (w8a8) {
          int64_t dot = 0;
          for (int64_t i = 0; i < in; ++i) {
            dot += int64_t{qx[static_cast<size_t>(i)]} * static_cast<int8_t>(q[o * in + i]);
          }
          const double want = static_cast<double>(dot) * sx * s[o];
          ASSERT_NEAR(y[m * out + o], want, 1e-6 * std::fabs(want) + 1e-30)
              << "w8a8 t=" << t << " out=" << out << " in=" << in << " row " << m << " col " << o;
          continue;
        }
        double want = 0, mag = 0;
        for (int64_t i = 0; i < in; ++i) {
          const double wd = f == WeightFormat::kInt8
                                ? static_cast<int8_t>(q[o * in + i]) * static_cast<double>(s[o])
                                : Fp8Definition(q[o * in + i]) * s[(o / 128) * nb + i / 128];
          want += wd * x[m * in + i];
          mag += std::fabs(wd * x[m * in + i]);
        }
        ASSERT_NEAR(y[m * out + o], want, 1e-5 * mag + 1e-7)
            << WeightFormatName(f) << " t=" << t << " out=" << out << " in=" << in << " row " << m
            << " col " << o;
      }
    }
  }
}

TEST(QLinear, Int8MatchesFloat64) {
  SetInt8Activations(false);
  for (auto [out, in] : {std::pair<int64_t, int64_t>{1, 8}, {7, 13}, {64, 256}, {300, 260}}) {
    CheckLinear(WeightFormat::kInt8, out, in);
  }
  SetInt8Activations(true);
}

// W8A8 against its definition at every instruction-set level this CPU has (forced), and the
// levels against each other bit for bit (integer sums: the order cannot matter).
TEST(QLinear, W8A8MatchesItsDefinitionAtEveryIsaLevel) {
  for (int level = 0; level <= Int8IsaLevel(); ++level) {
    SetInt8IsaForTesting(level);
    for (auto [out, in] :
         {std::pair<int64_t, int64_t>{1, 8}, {7, 13}, {64, 256}, {300, 260}, {37, 1000}}) {
      CheckLinear(WeightFormat::kInt8, out, in);
    }
  }
  const int64_t out = 300, in = 1030, t = 37;
  std::mt19937 rng(3);
  std::normal_distribution<float> nd(0, 1);
  std::vector<float> w(out * in), x(t * in);
  for (float& v : w) v = nd(rng);
  for (float& v : x) v = nd(rng);
  std::vector<uint8_t> q;
  std::vector<float> s;
  QuantizeInt8PerChannel(w.data(), out, in, &q, &s);
  const WeightRef ref{WeightFormat::kInt8, nullptr, q.data(), s.data(), out, in};
  std::vector<std::vector<float>> ys;
  for (int level = 0; level <= Int8IsaLevel(); ++level) {
    SetInt8IsaForTesting(level);
    ys.emplace_back(t * out);
    LinearW(x.data(), t, ref, ys.back().data());
    EXPECT_EQ(0, std::memcmp(ys[0].data(), ys.back().data(), 4 * ys[0].size())) << level;
  }
  SetInt8IsaForTesting(-1);
  std::printf("int8 kernel levels checked: 0..%d (2 = AVX512-VNNI, 1 = AVX2)\n", Int8IsaLevel());
}

// Packed int8 (the layout models load into): its W8A8 products equal the row-major matrix's bit
// for bit at every ISA level, for row counts across the 4-row groups and the chunking, and
// Dequantize reads its rows back exactly. The row-major path is checked against the definition
// above.
TEST(QLinear, PackedInt8EqualsRowMajorAtEveryIsaLevel) {
  for (auto [out, in] :
       {std::pair<int64_t, int64_t>{8, 32}, {64, 256}, {512, 1024}, {1024, 512}, {296, 96}}) {
    ASSERT_TRUE(Packable(WeightFormat::kInt8, out, in));
    std::mt19937 rng(static_cast<unsigned>(out + in));
    std::normal_distribution<float> nd(0, 1);
    std::vector<float> w(out * in);
    for (float& v : w) v = nd(rng);
    std::vector<uint8_t> q, packed(static_cast<size_t>(out * in));
    std::vector<float> s;
    QuantizeInt8PerChannel(w.data(), out, in, &q, &s);
    PackRows(WeightFormat::kInt8, q.data(), out, in, packed.data());
    if (in > 32) {
      ASSERT_NE(0, std::memcmp(q.data(), packed.data(), q.size())) << "nothing was moved";
    }
    std::vector<uint8_t> in_place = q;  // packing in place (how models load) gives the same bytes
    PackRows(WeightFormat::kInt8, in_place.data(), out, in, in_place.data());
    ASSERT_EQ(0, std::memcmp(in_place.data(), packed.data(), q.size()));
    const WeightRef plain{WeightFormat::kInt8, nullptr, q.data(), s.data(), out, in};
    WeightRef pref = plain;
    pref.q = packed.data();
    pref.packed = true;
    std::vector<float> d0(static_cast<size_t>(out * in)), d1(d0.size());
    Dequantize(plain, 0, out, d0.data());
    Dequantize(pref, 0, out, d1.data());
    ASSERT_EQ(0, std::memcmp(d0.data(), d1.data(), 4 * d0.size()));
    for (int level = 0; level <= Int8IsaLevel(); ++level) {
      SetInt8IsaForTesting(level);
      for (int64_t t : {1, 2, 3, 4, 5, 7, 9, 16, 17}) {
        std::vector<float> x(t * in), want(t * out), got(t * out);
        for (float& v : x) v = nd(rng);
        SetInt8IsaForTesting(0);
        LinearW(x.data(), t, plain, want.data());
        SetInt8IsaForTesting(level);
        LinearW(x.data(), t, pref, got.data());
        ASSERT_EQ(0, std::memcmp(want.data(), got.data(), 4 * want.size()))
            << "out " << out << " in " << in << " t " << t << " level " << level;
      }
    }
    SetInt8IsaForTesting(-1);
    // W8A16 on a packed matrix (dequantized, then fp32 products): the row-major W8A16 result up to
    // fp32 rounding (the scale is applied before the sum there, after it here).
    SetInt8Activations(false);
    for (int64_t t : {1, 5, 17}) {
      std::vector<float> x(t * in), want(t * out), got(t * out);
      for (float& v : x) v = nd(rng);
      LinearW(x.data(), t, plain, want.data());
      LinearW(x.data(), t, pref, got.data());
      for (size_t i = 0; i < want.size(); ++i) {
        ASSERT_NEAR(got[i], want[i], 1e-4f * (1 + std::fabs(want[i]))) << "w8a16 t " << t;
      }
    }
    SetInt8Activations(true);
  }
}

// LinearW2 (two products of one x in one pass over the pool) gives the bits of the two LinearW
// calls: 8-bit pairs packed, row-major and mixed (one quantization of x shared), across the
// chunking (one matrix small enough to run unsplit, one split) and row counts, at every ISA
// level; a pair it cannot fuse (fp32, W8A16) falls back to the two calls.
TEST(QLinear, LinearW2GivesTheBitsOfTwoLinearWCalls) {
  std::mt19937 rng(7);
  std::normal_distribution<float> nd(0, 1);
  const int64_t in = 1024;
  struct Held {
    std::vector<uint8_t> q, packed;
    std::vector<float> s, f;
    WeightRef plain, pref, f32;
  };
  auto make = [&](int64_t out) {
    Held h;
    h.f.resize(static_cast<size_t>(out * in));
    for (float& v : h.f) v = nd(rng);
    QuantizeInt8PerChannel(h.f.data(), out, in, &h.q, &h.s);
    h.packed.resize(h.q.size());
    PackRows(WeightFormat::kInt8, h.q.data(), out, in, h.packed.data());
    h.plain = WeightRef{WeightFormat::kInt8, nullptr, h.q.data(), h.s.data(), out, in};
    h.pref = h.plain;
    h.pref.q = h.packed.data();
    h.pref.packed = true;
    h.f32 = WeightRef{WeightFormat::kF32, h.f.data(), nullptr, nullptr, out, in};
    return h;
  };
  const Held a = make(384), b = make(120);  // 384 x 1024 is split over the pool, 120 x 1024 not
  auto check = [&](const WeightRef& w1, const WeightRef& w2, const std::string& what) {
    for (int64_t t : {1, 3, 5, 17}) {
      std::vector<float> x(static_cast<size_t>(t * in));
      for (float& v : x) v = nd(rng);
      std::vector<float> y1(static_cast<size_t>(t * w1.out)), y2(static_cast<size_t>(t * w2.out));
      std::vector<float> z1(y1.size(), 1.0f), z2(y2.size(), 1.0f);
      LinearW(x.data(), t, w1, y1.data());
      LinearW(x.data(), t, w2, y2.data());
      LinearW2(x.data(), t, w1, z1.data(), w2, z2.data());
      ASSERT_EQ(0, std::memcmp(y1.data(), z1.data(), 4 * y1.size())) << what << " t " << t;
      ASSERT_EQ(0, std::memcmp(y2.data(), z2.data(), 4 * y2.size())) << what << " t " << t;
    }
  };
  for (int level = 0; level <= Int8IsaLevel(); ++level) {
    SetInt8IsaForTesting(level);
    const std::string at = " level " + std::to_string(level);
    check(a.pref, b.pref, "packed" + at);
    check(b.plain, a.plain, "row-major" + at);
    check(a.plain, b.pref, "mixed" + at);
  }
  SetInt8IsaForTesting(-1);
  check(a.f32, b.pref, "fp32 beside int8");
  SetInt8Activations(false);
  check(a.pref, b.plain, "W8A16");
  SetInt8Activations(true);
}

// SwiGluPieces (the MLP cut into row chunks that other work shares passes with) gives
// SwiGluMlpW's bits: packed and row-major int8 (W8A8), packed bf16 under A32 and A16, a width the
// pool splits and one it does not, pieces run in reverse order, 1..4 rows, every ISA level; it
// declines weights whose kernels it does not cut (fp32, W8A16, a mix).
TEST(QLinear, SwiGluPiecesGiveTheBitsOfSwiGluMlpW) {
  std::mt19937 rng(11);
  std::normal_distribution<float> nd(0, 1);
  const int64_t d = 512;
  struct Held {
    std::vector<uint8_t> q, packed;
    std::vector<uint16_t> bf16;
    std::vector<float> s, f;
    WeightRef plain, pref, bref, f32;
  };
  auto make = [&](int64_t out, int64_t in) {
    Held h;
    h.f.resize(static_cast<size_t>(out * in));
    for (float& v : h.f) v = nd(rng) * 0.05f;
    QuantizeInt8PerChannel(h.f.data(), out, in, &h.q, &h.s);
    h.packed.resize(h.q.size());
    PackRows(WeightFormat::kInt8, h.q.data(), out, in, h.packed.data());
    h.plain = WeightRef{WeightFormat::kInt8, nullptr, h.q.data(), h.s.data(), out, in};
    h.pref = h.plain;
    h.pref.q = h.packed.data();
    h.pref.packed = true;
    h.bf16.resize(h.f.size());
    FloatToBf16N(h.f.data(), h.f.size(), h.bf16.data());
    PackRows(WeightFormat::kBf16, h.bf16.data(), out, in, h.bf16.data());
    h.bref = WeightRef{WeightFormat::kBf16, nullptr, nullptr, nullptr, out, in};
    h.bref.bf16 = h.bf16.data();
    h.bref.packed = true;
    h.f32 = WeightRef{WeightFormat::kF32, h.f.data(), nullptr, nullptr, out, in};
    return h;
  };
  enum Kind { kPacked8, kRowMajor8, kBf16, kBf16A16 };
  const char* names[] = {"int8 packed", "int8 row-major", "bf16", "bf16 A16"};
  SwiGluPieces pieces;                // reused across shapes, as the engine reuses it across layers
  for (int64_t width : {1024, 64}) {  // 1024: several chunks per product; 64: one each
    const Held g = make(width, d), u = make(width, d), dn = make(d, width);
    for (Kind kind : {kPacked8, kRowMajor8, kBf16, kBf16A16}) {
      const auto& ref = [kind](const Held& h) {
        return kind == kPacked8 ? h.pref : kind == kRowMajor8 ? h.plain : h.bref;
      };
      SetBf16Activations(kind == kBf16A16);
      const int levels = kind == kBf16      ? GemmIsaLevel()
                         : kind == kBf16A16 ? Bf16DotIsaLevel()
                                            : Int8IsaLevel();
      for (int level = 0; level <= levels; ++level) {
        SetInt8IsaForTesting(level);
        SetGemmIsaForTesting(level);
        SetBf16DotIsaForTesting(level);
        for (int64_t t = 1; t <= 4; ++t) {
          const std::string what = std::string(names[kind]) + " width " + std::to_string(width) +
                                   " level " + std::to_string(level) + " t " + std::to_string(t);
          std::vector<float> x(static_cast<size_t>(t * d)), scratch;
          for (float& v : x) v = nd(rng);
          std::vector<float> want(static_cast<size_t>(t * d)), got(want.size(), 7.0f);
          SwiGluMlpW(x.data(), t, ref(g), ref(u), ref(dn), want.data(), &scratch);
          ASSERT_TRUE(pieces.Prepare(x.data(), t, ref(g), ref(u), ref(dn), got.data())) << what;
          if (width == 1024) {
            EXPECT_GT(pieces.fronts(), 2) << what;
          }
          for (int i = pieces.fronts() - 1; i >= 0; --i) pieces.Front(i);
          pieces.Middle();
          for (int i = pieces.backs() - 1; i >= 0; --i) pieces.Back(i);
          ASSERT_EQ(0, std::memcmp(want.data(), got.data(), 4 * want.size())) << what;
        }
      }
      SetInt8IsaForTesting(-1);
      SetGemmIsaForTesting(-1);
      SetBf16DotIsaForTesting(-1);
      SetBf16Activations(false);
    }
    std::vector<float> x(static_cast<size_t>(d)), y(x.size());
    EXPECT_FALSE(pieces.Prepare(x.data(), 1, g.f32, u.f32, dn.f32, y.data()));
    EXPECT_FALSE(pieces.Prepare(x.data(), 1, g.pref, u.pref, dn.f32, y.data()));
    EXPECT_FALSE(pieces.Prepare(x.data(), 1, g.bref, u.bref, dn.pref, y.data()));
    SetInt8Activations(false);  // W8A16
    EXPECT_FALSE(pieces.Prepare(x.data(), 1, g.pref, u.pref, dn.pref, y.data()));
    SetInt8Activations(true);
  }
}

// What quantizing the activations costs: W8A8's error against float64 stays within a small
// multiple of W8A16's (weights quantized alike) on Gaussian data, reported.
TEST(QLinear, W8A8ErrorStaysNearW8A16) {
  const int64_t out = 512, in = 1024, t = 16;
  std::mt19937 rng(9);
  std::normal_distribution<float> nd(0, 1);
  std::vector<float> w(out * in), x(t * in);
  for (float& v : w) v = nd(rng) * 0.05f;
  for (float& v : x) v = nd(rng);
  std::vector<uint8_t> q;
  std::vector<float> s;
  QuantizeInt8PerChannel(w.data(), out, in, &q, &s);
  const WeightRef ref{WeightFormat::kInt8, nullptr, q.data(), s.data(), out, in};
  std::vector<float> a8(t * out), a16(t * out);
  LinearW(x.data(), t, ref, a8.data());
  SetInt8Activations(false);
  LinearW(x.data(), t, ref, a16.data());
  SetInt8Activations(true);
  double e8 = 0, e16 = 0, norm = 0;
  for (int64_t m = 0; m < t; ++m) {
    for (int64_t o = 0; o < out; ++o) {
      double want = 0;
      for (int64_t i = 0; i < in; ++i) want += double{w[o * in + i]} * x[m * in + i];
      e8 += (a8[m * out + o] - want) * (a8[m * out + o] - want);
      e16 += (a16[m * out + o] - want) * (a16[m * out + o] - want);
      norm += want * want;
    }
  }
  const double r8 = std::sqrt(e8 / norm), r16 = std::sqrt(e16 / norm);
  std::printf("relative RMS error vs float64: W8A8 %.5f, W8A16 %.5f\n", r8, r16);
  EXPECT_LT(r8, 0.02);
  EXPECT_LT(r8, 3 * r16);
}

TEST(QLinear, Fp8BlocksMatchFloat64) {
  for (auto [out, in] : {std::pair<int64_t, int64_t>{1, 8}, {7, 13}, {130, 256}, {300, 260}}) {
    CheckLinear(WeightFormat::kFp8, out, in);
  }
}

// Packed fp8 (the layout models load into): the bits of row-major fp8 on AVX2 (RowsAvx2, the
// chains of QLinear.Fp8BlocksMatchFloat64) at every ISA level (AVX-512, AVX2, portable), for row
// counts across the 4-row tiles and shapes whose last 128-column block is partial; Dequantize reads
// its rows back exactly; packing in place gives the same bytes.
TEST(QLinear, PackedFp8EqualsRowMajorAtEveryIsaLevel) {
  EXPECT_FALSE(Packable(WeightFormat::kFp8, 12, 64));
  EXPECT_FALSE(Packable(WeightFormat::kFp8, 16, 60));
  for (auto [out, in] : {std::pair<int64_t, int64_t>{8, 8},
                         {64, 256},
                         {512, 1024},
                         {1024, 512},
                         {296, 96},
                         {136, 200}}) {
    ASSERT_TRUE(Packable(WeightFormat::kFp8, out, in));
    std::mt19937 rng(static_cast<unsigned>(out * 7 + in));
    std::normal_distribution<float> nd(0, 1);
    std::vector<float> w(out * in);
    for (float& v : w) v = nd(rng);
    std::vector<uint8_t> q, packed(static_cast<size_t>(out * in));
    std::vector<float> s;
    QuantizeFp8Blocks(w.data(), out, in, &q, &s);
    PackRows(WeightFormat::kFp8, q.data(), out, in, packed.data());
    if (in > 8) {
      ASSERT_NE(0, std::memcmp(q.data(), packed.data(), q.size())) << "nothing was moved";
    }
    std::vector<uint8_t> in_place = q;
    PackRows(WeightFormat::kFp8, in_place.data(), out, in, in_place.data());
    ASSERT_EQ(0, std::memcmp(in_place.data(), packed.data(), q.size()));
    const WeightRef plain{WeightFormat::kFp8, nullptr, q.data(), s.data(), out, in};
    WeightRef pref = plain;
    pref.q = packed.data();
    pref.packed = true;
    std::vector<float> d0(static_cast<size_t>(out * in)), d1(d0.size());
    Dequantize(plain, 0, out, d0.data());
    Dequantize(pref, 0, out, d1.data());
    ASSERT_EQ(0, std::memcmp(d0.data(), d1.data(), 4 * d0.size()));
    const int top = SetGemmIsaForTesting(-1);
    for (int level = 0; level <= top; ++level) {
      for (int64_t t : {1, 2, 3, 4, 5, 7, 9, 16, 17}) {
        std::vector<float> x(t * in), want(t * out), got(t * out);
        for (float& v : x) v = nd(rng);
        SetGemmIsaForTesting(-1);
        LinearW(x.data(), t, plain, want.data());
        SetGemmIsaForTesting(level);
        LinearW(x.data(), t, pref, got.data());
        ASSERT_EQ(0, std::memcmp(want.data(), got.data(), 4 * want.size()))
            << "out " << out << " in " << in << " t " << t << " level " << level;
      }
    }
    SetGemmIsaForTesting(-1);
  }
  // Every one of the 256 codes (subnormals, both zeros, the NaN codes 0x7f / 0xff that decode to
  // +-480 in the row-major kernel), 8 rows x 256 columns, random scales.
  const int64_t out = 8, in = 256;
  std::vector<uint8_t> q(static_cast<size_t>(out * in)), packed(q.size());
  for (int64_t i = 0; i < out * in; ++i) q[static_cast<size_t>(i)] = static_cast<uint8_t>(i * 37);
  std::vector<float> s = {0.75f, 3.0f};
  PackRows(WeightFormat::kFp8, q.data(), out, in, packed.data());
  const WeightRef plain{WeightFormat::kFp8, nullptr, q.data(), s.data(), out, in};
  WeightRef pref = plain;
  pref.q = packed.data();
  pref.packed = true;
  std::mt19937 rng(5);
  std::normal_distribution<float> nd(0, 1);
  for (int level = 0; level <= SetGemmIsaForTesting(-1); ++level) {
    for (int64_t t : {3, 5}) {  // tiles decoding as they go; a group decoded once
      std::vector<float> x(t * in), want(t * out), got(t * out);
      for (float& v : x) v = nd(rng);
      SetGemmIsaForTesting(-1);
      LinearW(x.data(), t, plain, want.data());
      SetGemmIsaForTesting(level);
      LinearW(x.data(), t, pref, got.data());
      EXPECT_EQ(0, std::memcmp(want.data(), got.data(), 4 * want.size()))
          << "level " << level << " t " << t;
    }
  }
  SetGemmIsaForTesting(-1);
  std::vector<float> d0(static_cast<size_t>(out * in)), d1(d0.size());
  Dequantize(plain, 0, out, d0.data());
  Dequantize(pref, 0, out, d1.data());
  EXPECT_EQ(0, std::memcmp(d0.data(), d1.data(), 4 * d0.size()));
}

// fp8 under A16: each 128-column block through the bf16 A16 products (LinearBf16A16, tested
// against its definition in bf16dot_test) of x and the block's weights decoded here by e4m3's
// definition (exact in bf16), times the block's scale, summed in block order. Bit for bit, at
// every ISA level of the products and of the decoder, a row alone as in any batch.
struct Fp8Case {
  int64_t out, in;
  std::vector<uint8_t> q, packed;
  std::vector<float> s;
  WeightRef ref() const {
    WeightRef w{WeightFormat::kFp8, nullptr, packed.data(), s.data(), out, in};
    w.packed = true;
    return w;
  }
};

Fp8Case MakeFp8Case(int64_t out, int64_t in, bool every_code) {
  Fp8Case c{out, in, {}, std::vector<uint8_t>(static_cast<size_t>(out * in)), {}};
  std::mt19937 rng(static_cast<unsigned>(out * 3 + in));
  if (every_code) {  // all 256 codes: subnormals, both zeros, 0x7f / 0xff (+-480)
    c.q.resize(static_cast<size_t>(out * in));
    for (int64_t i = 0; i < out * in; ++i)
      c.q[static_cast<size_t>(i)] = static_cast<uint8_t>(i * 37);
    std::uniform_real_distribution<float> u(0.25f, 4.0f);
    c.s.resize(static_cast<size_t>(((out + 127) / 128) * ((in + 127) / 128)));
    for (float& v : c.s) v = u(rng);
  } else {
    std::normal_distribution<float> nd(0, 1);
    std::vector<float> w(static_cast<size_t>(out * in));
    for (float& v : w) v = nd(rng);
    QuantizeFp8Blocks(w.data(), out, in, &c.q, &c.s);
  }
  PackRows(WeightFormat::kFp8, c.q.data(), out, in, c.packed.data());
  return c;
}

// want = want + part * scale, both rounded, with flush-to-zero and denormals-are-zero (the
// definition's mode); noinline, so that the mode brackets the arithmetic.
__attribute__((noinline)) void ScaleAndAdd(const float* part, float scale, int64_t n, float* want) {
  const unsigned saved = _mm_getcsr();
  _mm_setcsr(saved | 0x8040u);
  for (int64_t i = 0; i < n; ++i) {
    const float p = part[i] * scale;
    want[i] = want[i] + p;
  }
  _mm_setcsr(saved);
}

std::vector<float> Fp8A16Reference(const Fp8Case& c, const std::vector<float>& x, int64_t t) {
  const int64_t nb = (c.in + 127) / 128;
  std::vector<float> want(static_cast<size_t>(t * c.out), 0.0f);
  for (int64_t k0 = 0; k0 < c.in; k0 += 128) {
    const int64_t kb = std::min<int64_t>(128, c.in - k0);
    std::vector<uint16_t> wb(static_cast<size_t>(c.out * kb)), packed(wb.size());
    for (int64_t o = 0; o < c.out; ++o) {
      for (int64_t j = 0; j < kb; ++j) {
        const double v = Fp8Definition(c.q[static_cast<size_t>(o * c.in + k0 + j)]);
        wb[static_cast<size_t>(o * kb + j)] = FloatToBf16(static_cast<float>(v));
        EXPECT_EQ(static_cast<double>(Bf16ToFloat(wb[static_cast<size_t>(o * kb + j)])), v)
            << "not exact in bf16";
      }
    }
    PackRows(WeightFormat::kBf16, wb.data(), c.out, kb, packed.data());
    std::vector<float> part(static_cast<size_t>(t * c.out));
    LinearBf16A16(x.data() + k0, t, c.in, packed.data(), c.out, kb, part.data(), c.out);
    for (int64_t m = 0; m < t; ++m) {
      for (int64_t o = 0; o < c.out; ++o) {
        ScaleAndAdd(&part[static_cast<size_t>(m * c.out + o)],
                    c.s[static_cast<size_t>((o / 128) * nb + k0 / 128)], 1,
                    &want[static_cast<size_t>(m * c.out + o)]);
      }
    }
  }
  return want;
}

TEST(QLinear, Fp8A16IsTheBf16A16ProductsOfItsBlocks) {
  std::vector<Fp8Case> cases;
  for (auto [out, in] :
       {std::pair<int64_t, int64_t>{8, 8}, {64, 256}, {136, 200}, {296, 96}, {256, 1024}}) {
    cases.push_back(MakeFp8Case(out, in, false));
  }
  cases.push_back(MakeFp8Case(8, 256, true));
  cases.push_back(MakeFp8Case(16, 136, true));
  cases.push_back(MakeFp8Case(64, 256, false));
  // Tiny scales: block sums times scales land below the smallest normal float, where
  // flush-to-zero decides the bits of the scale step.
  for (float& v : cases.back().s) v *= 1e-36f;
  std::mt19937 rng(9);
  std::normal_distribution<float> nd(0, 1);
  const int top_dot = SetBf16DotIsaForTesting(-1), top_gemm = SetGemmIsaForTesting(-1);
  std::printf("bf16dot levels checked: 0..%d (2 = AVX512-BF16: the fused fp8 tile)\n", top_dot);
  for (size_t ci = 0; ci < cases.size(); ++ci) {
    const Fp8Case& c = cases[ci];  // (the last one's outputs are mostly subnormal or flushed)
    std::vector<float> x(static_cast<size_t>(17 * c.in));
    const bool tiny = ci + 1 == cases.size();
    for (float& v : x) v = nd(rng);
    std::vector<float> alone;
    for (int dot = 0; dot <= top_dot; ++dot) {
      for (int gemm = 0; gemm <= top_gemm; ++gemm) {
        for (int64_t t : {1, 3, 5, 9, 17}) {
          SetBf16DotIsaForTesting(-1);
          const std::vector<float> want = Fp8A16Reference(c, x, t);
          SetBf16DotIsaForTesting(dot);
          SetGemmIsaForTesting(gemm);
          SetBf16Activations(true);
          std::vector<float> got(static_cast<size_t>(t * c.out));
          LinearW(x.data(), t, c.ref(), got.data());
          SetBf16Activations(false);
          ASSERT_EQ(0, std::memcmp(want.data(), got.data(), 4 * want.size()))
              << "out " << c.out << " in " << c.in << " t " << t << " levels " << dot << "/"
              << gemm;
          if (t == 1 && dot == 0 && gemm == 0) alone = got;
          ASSERT_EQ(0, std::memcmp(alone.data(), got.data(), 4 * alone.size()))
              << "row 0 alone differs from row 0 of " << t;
        }
      }
    }
    SetBf16DotIsaForTesting(-1);
    SetGemmIsaForTesting(-1);
    // Close to the fp32-activation (W8A16) product: the activations' bf16 rounding only.
    std::vector<float> a16(static_cast<size_t>(17 * c.out)), a32(a16.size());
    SetBf16Activations(true);
    LinearW(x.data(), 17, c.ref(), a16.data());
    SetBf16Activations(false);
    LinearW(x.data(), 17, c.ref(), a32.data());
    double e2 = 0, r2 = 0;
    for (size_t i = 0; i < a16.size(); ++i) {
      e2 += (a16[i] - a32[i]) * (a16[i] - a32[i]);
      r2 += a32[i] * a32[i];
    }
    if (!tiny) {
      EXPECT_LE(std::sqrt(e2 / r2), 1e-2) << "out " << c.out << " in " << c.in;
      EXPECT_GT(std::sqrt(e2 / r2), 0.0) << "A16 was not taken";
    }
  }
}

TEST(QLinear, PortablePathsMatchFloat64Too) {
  ForcePortableKernelsForTesting(true);
  CheckLinear(WeightFormat::kInt8, 7, 13);
  CheckLinear(WeightFormat::kFp8, 130, 260);
  ForcePortableKernelsForTesting(false);
}

}  // namespace
}  // namespace dmoe::cpu
