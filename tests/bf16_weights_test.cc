// A bf16 checkpoint is held as bf16 (half the bytes of fp32) and gives the same logits, bit for
// bit, as the same checkpoint upcast to fp32 at load (--weight-dtype f32): the kernels widen each
// weight exactly and keep fp32's order of operations. Checked on the tiny preset through a whole
// engine step over a batch of prefills and decodes, for the dense part and for the experts.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "attention_service/kv_cache.h"
#include "attention_service/local_model.h"
#include "gtest/gtest.h"
#include "kernels/cpu/bf16dot.h"
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

// Logits of n sequences (3: a prefill each, then two decode steps of all of them together; the
// rows are step-major: step 0's n rows, then step 1's, ...).
std::vector<std::vector<float>> StepLogits(LocalModel& m, int n = 3) {
  const ModelConfig& c = m.config();
  std::vector<SequenceKvCache> caches;
  for (int i = 0; i < n; ++i) caches.emplace_back(c);
  std::vector<SequenceStep> b(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) {
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
  // What is held: the projections, experts, embeddings and lm_head in bf16, kv_b and the router
  // gate too (row-major: the fp32 products widen them exactly); all fp32 when f32 is asked for.
  const DenseWeights& d = (*a)->dense();
  EXPECT_EQ(d.embed.format, cpu::WeightFormat::kBf16);
  EXPECT_EQ(d.lm_head.format, cpu::WeightFormat::kBf16);
  EXPECT_EQ(d.layers[1].q_a.format, cpu::WeightFormat::kBf16);
  EXPECT_EQ(d.layers[1].shared.down.format, cpu::WeightFormat::kBf16);
  EXPECT_EQ(d.layers[1].kv_b.format, cpu::WeightFormat::kBf16);
  EXPECT_FALSE(d.layers[1].kv_b.packed);
  EXPECT_EQ(d.layers[1].gate.format, cpu::WeightFormat::kBf16);
  EXPECT_EQ((*f)->dense().lm_head.format, cpu::WeightFormat::kF32);
  EXPECT_EQ((*f)->dense().layers[1].kv_b.format, cpu::WeightFormat::kF32);
  EXPECT_EQ((*f)->dense().layers[1].gate.format, cpu::WeightFormat::kF32);
  EXPECT_EQ(2 * d.layers[1].kv_b.bytes(), (*f)->dense().layers[1].kv_b.bytes());
  EXPECT_EQ(2 * d.layers[1].gate.bytes(), (*f)->dense().layers[1].gate.bytes());
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

// bf16 activations (A16, kernels/cpu/bf16dot.h): the logits move a little away from the exact
// upcast (rms of the difference within 2 % of the logits' spread; MODEL_SPEC allows ~1 % for bf16
// weights alone), and a sequence's logits stay the same bits alone and inside a batch.
TEST(Bf16Weights, Bf16ActivationsStayCloseAndBatchInvariant) {
  const std::string dir = WriteBf16Tiny();
  LocalModelOptions upcast;
  upcast.weight_dtype = WeightDType::kF32;
  upcast.expert_dtype = WeightDType::kF32;
  auto a = LocalModel::Load(dir, LocalModelOptions());
  auto f = LocalModel::Load(dir, upcast);
  ASSERT_TRUE(a.ok() && f.ok());
  const auto want = StepLogits(**f);
  cpu::SetBf16Activations(true);
  const auto got = StepLogits(**a);
  const auto alone = StepLogits(**a, 1);
  cpu::SetBf16Activations(false);
  double diff2 = 0, spread2 = 0;
  size_t count = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    double mean = 0;
    for (float v : want[i]) mean += v;
    mean /= static_cast<double>(want[i].size());
    for (size_t j = 0; j < got[i].size(); ++j) {
      diff2 += (got[i][j] - want[i][j]) * static_cast<double>(got[i][j] - want[i][j]);
      spread2 += (want[i][j] - mean) * (want[i][j] - mean);
      ++count;
    }
  }
  const double rel = std::sqrt(diff2 / spread2);
  std::printf("A16 vs fp32 upcast: rms(delta logit) / std(logit) = %.4f over %zu logits\n", rel,
              count);
  EXPECT_GT(rel, 0.0);  // A16 was in use
  EXPECT_LT(rel, 0.02);
  ASSERT_EQ(alone.size(), 3u);
  for (size_t step = 0; step < alone.size(); ++step) {
    EXPECT_EQ(0, std::memcmp(alone[step].data(), got[3 * step].data(), 4 * alone[step].size()))
        << "step " << step;
  }
}

// fp8 weights under A16 too (each 128-column block's e4m3 values exactly in bf16, bf16dot.h):
// close to fp8 with fp32 activations, and a sequence's logits the same bits alone and in a batch.
TEST(Bf16Weights, Fp8WeightsUnderA16StayCloseAndBatchInvariant) {
  const std::string dir = WriteBf16Tiny();
  LocalModelOptions fp8;
  fp8.weight_dtype = WeightDType::kFp8;
  fp8.expert_dtype = WeightDType::kFp8;
  auto m = LocalModel::Load(dir, fp8);
  ASSERT_TRUE(m.ok()) << m.status();
  const auto want = StepLogits(**m);
  cpu::SetBf16Activations(true);
  const auto got = StepLogits(**m);
  const auto alone = StepLogits(**m, 1);
  cpu::SetBf16Activations(false);
  double diff2 = 0, spread2 = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    double mean = 0;
    for (float v : want[i]) mean += v;
    mean /= static_cast<double>(want[i].size());
    for (size_t j = 0; j < got[i].size(); ++j) {
      diff2 += (got[i][j] - want[i][j]) * static_cast<double>(got[i][j] - want[i][j]);
      spread2 += (want[i][j] - mean) * (want[i][j] - mean);
    }
  }
  const double rel = std::sqrt(diff2 / spread2);
  std::printf("fp8 A16 vs fp8 W8A16: rms(delta logit) / std(logit) = %.4f\n", rel);
  EXPECT_GT(rel, 0.0);  // A16 was in use
  EXPECT_LT(rel, 0.02);
  ASSERT_EQ(alone.size(), 3u);
  for (size_t step = 0; step < alone.size(); ++step) {
    EXPECT_EQ(0, std::memcmp(alone[step].data(), got[3 * step].data(), 4 * alone[step].size()))
        << "step " << step;
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
