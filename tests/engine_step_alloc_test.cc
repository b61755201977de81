// A decode step of the in-process engine (the attention node's loop, and `dmoe generate`) makes
// no call to operator new once warm: its scratch keeps its size from step to step, and every
// kernel pass over the pool holds its lambda in place (KernelPool::RunEach). Before, a step of the
// tiny model made ~38 (a std::function per pass, the gate's vectors per MoE layer).
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "attention_service/kv_cache.h"
#include "attention_service/local_model.h"
#include "gtest/gtest.h"
#include "kernels/cpu/mla.h"
#include "model/tiny_model.h"
#include "tests/counting_new.h"

namespace dmoe {
namespace {

// Each held dtype; f32 also with the attention's other decode paths forced (MLA test modes 1:
// a task per query, 3: the one-pass core), which the tiny model's 4 heads would not take here.
struct Case {
  WeightDType dtype;
  int attend_mode;
};
class EngineStep : public ::testing::TestWithParam<Case> {
 protected:
  void TearDown() override {  // (also after a failed ASSERT)
    StopCountingNew();
    cpu::SetMlaAttendModeForTesting(0);
  }
};

TEST_P(EngineStep, DecodeStepsAllocateNothingAfterWarmUp) {
  const char* tmp = std::getenv("TEST_TMPDIR");
  const std::string dir = std::string(tmp ? tmp : "/tmp") + "/step_alloc_model";
  const ModelConfig c = *PresetConfig("tiny");
  ASSERT_TRUE(WriteTinyModel(dir, c, TinyModelOptions()).ok());
  LocalModelOptions o;
  o.weight_dtype = GetParam().dtype;
  o.expert_dtype = GetParam().dtype;
  cpu::SetMlaAttendModeForTesting(GetParam().attend_mode);
  auto model = LocalModel::Load(dir, o);
  ASSERT_TRUE(model.ok()) << model.status();
  Engine& engine = (*model)->engine();
  LatentKvCache cache(c, 16, 64, cpu::KvDType::kF32);  // paged, as dmoe-attention holds it
  std::vector<std::unique_ptr<PagedKvSequence>> seqs;
  std::vector<SequenceStep> batch(2);
  for (int i = 0; i < 2; ++i) {
    seqs.push_back(std::make_unique<PagedKvSequence>(&cache));
    batch[static_cast<size_t>(i)].cache = seqs.back().get();
    batch[static_cast<size_t>(i)].tokens = {3 + i, 5, 7, 11};
  }
  std::vector<std::vector<float>> logits;
  ASSERT_TRUE(engine.Step(batch, &logits).ok());
  auto step = [&](int s) {
    for (int i = 0; i < 2; ++i) batch[static_cast<size_t>(i)].tokens.assign(1, (s * 13 + i) % 97);
    ASSERT_TRUE(engine.Step(batch, &logits).ok());
  };
  // Warm-up to 100 tokens of context. What grows with a sequence (its block table, the
  // attention's scratch) grows geometrically, so the steps from 100 to 127 tokens need no more
  // room: an allocation there is one made per step.
  for (int s = 0; s < 96; ++s) step(s);
  ASSERT_EQ(seqs[0]->length(), 100);
  // Three windows of 9 steps. A worker thread may take a kind of chunk for the first time in the
  // first (its thread_local scratch: once per thread, as chunks are claimed, not per step); the
  // last must allocate nothing.
  ASSERT_TRUE(CountingNewIsBound());
  uint64_t total = 0, last = 0;
  for (int window = 0; window < 3; ++window) {
    StartCountingNew();
    for (int s = 96 + 9 * window; s < 105 + 9 * window; ++s) step(s);
    last = StopCountingNew();
    total += last;
    std::printf("operator new calls during 9 decode steps of 2 sequences (window %d): %llu\n",
                window + 1, static_cast<unsigned long long>(last));
  }
  EXPECT_EQ(last, 0u);
  EXPECT_LE(total, 4u);
}

INSTANTIATE_TEST_SUITE_P(Dtypes, EngineStep,
                         ::testing::Values(Case{WeightDType::kAuto, 0}, Case{WeightDType::kAuto, 1},
                                           Case{WeightDType::kAuto, 3}, Case{WeightDType::kBf16, 0},
                                           Case{WeightDType::kInt8, 0}, Case{WeightDType::kFp8, 0}),
                         [](const ::testing::TestParamInfo<Case>& i) {
                           return std::string(WeightDTypeName(i.param.dtype)) + "_mode" +
                                  std::to_string(i.param.attend_mode);
                         });

}  // namespace
}  // namespace dmoe
