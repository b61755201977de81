// The GPU kernels against their kernels/cpu counterparts on the shapes of the tiny, tiny-v3 and
// small presets. Without a CUDA device every test but the probe's reports itself skipped, with the
// reason (scripts/gpu_check.sh runs them on a GPU machine).
#include "kernels/cuda/cuda_kernels.h"

#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/cpu/ops.h"
#include "model/kernel_params.h"
#include "model/tiny_model.h"

namespace dmoe::cuda {
namespace {

#define SKIP_WITHOUT_GPU()                              \
  do {                                                  \
    const DeviceProbe probe = Probe();                  \
    if (probe.count == 0) GTEST_SKIP() << probe.reason; \
  } while (0)

std::vector<float> Random(size_t n, uint32_t seed, float scale = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = d(rng);
  return v;
}

template <typename T>
DeviceBuffer ToDevice(const std::vector<T>& v) {
  auto b = DeviceBuffer::Alloc(v.size() * sizeof(T));
  EXPECT_TRUE(b.ok()) << b.status();
  EXPECT_TRUE(b->Upload(v.data(), v.size() * sizeof(T)).ok());
  return std::move(*b);
}

template <typename T>
std::vector<T> ToHost(const DeviceBuffer& b, size_t n) {
  std::vector<T> v(n);
  EXPECT_TRUE(Synchronize().ok());
  EXPECT_TRUE(b.Download(v.data(), n * sizeof(T)).ok());
  return v;
}

double MaxRelative(const std::vector<float>& got, const std::vector<float>& want) {
  double m = 0, scale = 1e-30;
  for (float x : want) scale = std::max(scale, static_cast<double>(std::fabs(x)));
  for (size_t i = 0; i < got.size(); ++i) m = std::max(m, std::fabs(double(got[i]) - want[i]));
  return m / scale;
}

TEST(CudaDevice, ProbeGivesDevicesOrTheReason) {
  const DeviceProbe p = Probe();
  if (p.count > 0) {
    EXPECT_FALSE(p.name.empty());
    std::printf("CUDA device 0: %s (%d devices)\n", p.name.c_str(), p.count);
  } else {
    EXPECT_NE(p.reason.find("no CUDA device"), std::string::npos) << p.reason;
    std::printf("%s\n", p.reason.c_str());
  }
}

TEST(CudaKernels, RmsNormAndSiluMulMatchTheCpu) {
  SKIP_WITHOUT_GPU();
  for (int64_t n : {256, 1024, 7168}) {
    const int64_t rows = 5;
    const auto x = Random(static_cast<size_t>(rows * n), 1), w = Random(static_cast<size_t>(n), 2);
    std::vector<float> want(x.size());
    cpu::RmsNorm(x.data(), rows, n, w.data(), 1e-6, want.data());
    DeviceBuffer dx = ToDevice(x), dw = ToDevice(w);
    auto dy = DeviceBuffer::Alloc(x.size() * 4);
    ASSERT_TRUE(dy.ok());
    ASSERT_TRUE(RmsNorm(dx.as<float>(), rows, n, dw.as<float>(), 1e-6, dy->as<float>()).ok());
    EXPECT_LE(MaxRelative(ToHost<float>(*dy, x.size()), want), 1e-5) << "n " << n;

    const auto u = Random(x.size(), 3);
    cpu::SiluMul(x.data(), u.data(), static_cast<int64_t>(x.size()), want.data());
    DeviceBuffer du = ToDevice(u);
    ASSERT_TRUE(
        SiluMul(dx.as<float>(), du.as<float>(), static_cast<int64_t>(x.size()), dy->as<float>())
            .ok());
    EXPECT_LE(MaxRelative(ToHost<float>(*dy, x.size()), want), 1e-5) << "n " << n;
  }
}

TEST(CudaKernels, EmbeddingRowsFp32AndBf16) {
  SKIP_WITHOUT_GPU();
  const int64_t v = 512, d = 256;
  const auto table = Random(static_cast<size_t>(v * d), 4);
  std::vector<uint16_t> half(table.size());
  for (size_t i = 0; i < table.size(); ++i) {
    uint32_t bits;
    std::memcpy(&bits, &table[i], 4);
    half[i] = static_cast<uint16_t>(bits >> 16);  // truncation: any bf16 bits will do
  }
  const std::vector<int32_t> ids = {0, 511, 7, 7, 300};
  DeviceBuffer dt = ToDevice(table), dh = ToDevice(half), di = ToDevice(ids);
  auto out = DeviceBuffer::Alloc(ids.size() * d * 4);
  ASSERT_TRUE(out.ok());
  for (bool bf16 : {false, true}) {
    ASSERT_TRUE(Embedding(bf16 ? dh.get() : dt.get(), bf16, d, di.as<int32_t>(),
                          static_cast<int64_t>(ids.size()), out->as<float>())
                    .ok());
    const std::vector<float> got = ToHost<float>(*out, ids.size() * d);
    for (size_t i = 0; i < ids.size(); ++i) {
      for (int64_t j = 0; j < d; ++j) {
        float want = table[static_cast<size_t>(ids[i] * d + j)];
        if (bf16) {
          const uint32_t bits = static_cast<uint32_t>(half[static_cast<size_t>(ids[i] * d + j)])
                                << 16;
          std::memcpy(&want, &bits, 4);
        }
        ASSERT_EQ(got[i * d + static_cast<size_t>(j)], want);
      }
    }
  }
}

TEST(CudaKernels, RopeMatchesTheCpuTableForEveryPreset) {
  SKIP_WITHOUT_GPU();
  for (const char* preset : {"tiny", "tiny-v3", "small"}) {
    const ModelConfig c = *PresetConfig(preset);
    const cpu::RopeTable host(RopeParamsOf(c));
    auto dev = RopeTable::Upload(host);
    ASSERT_TRUE(dev.ok()) << dev.status();
    // q-like rows [rows, heads, q_head_dim] with the rope part at offset nope.
    const int64_t rows = 7, heads = c.num_attention_heads, qd = c.q_head_dim();
    const int64_t dr = c.qk_rope_head_dim, nope = c.qk_nope_head_dim;
    const auto q = Random(static_cast<size_t>(rows * heads * qd), 5);
    std::vector<int32_t> pos = {0, 1, 2, 100, 511, 77, 300};
    std::vector<float> want = q;
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t h = 0; h < heads; ++h) {
        const float* x = q.data() + (r * heads + h) * qd + nope;
        host.Apply(x, pos[static_cast<size_t>(r)], want.data() + (r * heads + h) * qd + nope);
      }
    }
    DeviceBuffer dq = ToDevice(q), dp = ToDevice(pos);
    ASSERT_TRUE(dev->Apply(dq.as<float>() + nope, dp.as<int32_t>(), rows, heads, heads * qd, qd,
                           dq.as<float>() + nope)
                    .ok());
    EXPECT_LE(MaxRelative(ToHost<float>(dq, q.size()), want), 1e-5) << preset;
    (void)dr;
  }
}

