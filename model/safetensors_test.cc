#include "model/safetensors.h"

#include <sys/stat.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include "common/dtype.h"
#include "gtest/gtest.h"
#include "model/config.h"
#include "model/tiny_model.h"
#include "model/weights.h"

namespace dmoe {
namespace {

std::string TmpDir() {
  const char* d = std::getenv("TEST_TMPDIR");
  return d ? d : "/tmp";
}

// A safetensors file from a header text and a data region, written byte by byte.
std::string FileBytes(const std::string& header, const std::string& data,
                      int64_t len_override = -1) {
  std::string out(8, '\0');
  const uint64_t n = len_override >= 0 ? static_cast<uint64_t>(len_override) : header.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  return out + header + data;
}

absl::StatusOr<std::vector<TensorInfo>> Parse(const std::string& bytes) {
  return ParseSafetensorsHeader(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size());
}

std::string ErrorOf(const std::string& bytes) {
  auto r = Parse(bytes);
  if (r.ok()) return "";
  return std::string(r.status().message());
}

std::string WriteFile(const std::string& name, const std::string& bytes) {
  const std::string path = TmpDir() + "/" + name;
  std::ofstream(path, std::ios::binary) << bytes;
  return path;
}

TEST(SafetensorsHeader, ParsesAValidHeader) {
  const std::string data(4 * 6 + 2 * 3, '\x01');
  auto r = Parse(FileBytes(
      R"({"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]},)"
      R"("b":{"dtype":"BF16","shape":[3],"data_offsets":[24,30]}})",
      data));
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->size(), 2u);
  const TensorInfo& a = (*r)[0].name == "a" ? (*r)[0] : (*r)[1];
  EXPECT_EQ(a.shape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(a.nbytes, 24u);
}

TEST(SafetensorsHeader, RejectsEveryKindOfBadHeader) {
  struct Case {
    std::string bytes;
    const char* expect;
  };
  const std::string ok_entry = R"("t":{"dtype":"F32","shape":[2],"data_offsets":[0,8]})";
  const Case cases[] = {
      {"", "shorter than the 8-byte length"},
      {"\x05\x00\x00", "shorter than the 8-byte length"},
      {FileBytes("{}", "", 1000), "runs past the end of the file"},
      {FileBytes("{}", "", int64_t{1} << 40), "exceeds the limit"},
      {FileBytes("{\"t\":", ""), "not valid JSON"},
      {FileBytes("[1,2]", ""), "not a JSON object"},
      {FileBytes(R"({"t":5})", ""), "entry is not an object"},
      {FileBytes(R"({"t":{"dtype":"F64","shape":[1],"data_offsets":[0,8]}})", std::string(8, 0)),
       "unknown or unsupported dtype \"F64\""},
      {FileBytes(R"({"t":{"shape":[1],"data_offsets":[0,4]}})", std::string(4, 0)),
       "missing string field dtype"},
      {FileBytes(R"({"t":{"dtype":"F32","data_offsets":[0,4]}})", std::string(4, 0)),
       "missing array field shape"},
      {FileBytes(R"({"t":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}})", std::string(4, 0)),
       "not a non-negative integer"},
      {FileBytes(R"({"t":{"dtype":"F32","shape":[1099511627777],"data_offsets":[0,4]}})",
                 std::string(4, 0)),
       "shape is too large"},
      {FileBytes(R"({"t":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", std::string(8, 0)),
       "shape [3] x F32 is 12 bytes but data_offsets span 8"},
      {FileBytes(R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", std::string(4, 0)),
       "run past the data region of 4 bytes"},
      {FileBytes(R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}})", std::string(8, 0)),
       "are reversed"},
      {FileBytes(R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[0]}})", std::string(8, 0)),
       "data_offsets must be two"},
      {FileBytes("{" + ok_entry + R"(,"u":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                 std::string(12, 0)),
       "overlapping data_offsets"},
      {FileBytes(R"({"__metadata__":3})", ""), "__metadata__ is not an object"},
  };
  for (const Case& c : cases) {
    const std::string err = ErrorOf(c.bytes);
    EXPECT_NE(err.find(c.expect), std::string::npos)
        << "expected \"" << c.expect << "\", got \"" << err << "\"";
  }
}

TEST(SafetensorsFile, TruncatedFileIsRejectedWithItsPath) {
  const std::string good =
      FileBytes(R"({"t":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", std::string(16, 0));
  const std::string path = WriteFile("truncated.safetensors", good.substr(0, good.size() - 5));
  auto f = SafetensorsFile::Open(path);
  ASSERT_FALSE(f.ok());
  EXPECT_NE(std::string(f.status().message()).find(path), std::string::npos);
  EXPECT_NE(std::string(f.status().message()).find("run past the data region"), std::string::npos);
}

