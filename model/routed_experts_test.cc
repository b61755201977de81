// In-process routed experts: FinishAfter (the caller's shared experts as one more task of the
// experts' pass over the kernel pool, where that balances) gives the bits of running them first
// and then Finish, for every row count and weight dtype, and runs the caller's work exactly once;
// FinishWithTail (the caller's pieces as the pass's last tasks) likewise.
#include "model/routed_experts.h"

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "common/dtype.h"
#include "gtest/gtest.h"
#include "kernels/cpu/thread_pool.h"
#include "model/safetensors.h"
#include "model/tiny_model.h"

namespace dmoe {
namespace {

TEST(LocalRoutedExperts, FinishAfterGivesTheBitsOfBesideThenFinish) {
  // Two cores: a row or two of the tiny preset (k = 4, 2 shared experts) takes the one-pass path,
  // more rows the other; both are checked, and which one ran.
  ASSERT_TRUE(cpu::SetKernelThreads(2));
  const ModelConfig c = *PresetConfig("tiny");
  const char* tmp = std::getenv("TEST_TMPDIR");
  const std::string dir = std::string(tmp ? tmp : "/tmp") + "/routed_experts_model";
  ASSERT_TRUE(WriteTinyModel(dir, c, TinyModelOptions()).ok());
  auto ck = Checkpoint::Open(dir);
  ASSERT_TRUE(ck.ok()) << ck.status();
  const int64_t d = c.hidden_size, k = c.num_experts_per_tok, layer = 1;
  std::mt19937 rng(3);
  std::normal_distribution<float> nd(0, 1);
  for (WeightDType dtype : {WeightDType::kF32, WeightDType::kInt8, WeightDType::kBf16}) {
    auto store = ExpertStore::Load(**ck, c, ExpertStore::AllExperts(c), dtype);
    ASSERT_TRUE(store.ok()) << store.status();
    LocalRoutedExperts experts(c, store->get());
    for (int64_t t : {1, 2, 3, 7}) {
      std::vector<float> x(static_cast<size_t>(t * d)), w(static_cast<size_t>(t * k));
      std::vector<int32_t> ids(static_cast<size_t>(t * k));
      for (float& v : x) v = nd(rng);
      for (float& v : w) v = std::fabs(nd(rng));
      for (int64_t i = 0; i < t * k; ++i) {
        ids[static_cast<size_t>(i)] = static_cast<int32_t>((i * 7 + t) % c.n_routed_experts);
      }
      // The caller's work: writes out (what the routed rows are added to), through a pool call
      // of its own (inline inside the experts' pass).
      int calls = 0;
      std::vector<float> want(x.size()), got(x.size(), 0.5f);
      auto beside = [&](std::vector<float>* out) {
        ++calls;
        const int64_t half = static_cast<int64_t>(out->size()) / 2;
        cpu::ThePool().Run(2, [&](int part) {
          const int64_t i0 = part * half, i1 = part == 0 ? half : static_cast<int64_t>(out->size());
          for (int64_t i = i0; i < i1; ++i) {
            (*out)[static_cast<size_t>(i)] = 0.25f * x[static_cast<size_t>(i)] - 1.0f;
          }
        });
      };
      const uint64_t in_pass = experts.beside_in_pass();
      ASSERT_TRUE(experts.Begin(layer, x.data(), t, ids.data(), w.data(), k).ok());
      beside(&want);
      ASSERT_TRUE(experts.Finish(want.data()).ok());
      ASSERT_TRUE(experts.Begin(layer, x.data(), t, ids.data(), w.data(), k).ok());
      const std::function<void()> fn = [&] { beside(&got); };
      ASSERT_TRUE(
          experts.FinishAfter(fn, static_cast<double>(c.n_shared_experts), got.data()).ok());
      EXPECT_EQ(calls, 2);
      // In the pass at 1 and 2 rows (2 shared * 2 cores <= t * 4 + 2), before it beyond a row per
      // core.
      EXPECT_EQ(experts.beside_in_pass() - in_pass, t <= 2 ? 1u : 0u) << "t " << t;
      EXPECT_EQ(0, std::memcmp(want.data(), got.data(), 4 * want.size()))
          << WeightDTypeName(dtype) << " t " << t;
    }
  }
}

TEST(LocalRoutedExperts, FinishWithTailGivesTheBitsOfTheTailThenFinish) {
  ASSERT_TRUE(cpu::SetKernelThreads(2));
  const ModelConfig c = *PresetConfig("tiny");
  const char* tmp = std::getenv("TEST_TMPDIR");
  const std::string dir = std::string(tmp ? tmp : "/tmp") + "/routed_experts_tail_model";
  ASSERT_TRUE(WriteTinyModel(dir, c, TinyModelOptions()).ok());
  auto ck = Checkpoint::Open(dir);
  ASSERT_TRUE(ck.ok()) << ck.status();
  const int64_t d = c.hidden_size, k = c.num_experts_per_tok, layer = 1;
  std::mt19937 rng(4);
  std::normal_distribution<float> nd(0, 1);
  auto store = ExpertStore::Load(**ck, c, ExpertStore::AllExperts(c), WeightDType::kInt8);
  ASSERT_TRUE(store.ok()) << store.status();
  LocalRoutedExperts experts(c, store->get());
  EXPECT_TRUE(experts.RunsOnKernelPool());
  for (int64_t t : {1, 2, 5}) {
    std::vector<float> x(static_cast<size_t>(t * d)), w(static_cast<size_t>(t * k));
    std::vector<int32_t> ids(static_cast<size_t>(t * k));
    for (float& v : x) v = nd(rng);
    for (float& v : w) v = std::fabs(nd(rng));
    for (int64_t i = 0; i < t * k; ++i) {
      ids[static_cast<size_t>(i)] = static_cast<int32_t>((i * 5 + t) % c.n_routed_experts);
    }
    // The tail: 3 pieces, each a third of out's values (written before the routed sum).
    const int pieces = 3;
    std::vector<int> runs(pieces, 0);
    std::vector<float> want(x.size()), got(x.size(), 0.5f);
    auto piece = [&](std::vector<float>* out, int i) {
      ++runs[static_cast<size_t>(i)];
      for (size_t j = static_cast<size_t>(i); j < out->size(); j += pieces) {
        (*out)[j] = 0.5f * x[j] + static_cast<float>(i);
      }
    };
    ASSERT_TRUE(experts.Begin(layer, x.data(), t, ids.data(), w.data(), k).ok());
    for (int i = 0; i < pieces; ++i) piece(&want, i);
    ASSERT_TRUE(experts.Finish(want.data()).ok());
    ASSERT_TRUE(experts.Begin(layer, x.data(), t, ids.data(), w.data(), k).ok());
    const std::function<void(int)> tail = [&](int i) { piece(&got, i); };
    const uint64_t in_pass = experts.tail_in_pass();
    ASSERT_TRUE(experts.FinishWithTail(tail, pieces, got.data()).ok());
    EXPECT_EQ(experts.tail_in_pass() - in_pass, 1u) << "t " << t;
    EXPECT_EQ(runs, std::vector<int>(pieces, 2)) << "t " << t;
    EXPECT_EQ(0, std::memcmp(want.data(), got.data(), 4 * want.size())) << "t " << t;
  }
}

// Find answers for exactly the hosted (layer, expert) pairs, also past the ends of its index and
// for negative keys; Merge's store finds the same weights (shared) under the same keys.
TEST(ExpertStore, FindAndMergeAnswerForExactlyTheirExperts) {
  const ModelConfig c = *PresetConfig("tiny");
  const char* tmp = std::getenv("TEST_TMPDIR");
  const std::string dir = std::string(tmp ? tmp : "/tmp") + "/routed_experts_find_model";
  ASSERT_TRUE(WriteTinyModel(dir, c, TinyModelOptions()).ok());
  auto ck = Checkpoint::Open(dir);
  ASSERT_TRUE(ck.ok()) << ck.status();
  const std::vector<std::pair<int64_t, int64_t>> all = ExpertStore::AllExperts(c);
  ASSERT_GE(all.size(), 4u);
  const auto first = all.front(), last = all.back();  // the largest layer and expert
  const std::pair<int64_t, int64_t> mid{first.first, 1};
  auto a = ExpertStore::Load(**ck, c, {first, mid}, WeightDType::kF32);
  auto b = ExpertStore::Load(**ck, c, {last}, WeightDType::kF32);
  ASSERT_TRUE(a.ok() && b.ok());
  const auto hosts = [&](const ExpertStore& s, std::set<std::pair<int64_t, int64_t>> want) {
    for (int64_t l = -1; l <= c.num_hidden_layers + 1; ++l) {
      for (int64_t e = -1; e <= c.n_routed_experts + 1; ++e) {
        EXPECT_EQ(want.count({l, e}) == 1, s.Find(l, e) != nullptr) << l << " " << e;
      }
    }
  };
  hosts(**a, {first, mid});
  hosts(**b, {last});
  hosts(ExpertStore(), {});
  EXPECT_NE((*a)->Find(first.first, first.second), (*a)->Find(mid.first, mid.second));
  const auto merged = (*a)->Merge({mid}, b->get());
  hosts(*merged, {mid, last});
  EXPECT_EQ(merged->Find(mid.first, mid.second), (*a)->Find(mid.first, mid.second));
  EXPECT_EQ(merged->Find(last.first, last.second), (*b)->Find(last.first, last.second));
}

}  // namespace
}  // namespace dmoe