TEST(CudaKernels, GateSelectionMatchesTheCpuForEveryMethod) {
  SKIP_WITHOUT_GPU();
  for (const char* preset : {"tiny", "tiny-lite", "tiny-v3", "small", "small-v3"}) {
    const ModelConfig c = *PresetConfig(preset);
    const cpu::GateParams p = GateParamsOf(c);
    const int64_t t = 200, e = c.n_routed_experts, k = c.num_experts_per_tok;
    const auto logits = Random(static_cast<size_t>(t * e), 6, 2.0f);
    const auto bias = Random(static_cast<size_t>(e), 7, 0.1f);
    std::vector<float> cpu_logits = logits, want_w(static_cast<size_t>(t * k));
    std::vector<int32_t> want_ids(static_cast<size_t>(t * k));
    cpu::SelectExperts(p, cpu_logits.data(), t, want_ids.data(), want_w.data(), bias.data());
    DeviceBuffer dl = ToDevice(logits), db = ToDevice(bias);
    auto ids = DeviceBuffer::Alloc(want_ids.size() * 4), w = DeviceBuffer::Alloc(want_w.size() * 4),
         scratch = DeviceBuffer::Alloc(logits.size() * 4);
    ASSERT_TRUE(ids.ok() && w.ok() && scratch.ok());
    ASSERT_TRUE(SelectExperts(p, dl.as<float>(), t, db.as<float>(), ids->as<int32_t>(),
                              w->as<float>(), scratch->as<float>())
                    .ok());
    EXPECT_EQ(ToHost<int32_t>(*ids, want_ids.size()), want_ids) << preset;
    EXPECT_LE(MaxRelative(ToHost<float>(*w, want_w.size()), want_w), 1e-5) << preset;
  }
}

TEST(CudaKernels, BadLaunchesAreErrorsNamingTheCall) {
  SKIP_WITHOUT_GPU();
  cpu::GateParams p;
  p.n_experts = 4096;  // above the kernel's limit
  p.top_k = 2;
  const absl::Status st = SelectExperts(p, nullptr, 1, nullptr, nullptr, nullptr, nullptr);
  EXPECT_FALSE(st.ok());
  EXPECT_NE(st.message().find("cuda_kernels.cc:"), absl::string_view::npos) << st;
}

}  // namespace
}  // namespace dmoe::cuda