TEST(SafetensorsFile, EmptyAndMissingFiles) {
  EXPECT_FALSE(SafetensorsFile::Open(WriteFile("empty.safetensors", "")).ok());
  auto missing = SafetensorsFile::Open(TmpDir() + "/nope.safetensors");
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
}

// An independent bf16 rounding: of the two bf16 neighbours of x (truncated toward zero, and the
// next one away from zero), the nearer in exact (double) arithmetic; on a tie the one with an even
// last bit. NaN: any NaN with x's sign. It is the golden for the scalar FloatToBf16, which is the
// golden for the SIMD paths.
uint16_t NearestBf16(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  const uint32_t lo = bits & 0xffff0000u;
  if (std::isinf(x) || (bits & 0xffffu) == 0) return static_cast<uint16_t>(lo >> 16);
  const uint32_t hi = lo + 0x10000u;  // the next bf16 away from zero (may be +-inf)
  float lo_f, hi_f;
  std::memcpy(&lo_f, &lo, 4);
  std::memcpy(&hi_f, &hi, 4);
  // Beyond the largest finite value the upper neighbour is infinity: its "distance" is measured to
  // where it would be (2^128), as IEEE rounding does.
  const double hi_d = std::isinf(hi_f) ? std::copysign(std::ldexp(1.0, 128), x) : hi_f;
  const double dl = std::fabs(static_cast<double>(x) - lo_f), dh = std::fabs(hi_d - x);
  if (dl < dh) return static_cast<uint16_t>(lo >> 16);
  if (dh < dl) return static_cast<uint16_t>(hi >> 16);
  return static_cast<uint16_t>(((lo >> 16) & 1) == 0 ? lo >> 16 : hi >> 16);
}

TEST(DType, FloatToBf16MatchesAnIndependentRoundingEverywhere) {
  auto check = [](uint32_t bits) {
    float x;
    std::memcpy(&x, &bits, 4);
    const uint16_t got = FloatToBf16(x);
    if (std::isnan(x)) {
      ASSERT_TRUE(std::isnan(Bf16ToFloat(got))) << std::hex << bits;
      ASSERT_EQ(got >> 15, bits >> 31) << std::hex << bits;
      return;
    }
    ASSERT_EQ(got, NearestBf16(x)) << std::hex << bits;
  };
  // Every sign, exponent (zero, subnormal, normal, the largest, inf/NaN) and the mantissa patterns
  // that decide rounding: below, at and above the half, with even and odd last kept bits.
  for (uint32_t sign : {0u, 1u}) {
    for (uint32_t exp = 0; exp <= 0xff; ++exp) {
      for (uint32_t kept : {0u, 1u, 2u, 0x3fu, 0x7eu, 0x7fu}) {
        for (uint32_t low : {0u, 1u, 0x7fffu, 0x8000u, 0x8001u, 0xffffu}) {
          check(sign << 31 | exp << 23 | kept << 16 | low);
        }
      }
    }
  }
  // And a dense sweep of pseudo-random bit patterns.
  uint64_t s = 88172645463325252ull;
  for (int i = 0; i < 2000000; ++i) {
    s ^= s << 13;
    s ^= s >> 7;
    s ^= s << 17;
    check(static_cast<uint32_t>(s));
  }
  EXPECT_EQ(FloatToBf16(3.4028235e38f), 0x7f80);  // the largest float rounds up to infinity
  EXPECT_EQ(FloatToBf16(-0.0f), 0x8000);
  EXPECT_EQ(FloatToBf16(std::ldexp(1.0f, -149)), 0x0000);  // the smallest subnormal: to zero
}

TEST(DType, ConversionsAreExact) {
  EXPECT_EQ(Bf16ToFloat(0x3f80), 1.0f);
  EXPECT_EQ(FloatToBf16(1.0f), 0x3f80);
  // Round to nearest even: 1 + 2^-8 is a tie between 1 and 1 + 2^-7 -> 1.
  EXPECT_EQ(FloatToBf16(1.0f + 1.0f / 256), 0x3f80);
  EXPECT_EQ(FloatToBf16(1.0f + 3.0f / 256), 0x3f82);
  EXPECT_EQ(F16ToFloat(0x3c00), 1.0f);
  EXPECT_EQ(F16ToFloat(0xc000), -2.0f);
  EXPECT_EQ(F16ToFloat(0x0001), std::ldexp(1.0f, -24));
  EXPECT_EQ(F16ToFloat(0x7bff), 65504.0f);
  EXPECT_TRUE(std::isinf(F16ToFloat(0x7c00)));
  for (uint32_t h = 0; h < 0x7c00; h += 7) {
    EXPECT_EQ(FloatToF16(F16ToFloat(static_cast<uint16_t>(h))), h);
  }
}

