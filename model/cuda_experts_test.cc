// Routed experts on the device (CudaExperts behind LocalRoutedExperts) against the CPU's, on the
// tiny preset: whole MoE layers of 1..40 tokens, experts copied to the device on first use, and
// an expert the store does not hold. Built as cuda_experts_test (the GPU; skips, with the
// reason, without one) and cuda_experts_host_test (the host emulation of the kernel API).
#include "model/cuda_experts.h"

#include <cmath>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "model/safetensors.h"
#include "model/tiny_model.h"

namespace dmoe {
namespace {

TEST(CudaExperts, LayersMatchTheCpuExperts) {
  const cuda::DeviceProbe probe = cuda::Probe();
  if (probe.count == 0) GTEST_SKIP() << probe.reason;
  const char* tmp = std::getenv("TEST_TMPDIR");
  const std::string dir = std::string(tmp ? tmp : "/tmp") + "/cuda_experts_model";
  const ModelConfig c = *PresetConfig("tiny");
  ASSERT_TRUE(WriteTinyModel(dir, c, TinyModelOptions()).ok());
  auto ck = Checkpoint::Open(dir);
  ASSERT_TRUE(ck.ok());
  auto all = ExpertStore::AllExperts(c);
  all.pop_back();  // one expert the store does not hold
  auto store = ExpertStore::Load(**ck, c, all);
  ASSERT_TRUE(store.ok()) << store.status();
  auto gpu = CudaExperts::Create(c, 0);
  ASSERT_TRUE(gpu.ok()) << gpu.status();
  LocalRoutedExperts cpu_experts(c, store->get()), gpu_experts(c, store->get(), gpu->get());

  std::mt19937 rng(5);
  std::normal_distribution<float> nd;
  const int64_t d = c.hidden_size, k = c.num_experts_per_tok;
  const int64_t layer = c.first_k_dense_replace;
  for (int64_t t : {1, 3, 40}) {
    std::vector<float> x(static_cast<size_t>(t * d)), w(static_cast<size_t>(t * k));
    std::vector<int32_t> ids(static_cast<size_t>(t * k));
    for (float& v : x) v = nd(rng);
    for (int64_t i = 0; i < t * k; ++i) {
      ids[static_cast<size_t>(i)] =
          static_cast<int32_t>((i * 7 + t) % (c.n_routed_experts - 1));  // never the missing one
      w[static_cast<size_t>(i)] = 0.1f * static_cast<float>(i % k + 1);
    }
    std::vector<float> want(x.size(), 0.5f), got(x.size(), 0.5f);
    ASSERT_TRUE(cpu_experts.Begin(layer, x.data(), t, ids.data(), w.data(), k).ok());
    ASSERT_TRUE(cpu_experts.Finish(want.data()).ok());
    ASSERT_TRUE(gpu_experts.Begin(layer, x.data(), t, ids.data(), w.data(), k).ok());
    const absl::Status st = gpu_experts.Finish(got.data());
    ASSERT_TRUE(st.ok()) << st;
    double diff = 0, scale = 1e-30;
    for (size_t i = 0; i < want.size(); ++i) {
      ASSERT_TRUE(std::isfinite(got[i])) << i;
      diff = std::max(diff, std::fabs(double(got[i]) - want[i]));
      scale = std::max(scale, std::fabs(double(want[i])));
    }
    EXPECT_LE(diff / scale, 1e-5) << "t " << t;
  }
  // Only the experts used were copied: one layer's, at most n_routed_experts - 1 of them.
  EXPECT_GT((*gpu)->experts(), 0u);
  EXPECT_LT((*gpu)->experts(), static_cast<size_t>(c.n_routed_experts));

  // A new store without this layer's experts (a shard's placement changed): their device copies
  // are freed at the next call.
  std::vector<std::pair<int64_t, int64_t>> other;
  for (const auto& key : all) {
    if (key.first != layer) other.push_back(key);
  }
  auto smaller = ExpertStore::Load(**ck, c, other);
  ASSERT_TRUE(smaller.ok());
  LocalRoutedExperts moved(c, smaller->get(), gpu->get());
  const std::vector<float> one(static_cast<size_t>(d), 1.0f), w1 = {1.0f};
  const std::vector<int32_t> id0 = {0};
  std::vector<float> sink(static_cast<size_t>(d), 0.0f);
  ASSERT_TRUE(moved.Begin(c.num_hidden_layers - 1, one.data(), 1, id0.data(), w1.data(), 1).ok());
  ASSERT_TRUE(moved.Finish(sink.data()).ok());
  EXPECT_EQ((*gpu)->experts(), 1u);  // the old layer's copies went; the new expert came

  // Preload copies every expert of a store at once; running them copies nothing more.
  ASSERT_TRUE((*gpu)->Preload(**smaller).ok());
  EXPECT_EQ((*gpu)->experts(), other.size());
  const uint64_t preloaded = (*gpu)->device_bytes();
  ASSERT_TRUE(moved.Begin(c.num_hidden_layers - 1, one.data(), 1, id0.data(), w1.data(), 1).ok());
  ASSERT_TRUE(moved.Finish(sink.data()).ok());
  EXPECT_EQ((*gpu)->experts(), other.size());
  EXPECT_EQ((*gpu)->device_bytes(), preloaded);

  // The expert the store lacks: FAILED_PRECONDITION, naming it.
  const std::vector<float> x(static_cast<size_t>(d), 1.0f), w = {1.0f};
  const std::vector<int32_t> missing = {static_cast<int32_t>(c.n_routed_experts - 1)};
  std::vector<float> out(static_cast<size_t>(d), 0.0f);
  ASSERT_TRUE(
      gpu_experts.Begin(c.num_hidden_layers - 1, x.data(), 1, missing.data(), w.data(), 1).ok());
  const absl::Status st = gpu_experts.Finish(out.data());
  EXPECT_EQ(st.code(), absl::StatusCode::kFailedPrecondition) << st;
  EXPECT_NE(st.message().find("is not hosted here"), std::string::npos) << st;
}

}  // namespace
}  // namespace dmoe
