// A bf16 checkpoint is held as bf16 (half the bytes of fp32) and gives the same logits, bit for
// bit, as the same checkpoint upcast to fp32 at load (--weight-dtype f32): the kernels widen each
// weight exactly and keep fp32's order of operations. Checked on the tiny preset through a whole
// engine step over a batch of prefills and decodes, for the dense part and for the experts.
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "attention_service/kv_cache.h"
#include "attention_service/local_model.h"
#include "gtest/gtest.h"
#include "model/tiny_model.h"

namespace dmoe {
namespace {

std::string WriteBf16Tiny() {
  const char* tmp = std::getenv("TEST_TMPDIR");
  const std::string dir = std::string(tmp ? tmp : "/tmp") + "/bf16_tiny";
  TinyModelOptions o;
  o.seed = 7;
  o.dtype = DType::kBF16;
  EXPECT_TRUE(WriteTinyModel(dir, *PresetConfig("tiny"), o).ok());
  return dir;
}

// Logits of 3 sequences: two prefills, then two decode steps of all three together.
std::vector<std::vector<float>> StepLogits(LocalModel& m) {
  const ModelConfig& c = m.config();
  std::vector<SequenceKvCache> caches;
  for (int i = 0; i < 3; ++i) caches.emplace_back(c);
  std::vector<SequenceStep> b(3);
  for (int i = 0; i < 3; ++i) {
    b[static_cast<size_t>(i)].cache = &caches[static_cast<size_t>(i)];
    for (int j = 0; j < 5 + 7 * i; ++j) {
      b[static_cast<size_t>(i)].tokens.push_back(static_cast<int32_t>(2 + (i * 37 + j * 11) % 250));
    }
  }
  std::vector<std::vector<float>> all, logits;
  for (int step = 0; step < 3; ++step) {
    EXPECT_TRUE(m.engine().Step(b, &logits).ok());
    for (size_t i = 0; i < b.size(); ++i) {
      all.push_back(logits[i]);
      b[i].tokens.assign(1, ArgMax(logits[i].data(), c.vocab_size));
    }
  }
  return all;
}

TEST(Bf16Weights, HeldAsBf16WithTheLogitsOfTheFp32Upcast) {
  const std::string dir = WriteBf16Tiny();
  LocalModelOptions as_stored, upcast;
  upcast.weight_dtype = WeightDType::kF32;
  upcast.expert_dtype = WeightDType::kF32;
  auto a = LocalModel::Load(dir, as_stored);
  auto f = LocalModel::Load(dir, upcast);
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_TRUE(f.ok()) << f.status();
  // What is held: the projections, experts, embeddings and lm_head in bf16; kv_b and the router
  // gate in fp32 (they are used as plain fp32 matrices).
  const DenseWeights& d = (*a)->dense();
  EXPECT_EQ(d.embed.format, cpu::WeightFormat::kBf16);
  EXPECT_EQ(d.lm_head.format, cpu::WeightFormat::kBf16);
  EXPECT_EQ(d.layers[1].q_a.format, cpu::WeightFormat::kBf16);
  EXPECT_EQ(d.layers[1].shared.down.format, cpu::WeightFormat::kBf16);
  EXPECT_EQ(d.layers[1].kv_b.format, cpu::WeightFormat::kF32);
  EXPECT_EQ(d.layers[1].gate.format, cpu::WeightFormat::kF32);
  EXPECT_EQ((*f)->dense().lm_head.format, cpu::WeightFormat::kF32);
  EXPECT_EQ(2 * (*a)->experts().bytes(), (*f)->experts().bytes());
  EXPECT_LT(static_cast<double>((*a)->weight_bytes()), 0.6 * (*f)->weight_bytes());

  const auto want = StepLogits(**f);
  const auto got = StepLogits(**a);
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < got.size(); ++i) {
    ASSERT_EQ(got[i].size(), want[i].size());
    EXPECT_EQ(0, std::memcmp(got[i].data(), want[i].data(), 4 * got[i].size())) << "row " << i;
  }
}

// The control: rounding an fp32 checkpoint to bf16 at load (--weight-dtype bf16) changes the
// logits, so the comparison above can fail.
TEST(Bf16Weights, RoundingFp32WeightsToBf16ChangesTheLogits) {
  const char* tmp = std::getenv("TEST_TMPDIR");
  const std::string dir = std::string(tmp ? tmp : "/tmp") + "/f32_tiny";
  TinyModelOptions o;
  o.seed = 7;
  ASSERT_TRUE(WriteTinyModel(dir, *PresetConfig("tiny"), o).ok());
  LocalModelOptions rounded;
  rounded.weight_dtype = WeightDType::kBf16;
  rounded.expert_dtype = WeightDType::kBf16;
  auto f = LocalModel::Load(dir, LocalModelOptions());
  auto r = LocalModel::Load(dir, rounded);
  ASSERT_TRUE(f.ok() && r.ok());
  EXPECT_EQ((*r)->dense().layers[1].o.format, cpu::WeightFormat::kBf16);
  const auto a = StepLogits(**f), b = StepLogits(**r);
  EXPECT_NE(0, std::memcmp(a[0].data(), b[0].data(), 4 * a[0].size()));
}

}  // namespace
}  // namespace dmoe