class BulkBf16 : public ::testing::TestWithParam<int> {
 protected:
  void SetUp() override {
    if (SetBf16SimdForTesting(GetParam()) != GetParam()) {
      SetBf16SimdForTesting(-1);
      GTEST_SKIP() << "this CPU lacks SIMD level " << GetParam();
    }
  }
  void TearDown() override { SetBf16SimdForTesting(-1); }
};

INSTANTIATE_TEST_SUITE_P(Levels, BulkBf16, ::testing::Values(0, 1, 2, 3), [](const auto& info) {
  return std::string(info.param == 3   ? "avx512bf16"
                     : info.param == 2 ? "avx512"
                     : info.param == 1 ? "avx2"
                                       : "portable");
});

TEST_P(BulkBf16, ConversionsMatchTheScalarOnes) {
  // Every bf16 pattern back to float, and floats around rounding ties, NaN, inf and subnormals;
  // odd lengths so that the vector loops' tails run too.
  std::vector<uint16_t> all(65536);
  for (uint32_t i = 0; i < 65536; ++i) all[i] = static_cast<uint16_t>(i);
  std::vector<float> f(all.size());
  Bf16ToFloatN(all.data(), all.size(), f.data());
  for (uint32_t i = 0; i < 65536; ++i) {
    const float want = Bf16ToFloat(all[i]);
    ASSERT_EQ(std::memcmp(&f[i], &want, 4), 0) << i;
  }
  std::vector<float> src;
  for (uint32_t i = 0; i < 200000; ++i) {
    uint32_t bits = i * 2654435761u;
    if (i % 3 == 0) bits = (bits & 0xffff0000u) | 0x8000u;  // exact ties
    float v;
    std::memcpy(&v, &bits, 4);
    src.push_back(v);
  }
  src.push_back(NAN);
  src.push_back(-INFINITY);
  src.push_back(1e-40f);  // subnormal
  std::vector<uint16_t> got(src.size());
  FloatToBf16N(src.data(), src.size(), got.data());
  for (size_t i = 0; i < src.size(); ++i) ASSERT_EQ(got[i], FloatToBf16(src[i])) << i;
  std::vector<float> back(13);
  Bf16ToFloatN(all.data() + 3, back.size(), back.data());
  for (size_t i = 0; i < back.size(); ++i) EXPECT_EQ(back[i], Bf16ToFloat(all[3 + i])) << i;
}

class CheckpointTest : public ::testing::Test {
 protected:
  static std::string Make(const std::string& name, int shards) {
    const std::string dir = TmpDir() + "/" + name;
    TinyModelOptions o;
    o.seed = 3;
    o.shards = shards;
    EXPECT_TRUE(WriteTinyModel(dir, *PresetConfig("tiny"), o).ok());
    return dir;
  }
};

TEST_F(CheckpointTest, SelectiveLoadingReadsOnlyWhatIsAskedFor) {
  const std::string dir = Make("selective", 1);
  auto ck = Checkpoint::Open(dir);
  ASSERT_TRUE(ck.ok()) << ck.status();
  EXPECT_EQ((*ck)->bytes_read(), 0u);  // opening reads headers only
  const ModelConfig c = *PresetConfig("tiny");
  auto expert = LoadExpertWeights(**ck, c, 2, 5);
  ASSERT_TRUE(expert.ok()) << expert.status();
  // Exactly the three projections of one expert: 3 * 64 * 256 floats.
  EXPECT_EQ((*ck)->bytes_read(), 3u * 64 * 256 * 4);
  auto dense = LoadDenseWeights(**ck, c);
  ASSERT_TRUE(dense.ok());
  uint64_t expert_bytes = 0;
  for (const std::string& n : (*ck)->Names()) {
    if (n.find(".mlp.experts.") != std::string::npos) expert_bytes += (*ck)->Info(n)->nbytes;
  }
  uint64_t total = 0;
  for (const std::string& n : (*ck)->Names()) total += (*ck)->Info(n)->nbytes;
  // Dense loading touched everything except the routed experts (plus the one expert above).
  EXPECT_EQ((*ck)->bytes_read(), total - expert_bytes + 3u * 64 * 256 * 4);
}

