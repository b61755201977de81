// 8-bit weights and the 8-bit latent KV cache, through the engine, against the float64 reference
// on the fp32 checkpoint (tests/reference): the logits' rms error relative to the logits' rms must
// stay under a bound per configuration. Prefill of 16 tokens, then 24 single-token decode steps
// reading the paged cache (so the 8-bit cache is read back by the attention kernel). The bound
// holds for the median over positions: a random router's near-ties (MODEL_SPEC.md) let 8-bit
// rounding flip an expert at a few positions, whose logits then move by ~30 % (tiny-v3's
// normalized-and-scaled V3 weights make routed experts weigh more than V2's); the rms over all
// positions is printed too. The bounds are about twice what this fixed model and prompt give
// (bench/quant_bench prints the same figures); a wrong scale, layout or rounding moves every
// position's error by an order of magnitude.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "attention_service/kv_cache.h"
#include "attention_service/local_model.h"
#include "gtest/gtest.h"
#include "model/tiny_model.h"
#include "tests/process_util.h"
#include "tests/reference/reference_model.h"

namespace dmoe {
namespace {

struct Case {
  const char* name;
  WeightDType weights;
  cpu::KvDType kv;
  double max_relative_rms;
  bool fp8_checkpoint = false;  // the same draws stored as DeepSeek-V3 ships them (fp8 blocks)
};

class QuantAccuracy : public ::testing::TestWithParam<std::string> {};

// tiny (V2 gating) and tiny-v3 (V3 gating, with the MTP layer loaded too).
TEST_P(QuantAccuracy, EightBitWeightsAndCacheStayCloseToFloat64) {
  const std::string dir = testing::TmpDir() + "/quant_" + GetParam();
  const std::string fp8_dir = dir + "_fp8";
  TinyModelOptions o;
  o.seed = 7;
  ASSERT_TRUE(WriteTinyModel(dir, *PresetConfig(GetParam()), o).ok());
  o.dtype = DType::kF8E4M3;
  ASSERT_TRUE(WriteTinyModel(fp8_dir, *PresetConfig(GetParam()), o).ok());
  std::vector<int32_t> tokens;
  for (int i = 0; i < 40; ++i) tokens.push_back((i * 37 + 11) % 512);
  constexpr size_t kPrefill = 16;
  reference::ReferenceModel ref(dir);
  const std::vector<double> want = ref.Forward(std::vector<int>(tokens.begin(), tokens.end()));
  const Case cases[] = {
      {"f32", WeightDType::kF32, cpu::KvDType::kF32, 1e-5},
      {"int8 weights", WeightDType::kInt8, cpu::KvDType::kF32, 0.08},
      {"fp8 weights", WeightDType::kFp8, cpu::KvDType::kF32, 0.25},
      {"bf16 cache", WeightDType::kF32, cpu::KvDType::kBf16, 0.01},
      {"int8 cache", WeightDType::kF32, cpu::KvDType::kInt8, 0.02},
      {"fp8 cache", WeightDType::kF32, cpu::KvDType::kFp8, 0.08},
      {"fp8 checkpoint", WeightDType::kAuto, cpu::KvDType::kF32, 0.25, true},
  };
  for (const Case& k : cases) {
    LocalModelOptions lo;
    lo.weight_dtype = k.weights;
    lo.expert_dtype = k.weights;
    auto model = LocalModel::Load(k.fp8_checkpoint ? fp8_dir : dir, lo);
    ASSERT_TRUE(model.ok()) << model.status();
    const ModelConfig& c = (*model)->config();
    const size_t v = static_cast<size_t>(c.vocab_size);
    LatentKvCache cache(c, 16, 8, k.kv);
    PagedKvSequence seq(&cache);
    std::vector<SequenceStep> batch(1);
    batch[0].cache = &seq;
    batch[0].tokens.assign(tokens.begin(), tokens.begin() + kPrefill);
    std::vector<std::vector<float>> logits;
    double err2 = 0, ref2 = 0;
    std::vector<double> per_position;
    for (size_t pos = kPrefill - 1; pos < tokens.size(); ++pos) {
      ASSERT_TRUE((*model)->engine().Step(batch, &logits).ok()) << k.name;
      double e2 = 0, r2 = 0;
      for (size_t i = 0; i < v; ++i) {
        const double r = want[pos * v + i];
        e2 += (logits[0][i] - r) * (logits[0][i] - r);
        r2 += r * r;
      }
      err2 += e2;
      ref2 += r2;
      per_position.push_back(std::sqrt(e2 / r2));
      if (pos + 1 < tokens.size()) batch[0].tokens = {tokens[pos + 1]};
    }
    const double relative = std::sqrt(err2 / ref2);
    std::nth_element(per_position.begin(), per_position.begin() + per_position.size() / 2,
                     per_position.end());
    const double median = per_position[per_position.size() / 2];
    std::printf(
        "[%s] %-14s rms |dlogit| / rms logit vs float64 = %.4f, median over positions "
        "%.4f (bound %.4g)\n",
        GetParam().c_str(), k.name, relative, median, k.max_relative_rms);
    EXPECT_LE(median, k.max_relative_rms) << k.name;
    // Not exact either (the 8-bit path is really taken): only fp32 may match to 1e-5.
    if (k.weights != WeightDType::kF32 || k.kv != cpu::KvDType::kF32) {
      EXPECT_GT(relative, 1e-4) << k.name << ": suspiciously exact";
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Presets, QuantAccuracy, ::testing::Values("tiny", "tiny-v3"),
                         [](const auto& info) {
                           return info.param == "tiny" ? std::string("tiny")
                                                       : std::string("tiny_v3");
                         });

}  // namespace
}  // namespace dmoe
