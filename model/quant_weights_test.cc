// 8-bit weights at load: a DeepSeek-V3-style fp8 checkpoint (make-tiny-model --dtype fp8) holds
// the same weights as the fp32 one within fp8's precision; quantizing at load gives the bytes the
// formulas say; fp8 weights with missing, mis-shaped or bad scales are rejected naming the tensor.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "common/dtype.h"
#include "gtest/gtest.h"
#include "kernels/cpu/qlinear.h"
#include "model/routed_experts.h"
#include "model/safetensors.h"
#include "model/tiny_model.h"
#include "model/weights.h"
#include "nlohmann/json.hpp"

namespace dmoe {
namespace {

std::string Tmp(const std::string& name) {
  const char* d = std::getenv("TEST_TMPDIR");
  return std::string(d ? d : "/tmp") + "/" + name;
}

// Writes DIR/model.safetensors holding the given tensors (name -> dtype, shape, raw bytes).
struct Raw {
  std::string name, dtype;
  std::vector<int64_t> shape;
  std::string bytes;
};
std::string WriteCheckpoint(const std::string& name, const std::vector<Raw>& tensors) {
  const std::string dir = Tmp(name);
  std::system(("mkdir -p " + dir).c_str());
  nlohmann::json h = nlohmann::json::object();
  std::string data;
  for (const Raw& t : tensors) {
    h[t.name] = {{"dtype", t.dtype},
                 {"shape", t.shape},
                 {"data_offsets", {data.size(), data.size() + t.bytes.size()}}};
    data += t.bytes;
  }
  std::string text = h.dump();
  while (text.size() % 8) text.push_back(' ');
  std::string out(8, '\0');
  for (int b = 0; b < 8; ++b) out[b] = static_cast<char>((text.size() >> (8 * b)) & 0xff);
  std::FILE* f = std::fopen((dir + "/model.safetensors").c_str(), "wb");
  std::fwrite(out.data(), 1, 8, f);
  std::fwrite(text.data(), 1, text.size(), f);
  std::fwrite(data.data(), 1, data.size(), f);
  std::fclose(f);
  return dir;
}

std::string Floats(const std::vector<float>& v) {
  return std::string(reinterpret_cast<const char*>(v.data()), 4 * v.size());
}

TEST(QuantWeights, Fp8CheckpointHoldsTheFp32WeightsWithinFp8Precision) {
  const ModelConfig c = *PresetConfig("tiny");
  TinyModelOptions o;
  o.seed = 3;
  ASSERT_TRUE(WriteTinyModel(Tmp("q32"), c, o).ok());
  o.dtype = DType::kF8E4M3;
  ASSERT_TRUE(WriteTinyModel(Tmp("q8"), c, o).ok());
  auto ck32 = Checkpoint::Open(Tmp("q32"));
  auto ck8 = Checkpoint::Open(Tmp("q8"));
  ASSERT_TRUE(ck32.ok() && ck8.ok());
  // The file really is fp8 with block scales, like V3's.
  auto info = (*ck8)->Info(weight_names::Expert(1, 3, "down_proj"));
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->dtype, DType::kF8E4M3);
  EXPECT_TRUE((*ck8)->Info(weight_names::Expert(1, 3, "down_proj") + "_scale_inv").ok());
  auto m32 = LoadExpertWeights(**ck32, c, 1, 3, WeightDType::kF32);
  auto m8 = LoadExpertWeights(**ck8, c, 1, 3);  // auto: stays fp8
  ASSERT_TRUE(m32.ok() && m8.ok()) << m8.status();
  EXPECT_EQ(m8->down.format, cpu::WeightFormat::kFp8);
  for (const auto& [a, b] :
       {std::pair{&m32->gate, &m8->gate}, {&m32->up, &m8->up}, {&m32->down, &m8->down}}) {
    std::vector<float> deq(static_cast<size_t>(b->out * b->in));
    cpu::Dequantize(b->ref(), 0, b->out, deq.data());
    float amax = 0;
    for (float v : a->w) amax = std::max(amax, std::fabs(v));
    for (size_t i = 0; i < deq.size(); ++i) {
      // Relative 2^-4 (normals); tiny values: half a subnormal step of the block's scale.
      ASSERT_LE(std::fabs(deq[i] - a->w[i]),
                std::max(std::fabs(a->w[i]) / 16, amax / 448 * std::ldexp(1.0f, -10)) + 1e-9)
          << i;
    }
  }
  // The dense part: projections stay fp8 under auto; kv_b (fp8 here) is dequantized to fp32 and
  // the router gate (bf16 here, as in V3's checkpoints) stays bf16, both read by exact products.
  auto d8 = LoadDenseWeights(**ck8, c);
  ASSERT_TRUE(d8.ok()) << d8.status();
  EXPECT_EQ(d8->layers[1].o.format, cpu::WeightFormat::kFp8);
  EXPECT_EQ(d8->layers[1].kv_b.format, cpu::WeightFormat::kF32);
  EXPECT_EQ(d8->layers[1].gate.format, cpu::WeightFormat::kBf16);
  // And an fp8 checkpoint can be read as int8 or f32 too.
  auto as_int8 = LoadExpertWeights(**ck8, c, 1, 3, WeightDType::kInt8);
  ASSERT_TRUE(as_int8.ok());
  EXPECT_EQ(as_int8->gate.format, cpu::WeightFormat::kInt8);
}

TEST(QuantWeights, BytesHeldFollowTheFormulas) {
  const ModelConfig c = *PresetConfig("tiny");
  ASSERT_TRUE(WriteTinyModel(Tmp("qb"), c, TinyModelOptions()).ok());
  auto ck = Checkpoint::Open(Tmp("qb"));
  ASSERT_TRUE(ck.ok());
  const int64_t d = c.hidden_size, w = c.moe_intermediate_size;  // 256, 64
  const uint64_t params = 3 * static_cast<uint64_t>(d * w);
  const auto blocks = [](int64_t out, int64_t in) {
    return static_cast<uint64_t>((out + 127) / 128 * ((in + 127) / 128));
  };
  for (auto [dtype, want] : {std::pair{WeightDType::kF32, 4 * params},
                             // int8: a scale and a row sum (W8A8's correction) per row
                             {WeightDType::kInt8, params + 8 * static_cast<uint64_t>(w + w + d)},
                             {WeightDType::kBf16, 2 * params},
                             {WeightDType::kFp8, params + 4 * (blocks(w, d) * 2 + blocks(d, w))}}) {
    auto m = LoadExpertWeights(**ck, c, 2, 5, dtype);
    ASSERT_TRUE(m.ok());
    EXPECT_EQ(m->gate.bytes() + m->up.bytes() + m->down.bytes(), want);
  }
}

// Converting at load goes through an fp32 scratch as large as the largest matrix (lm_head: 0.8 GB
// for V2-Lite); once a load has returned, none of it stays resident.
TEST(QuantWeights, ConvertingLoadsLeaveNoScratchBehind) {
  const ModelConfig c = *PresetConfig("tiny");
  ASSERT_TRUE(WriteTinyModel(Tmp("scratch"), c, TinyModelOptions()).ok());
  auto ck = Checkpoint::Open(Tmp("scratch"));
  ASSERT_TRUE(ck.ok());
  auto one = LoadExpertWeights(**ck, c, 1, 2, WeightDType::kInt8);  // no release of its own
  ASSERT_TRUE(one.ok());
  EXPECT_GT(LoadScratchBytesForTesting(), 0u) << "the conversion went through the scratch";
  auto dense = LoadDenseWeights(**ck, c, WeightDType::kInt8);
  ASSERT_TRUE(dense.ok());
  EXPECT_EQ(0u, LoadScratchBytesForTesting());
  auto one_more = LoadExpertWeights(**ck, c, 1, 2, WeightDType::kBf16);
  ASSERT_TRUE(one_more.ok());
  auto experts = ExpertStore::Load(**ck, c, {{1, 0}, {2, 3}}, WeightDType::kFp8);
  ASSERT_TRUE(experts.ok());
  EXPECT_EQ(0u, LoadScratchBytesForTesting());
}

TEST(QuantWeights, BadScalesAreRejectedNamingTheTensor) {
  const std::string q(2 * 130, '\x38');  // fp8 1.0 everywhere
  auto error = [&](const std::vector<Raw>& tensors, const std::string& dir) {
    auto ck = Checkpoint::Open(WriteCheckpoint(dir, tensors));
    EXPECT_TRUE(ck.ok()) << ck.status();
    if (!ck.ok()) return std::string();
    auto l = ReadLinear(**ck, "w", 2, 130);
    EXPECT_FALSE(l.ok());
    return l.ok() ? std::string() : std::string(l.status().message());
  };
  std::string e = error({{"w", "F8_E4M3", {2, 130}, q}}, "noscale");
  EXPECT_NE(e.find("\"w_scale_inv\": missing"), std::string::npos) << e;
  e = error({{"w", "F8_E4M3", {2, 130}, q}, {"w_scale_inv", "F32", {1, 1}, Floats({1.0f})}},
            "badshape");
  EXPECT_NE(e.find("w_scale_inv\" has shape [1, 1], expected [1, 2]"), std::string::npos) << e;
  e = error({{"w", "F8_E4M3", {2, 130}, q}, {"w_scale_inv", "F32", {1, 2}, Floats({1.0f, 0.0f})}},
            "zeroscale");
  EXPECT_NE(e.find("w_scale_inv\": block scales must be finite and positive"), std::string::npos)
      << e;
  e = error({{"w", "F8_E4M3", {2, 129}, std::string(2 * 129, '\x38')}}, "badweight");
  EXPECT_NE(e.find("\"w\" has shape [2, 129], expected [2, 130]"), std::string::npos) << e;
  // A good one loads, and 1.0 x scale comes back.
  auto ck = Checkpoint::Open(WriteCheckpoint(
      "goodscale",
      {{"w", "F8_E4M3", {2, 130}, q}, {"w_scale_inv", "F32", {1, 2}, Floats({0.5f, 2.0f})}}));
  ASSERT_TRUE(ck.ok());
  auto l = ReadLinear(**ck, "w", 2, 130, WeightDType::kF32);
  ASSERT_TRUE(l.ok()) << l.status();
  EXPECT_EQ(l->w[0], 0.5f);
  EXPECT_EQ(l->w[129], 2.0f);
  // fp8 anywhere but a linear weight (no scales to apply) is refused, not misread.
  auto bad =
      Checkpoint::Open(WriteCheckpoint("fp8norm", {{"n", "F8_E4M3", {4}, "\x38\x38\x38\x38"}}));
  ASSERT_TRUE(bad.ok());
  auto n = (*bad)->ReadFloat("n", {4});
  ASSERT_FALSE(n.ok());
  EXPECT_NE(n.status().message().find("F8_E4M3"), absl::string_view::npos);
}

}  // namespace
}  // namespace dmoe