TEST_F(CheckpointTest, ShardedCheckpointHoldsTheSameTensors) {
  const std::string one = Make("one", 1);
  const std::string three = Make("three", 3);
  auto a = Checkpoint::Open(one);
  auto b = Checkpoint::Open(three);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ((*b)->num_files(), 3u);
  EXPECT_EQ((*a)->Names(), (*b)->Names());
  const std::vector<int64_t> shape = {16, 256};
  EXPECT_EQ(*(*a)->ReadFloat("model.layers.3.mlp.gate.weight", shape),
            *(*b)->ReadFloat("model.layers.3.mlp.gate.weight", shape));
}

TEST_F(CheckpointTest, MissingTensorAndShapeMismatchNameTheTensor) {
  const std::string dir = Make("errors", 1);
  auto ck = Checkpoint::Open(dir);
  ASSERT_TRUE(ck.ok());
  auto missing = (*ck)->ReadFloat("model.layers.9.mlp.gate.weight", {16, 256});
  ASSERT_FALSE(missing.ok());
  EXPECT_NE(std::string(missing.status().message())
                .find("missing tensor \"model.layers.9.mlp.gate.weight\""),
            std::string::npos);
  auto shape = (*ck)->ReadFloat("model.norm.weight", {255});
  ASSERT_FALSE(shape.ok());
  EXPECT_NE(std::string(shape.status().message()).find("has shape [256], expected [255]"),
            std::string::npos);
}

// A load given up (set_cancel) fails CANCELLED at the next tensor, naming it; the tensors before
// it were read whole, and nothing is counted read past it.
TEST_F(CheckpointTest, ACancelledLoadStopsAtTheNextTensor) {
  const std::string dir = Make("cancel", 1);
  auto ck = Checkpoint::Open(dir);
  ASSERT_TRUE(ck.ok());
  const ModelConfig c = *PresetConfig("tiny");
  int asked = 0;
  (*ck)->set_cancel([&asked] { return ++asked > 4; });  // 4 tensors, then stop
  auto a = LoadExpertWeights(**ck, c, 2, 5);            // 3 tensors
  ASSERT_TRUE(a.ok()) << a.status();
  auto b = LoadExpertWeights(**ck, c, 2, 6);
  ASSERT_FALSE(b.ok());
  EXPECT_EQ(b.status().code(), absl::StatusCode::kCancelled);
  EXPECT_NE(std::string(b.status().message()).find("given up at \"model.layers.2.mlp.experts.6."),
            std::string::npos)
      << b.status();
  EXPECT_EQ((*ck)->bytes_read(), 4u * 64 * 256 * 4);  // expert 5 and one tensor of expert 6
  (*ck)->set_cancel(nullptr);
  EXPECT_TRUE(LoadExpertWeights(**ck, c, 2, 6).ok());
}

TEST_F(CheckpointTest, BadIndexFilesAreRejected) {
  const std::string dir = Make("badindex", 2);
  const std::string index = dir + "/model.safetensors.index.json";
  struct Case {
    std::string text;
    const char* expect;
  };
  const Case cases[] = {
      {"{not json", "not valid JSON"},
      {"{}", "missing object field weight_map"},
      {R"({"weight_map": {"model.norm.weight": 3}})", "is not a file name"},
      {R"({"weight_map": {"model.norm.weight": "../x.safetensors"}})", "bad file name"},
      {R"({"weight_map": {"model.norm.weight": "gone.safetensors"}})", "gone.safetensors"},
      {R"({"weight_map": {"no.such.tensor": "model-00001-of-00002.safetensors"}})",
       "does not hold it"},
  };
  for (const Case& c : cases) {
    std::ofstream(index) << c.text;
    auto ck = Checkpoint::Open(dir);
    ASSERT_FALSE(ck.ok()) << c.text;
    EXPECT_NE(std::string(ck.status().message()).find(c.expect), std::string::npos)
        << c.text << " gave " << ck.status();
  }
}

TEST_F(CheckpointTest, DirectoryWithoutWeights) {
  const std::string dir = TmpDir() + "/noweights";
  ::mkdir(dir.c_str(), 0755);
  auto ck = Checkpoint::Open(dir);
  ASSERT_FALSE(ck.ok());
  EXPECT_NE(std::string(ck.status().message()).find("no model.safetensors"), std::string::npos);
}

}  // namespace
}  // namespace dmoe
