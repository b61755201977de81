// The GPU kernels against their kernels/cpu counterparts on the shapes of the tiny, tiny-v3 and
// small presets. Without a CUDA device every test but the probe's reports itself skipped, with the
// reason (scripts/gpu_check.sh runs them on a GPU machine).
#include "kernels/cuda/cuda_kernels.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "common/dtype.h"
#include "gtest/gtest.h"
#include "kernels/cpu/ops.h"
#include "kernels/cuda/expert_ffn.h"
#include "model/kernel_params.h"
#include "model/tiny_model.h"

namespace dmoe::cuda {
namespace {

// A call that must succeed; its status is printed when it does not.
#define CUDA_OK(expr)                              \
  do {                                             \
    const absl::Status _st = (expr);               \
    ASSERT_TRUE(_st.ok()) << #expr << ": " << _st; \
  } while (0)

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
  const absl::Status up = b->Upload(v.data(), v.size() * sizeof(T));
  EXPECT_TRUE(up.ok()) << up;
  return std::move(*b);
}

template <typename T>
std::vector<T> ToHost(const DeviceBuffer& b, size_t n) {
  std::vector<T> v(n);
  const absl::Status sync = Synchronize();  // a kernel's fault surfaces here
  EXPECT_TRUE(sync.ok()) << sync;
  const absl::Status down = b.Download(v.data(), n * sizeof(T));
  EXPECT_TRUE(down.ok()) << down;
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

// cuBLAS is dlopen'ed on first use (blas.cc), not linked: the library must be found then. Without
// a GPU its handle cannot be made, but the error is cuBLAS's own, not a missing library.
TEST(CudaDevice, CublasLoadsOnFirstUse) {
  auto blas = Blas::Create();
  if (blas.ok()) return;
  const std::string e(blas.status().message());
  std::printf("Blas::Create: %s\n", e.c_str());
  EXPECT_EQ(e.find("dlopen"), std::string::npos) << e;
  EXPECT_EQ(e.find("cuBLAS: no "), std::string::npos) << e;
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
    CUDA_OK(dy.status());
    CUDA_OK(RmsNorm(dx.as<float>(), rows, n, dw.as<float>(), 1e-6, dy->as<float>()));
    EXPECT_LE(MaxRelative(ToHost<float>(*dy, x.size()), want), 1e-5) << "n " << n;

    const auto u = Random(x.size(), 3);
    cpu::SiluMul(x.data(), u.data(), static_cast<int64_t>(x.size()), want.data());
    DeviceBuffer du = ToDevice(u);
    CUDA_OK(
        SiluMul(dx.as<float>(), du.as<float>(), static_cast<int64_t>(x.size()), dy->as<float>()));
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
  CUDA_OK(out.status());
  for (bool bf16 : {false, true}) {
    CUDA_OK(Embedding(bf16 ? dh.get() : dt.get(), bf16, d, di.as<int32_t>(),
                      static_cast<int64_t>(ids.size()), out->as<float>()));
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
    CUDA_OK(dev->Apply(dq.as<float>() + nope, dp.as<int32_t>(), rows, heads, heads * qd, qd,
                       dq.as<float>() + nope));
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
    CUDA_OK(SelectExperts(p, dl.as<float>(), t, db.as<float>(), ids->as<int32_t>(), w->as<float>(),
                          scratch->as<float>()));
    EXPECT_EQ(ToHost<int32_t>(*ids, want_ids.size()), want_ids) << preset;
    EXPECT_LE(MaxRelative(ToHost<float>(*w, want_w.size()), want_w), 1e-5) << preset;
  }
}

// A paged cache whose block tables are shuffled (non-contiguous), sequences of different lengths,
// fp32, bf16 and 8-bit rows, against cpu::MlaDecodeAbsorbedBatch on the tiny and small shapes.
// Besides the presets (groups of 8 heads, r <= 256), DeepSeek-V2's head shape with 20 heads: groups
// of 16 heads (the last one of 4) and r 512 (two columns a thread), as V2 / V3 run it.
TEST(CudaKernels, MlaDecodeOverAPagedCacheMatchesTheCpu) {
  SKIP_WITHOUT_GPU();
  for (const char* preset : {"tiny", "small", "v2-heads"}) {
    for (cpu::KvDType kv :
         {cpu::KvDType::kF32, cpu::KvDType::kInt8, cpu::KvDType::kFp8, cpu::KvDType::kBf16}) {
      const bool v2 = std::string(preset) == "v2-heads";
      const ModelConfig c = *PresetConfig(v2 ? "small" : preset);
      const int64_t h = v2 ? 20 : c.num_attention_heads, dn = v2 ? 128 : c.qk_nope_head_dim;
      const int64_t dr = v2 ? 64 : c.qk_rope_head_dim, dv = v2 ? 128 : c.v_head_dim;
      const int64_t r = v2 ? 512 : c.kv_lora_rank, bt = 16;
      const int64_t row_bytes = cpu::KvRowBytes(kv, r, dr);
      // 700 rows: several splits of the context, the last one's last tile short.
      const std::vector<int64_t> ctx = {1, 17, 64, 200, 33, 700};
      const int64_t b = static_cast<int64_t>(ctx.size()), max_ctx = 700, per_seq = 44;
      const int64_t blocks = b * per_seq;
      const auto rows_f = Random(static_cast<size_t>(blocks * bt * (r + dr)), 8);
      std::vector<uint8_t> pool(static_cast<size_t>(blocks * bt * row_bytes));
      for (int64_t i = 0; i < blocks * bt; ++i) {
        cpu::QuantizeKvRow(kv, rows_f.data() + i * (r + dr), r, dr, pool.data() + i * row_bytes);
      }
      const auto kv_b = Random(static_cast<size_t>(h * (dn + dv) * r), 9, 0.1f);
      const auto q = Random(static_cast<size_t>(b * h * (dn + dr)), 10);
      std::vector<int32_t> order(static_cast<size_t>(blocks));
      for (int64_t i = 0; i < blocks; ++i) order[static_cast<size_t>(i)] = static_cast<int32_t>(i);
      std::shuffle(order.begin(), order.end(), std::mt19937(11));
      std::vector<std::vector<const float*>> fblocks(static_cast<size_t>(b));
      std::vector<std::vector<const uint8_t*>> qblocks(static_cast<size_t>(b));
      std::vector<cpu::LatentRows> rows(static_cast<size_t>(b));
      for (int64_t i = 0; i < b; ++i) {
        for (int64_t j = 0; j < per_seq; ++j) {
          const uint8_t* blk =
              pool.data() + order[static_cast<size_t>(i * per_seq + j)] * bt * row_bytes;
          fblocks[static_cast<size_t>(i)].push_back(reinterpret_cast<const float*>(blk));
          qblocks[static_cast<size_t>(i)].push_back(blk);
        }
        cpu::LatentRows& lr = rows[static_cast<size_t>(i)];
        lr.block_tokens = bt;
        if (kv == cpu::KvDType::kF32) {
          lr.blocks = fblocks[static_cast<size_t>(i)].data();
        } else {
          lr.qblocks = qblocks[static_cast<size_t>(i)].data();
          lr.dtype = kv;
          lr.r = r;
          lr.dr = dr;
        }
      }
      cpu::MlaParams p;
      p.num_heads = h;
      p.nope_dim = dn;
      p.rope_dim = dr;
      p.v_dim = dv;
      p.latent_rank = r;
      p.softmax_scale = static_cast<float>(c.SoftmaxScale());
      p.kv_b = kv_b.data();
      std::vector<float> want(static_cast<size_t>(b * h * dv)), cpu_scratch;
      cpu::MlaDecodeAbsorbedBatch(p, q.data(), b, rows.data(), ctx.data(), want.data(),
                                  &cpu_scratch);

      DeviceBuffer dpool = ToDevice(pool), dkvb = ToDevice(kv_b), dq = ToDevice(q),
                   dtable = ToDevice(order);
      std::vector<int32_t> ctx32(ctx.begin(), ctx.end());
      DeviceBuffer dctx = ToDevice(ctx32);
      auto out = DeviceBuffer::Alloc(want.size() * 4);
      auto scratch =
          DeviceBuffer::Alloc(static_cast<size_t>(MlaDecodeScratchFloats(p, b, max_ctx)) * 4);
      ASSERT_TRUE(out.ok() && scratch.ok());
      PagedLatentCache cache;
      cache.pool = dpool.get();
      cache.dtype = kv;
      cache.block_tokens = bt;
      cache.block_bytes = bt * row_bytes;
      cache.table = dtable.as<int32_t>();
      cache.table_stride = per_seq;
      cache.ctx = dctx.as<int32_t>();
      cache.max_ctx = max_ctx;
      cpu::MlaParams dp = p;
      dp.kv_b = dkvb.as<float>();
      CUDA_OK(
          MlaDecodeAbsorbed(dp, dq.as<float>(), b, cache, out->as<float>(), scratch->as<float>()));
      const std::vector<float> got = ToHost<float>(*out, want.size());
      EXPECT_LE(MaxRelative(got, want), 1e-4) << preset << " " << cpu::KvDTypeName(kv);
      // A sequence alone gives the bits it gets in the batch (splits follow its own context).
      for (const int64_t i : {int64_t{3}, b - 1}) {
        PagedLatentCache one = cache;
        one.table = dtable.as<int32_t>() + i * per_seq;
        one.ctx = dctx.as<int32_t>() + i;
        auto o1 = DeviceBuffer::Alloc(static_cast<size_t>(h * dv) * 4);
        ASSERT_TRUE(o1.ok());
        CUDA_OK(MlaDecodeAbsorbed(dp, dq.as<float>() + i * h * (dn + dr), 1, one, o1->as<float>(),
                                  scratch->as<float>()));
        const std::vector<float> alone = ToHost<float>(*o1, static_cast<size_t>(h * dv));
        EXPECT_EQ(std::memcmp(alone.data(), got.data() + i * h * dv, alone.size() * 4), 0)
            << preset << " " << cpu::KvDTypeName(kv) << " sequence " << i;
      }
    }
  }
}

// Rows grouped by expert (some groups empty) through cuBLAS, against cpu::SwiGluMlp per group, on
// the tiny and small experts' shapes.
TEST(CudaKernels, ExpertFfnMatchesTheCpuPerGroup) {
  SKIP_WITHOUT_GPU();
  auto blas = Blas::Create();
  ASSERT_TRUE(blas.ok()) << blas.status();
  for (const char* preset : {"tiny", "small"}) {
    const ModelConfig c = *PresetConfig(preset);
    const int64_t d = c.hidden_size, width = c.moe_intermediate_size;
    const std::vector<int64_t> offsets = {0, 3, 3, 40, 41, 105};
    const size_t groups = offsets.size() - 1;
    const int64_t rows = offsets.back();
    const auto x = Random(static_cast<size_t>(rows * d), 12);
    std::vector<std::vector<float>> w(3 * groups);
    std::vector<DeviceBuffer> dw;
    std::vector<ExpertWeights> ew(groups);
    for (size_t g = 0; g < groups; ++g) {
      for (int m = 0; m < 3; ++m) {
        w[3 * g + m] = Random(static_cast<size_t>(d * width), 20 + 3 * static_cast<uint32_t>(g) + m,
                              1.0f / std::sqrt(static_cast<float>(m == 2 ? width : d)));
        dw.push_back(ToDevice(w[3 * g + m]));
      }
      ew[g] = {dw[3 * g].as<float>(), dw[3 * g + 1].as<float>(), dw[3 * g + 2].as<float>()};
    }
    std::vector<float> want(x.size()), cpu_scratch;
    for (size_t g = 0; g < groups; ++g) {
      const int64_t n = offsets[g + 1] - offsets[g];
      if (n == 0) continue;
      cpu::SwiGluMlp(x.data() + offsets[g] * d, n, d, w[3 * g].data(), w[3 * g + 1].data(),
                     w[3 * g + 2].data(), width, want.data() + offsets[g] * d, &cpu_scratch);
    }
    DeviceBuffer dx = ToDevice(x);
    auto y = DeviceBuffer::Alloc(x.size() * 4);
    auto scratch = DeviceBuffer::Alloc(static_cast<size_t>(2 * rows * width) * 4);
    ASSERT_TRUE(y.ok() && scratch.ok());
    CUDA_OK(ExpertFfn(*blas, ew, offsets, d, width, dx.as<float>(), y->as<float>(),
                      scratch->as<float>()));
    EXPECT_LE(MaxRelative(ToHost<float>(*y, x.size()), want), 1e-4) << preset;
  }
}

TEST(CudaKernels, BadLaunchesAreErrorsNamingTheCall) {
  SKIP_WITHOUT_GPU();
  cpu::GateParams p;
  p.n_experts = 4096;  // above the kernel's limit
  p.top_k = 2;
  const absl::Status st = cuda::SelectExperts(p, nullptr, 1, nullptr, nullptr, nullptr, nullptr);
  EXPECT_FALSE(st.ok());
  // The file and line of the call (cuda_kernels.cc, or host_kernels.cc in the host build).
  EXPECT_NE(st.message().find("_kernels.cc:"), absl::string_view::npos) << st;
  EXPECT_NE(st.message().find("SelectExperts"), absl::string_view::npos) << st;
}

// The GPU engine's pieces: strided RMSNorm and residual adds, latent rows stored into and
// gathered from a paged pool (the stored bytes equal cpu::QuantizeKvRow's), the causal softmax,
// and strided-batched GEMMs in both layouts of b.
TEST(CudaKernels, StridedRmsNormAndAdd) {
  SKIP_WITHOUT_GPU();
  const int64_t rows = 6, n = 512, ld = 576;
  const auto x = Random(static_cast<size_t>(rows * ld), 31), w = Random(static_cast<size_t>(n), 32);
  std::vector<float> want = x;
  cpu::RmsNorm(x.data(), rows, n, w.data(), 1e-6, want.data(), ld, ld);
  DeviceBuffer dx = ToDevice(x), dw = ToDevice(w);
  CUDA_OK(RmsNorm(dx.as<float>(), rows, n, ld, dw.as<float>(), 1e-6, dx.as<float>(), ld));
  EXPECT_LE(MaxRelative(ToHost<float>(dx, x.size()), want), 1e-5);
  const auto a = Random(x.size(), 33);
  DeviceBuffer da = ToDevice(a);
  for (size_t i = 0; i < want.size(); ++i) want[i] += a[i];
  CUDA_OK(Add(da.as<float>(), static_cast<int64_t>(a.size()), dx.as<float>()));
  EXPECT_LE(MaxRelative(ToHost<float>(dx, x.size()), want), 1e-5);
}

TEST(CudaKernels, LatentRowsStoreAndGatherAsTheCpuCache) {
  SKIP_WITHOUT_GPU();
  const ModelConfig c = *PresetConfig("small");
  cpu::MlaParams p;
  p.latent_rank = c.kv_lora_rank;
  p.rope_dim = c.qk_rope_head_dim;
  const int64_t lc = p.latent_rank + p.rope_dim, bt = 4, n = 11;
  for (cpu::KvDType t :
       {cpu::KvDType::kF32, cpu::KvDType::kInt8, cpu::KvDType::kFp8, cpu::KvDType::kBf16}) {
    const int64_t rb = cpu::KvRowBytes(t, p.latent_rank, p.rope_dim), bb = 2 * bt * rb;  // 2 layers
    const std::vector<int32_t> table = {5, 2, 7};  // non-contiguous blocks
    std::vector<int32_t> slots(n);
    for (int64_t u = 0; u < n; ++u) slots[u] = static_cast<int32_t>(table[u / bt] * bt + u % bt);
    const auto rows = Random(static_cast<size_t>(n * lc), 34, 2.0f);
    std::vector<uint8_t> want(static_cast<size_t>(8 * bb), 0);
    for (int64_t u = 0; u < n; ++u) {
      cpu::QuantizeKvRow(t, rows.data() + u * lc, p.latent_rank, p.rope_dim,
                         want.data() + table[u / bt] * bb + (u % bt) * rb);
    }
    DeviceBuffer pool = ToDevice(std::vector<uint8_t>(want.size(), 0));
    DeviceBuffer dr = ToDevice(rows), ds = ToDevice(slots), dt = ToDevice(table);
    LatentPool lp;
    lp.pool = pool.get();
    lp.dtype = t;
    lp.block_tokens = bt;
    lp.block_bytes = bb;
    CUDA_OK(StoreLatentRows(p, lp, dr.as<float>(), n, ds.as<int32_t>()));
    const std::vector<uint8_t> got = ToHost<uint8_t>(pool, want.size());
    EXPECT_EQ(std::memcmp(got.data(), want.data(), want.size()), 0) << cpu::KvDTypeName(t);
    std::vector<float> back(static_cast<size_t>(n * lc));
    for (int64_t u = 0; u < n; ++u) {
      cpu::DequantizeKvRows(t, want.data() + table[u / bt] * bb + (u % bt) * rb, 1, p.latent_rank,
                            p.rope_dim, back.data() + u * lc);
    }
    auto out = DeviceBuffer::Alloc(back.size() * 4);
    CUDA_OK(out.status());
    CUDA_OK(GatherLatentRows(p, lp, dt.as<int32_t>(), n, out->as<float>()));
    EXPECT_EQ(MaxRelative(ToHost<float>(*out, back.size()), back), 0.0) << cpu::KvDTypeName(t);
  }
}

TEST(CudaKernels, CausalSoftmaxMasksByPosition) {
  SKIP_WITHOUT_GPU();
  const int64_t heads = 3, m = 5, pos0 = 7, ctx = pos0 + m;
  const auto s = Random(static_cast<size_t>(heads * m * ctx), 35);
  std::vector<float> want = s;
  for (int64_t row = 0; row < heads * m; ++row) {
    float* r = want.data() + row * ctx;
    for (int64_t u = 0; u < ctx; ++u) {
      r[u] = u <= pos0 + row % m ? r[u] * 0.125f : -INFINITY;
    }
    cpu::SoftmaxRows(r, 1, ctx, ctx);
  }
  DeviceBuffer ds = ToDevice(s);
  CUDA_OK(CausalSoftmax(ds.as<float>(), heads, m, ctx, pos0, 0.125f));
  EXPECT_LE(MaxRelative(ToHost<float>(ds, s.size()), want), 1e-6);
}

TEST(CudaKernels, StridedBatchedGemmInBothLayouts) {
  SKIP_WITHOUT_GPU();
  auto blas = Blas::Create();
  ASSERT_TRUE(blas.ok()) << blas.status();
  const int64_t batch = 3, m = 5, n = 7, k = 9, lda = 3 * k, ldb = 2 * k, ldc = 4 * n;
  const auto a = Random(static_cast<size_t>(m * lda), 36);
  const auto b = Random(static_cast<size_t>(batch * n * ldb + batch * k * ldb), 37);
  for (int run = 0; run < 4; ++run) {
    const bool trans = run % 2 == 0;
    blas->set_cublas(run >= 2);  // the invariant GEMM, then cuBLAS
    const auto c0 = Random(static_cast<size_t>(m * ldc), 38);
    std::vector<float> want = c0;
    for (int64_t i = 0; i < batch; ++i) {
      for (int64_t r = 0; r < m; ++r) {
        for (int64_t j = 0; j < n; ++j) {
          double acc = 0;
          for (int64_t t = 0; t < k; ++t) {
            const float bv = trans ? b[i * k + j * ldb + t] : b[i * k + t * ldb + j];
            acc += static_cast<double>(a[r * lda + i * k + t]) * bv;
          }
          float& cv = want[r * ldc + i * n + j];
          cv = static_cast<float>(0.5 * acc + 2.0 * cv);
        }
      }
    }
    DeviceBuffer da = ToDevice(a), db = ToDevice(b), dc = ToDevice(c0);
    Gemm g;
    g.m = m;
    g.n = n;
    g.k = k;
    g.a = da.as<float>();
    g.lda = lda;
    g.stride_a = k;
    g.b = db.as<float>();
    g.ldb = ldb;
    g.stride_b = k;
    g.b_trans = trans;
    g.c = dc.as<float>();
    g.ldc = ldc;
    g.stride_c = n;
    g.batch = batch;
    g.alpha = 0.5f;
    g.beta = 2.0f;
    CUDA_OK(RunGemm(*blas, g));
    EXPECT_LE(MaxRelative(ToHost<float>(dc, want.size()), want), 1e-5)
        << "b_trans " << trans << ", cuBLAS " << blas->cublas();
  }
}

// One output of the invariant GEMM (launch.h's definition), computed here on the host: a chain
// of fused multiply-adds from +0 over each chunk of 512 k in order, the chunks' sums added in
// order, then alpha and beta.
float Chain(const float* a, const float* b, int64_t b_step, int64_t k, float alpha = 1.0f,
            float beta = 0.0f, float c = 0.0f) {
  constexpr int64_t kChunk = 512;
  float total = 0.0f;
  for (int64_t k0 = 0; k0 < k; k0 += kChunk) {
    float acc = 0.0f;
    for (int64_t u = k0; u < std::min(k, k0 + kChunk); ++u)
      acc = std::fma(a[u], b[u * b_step], acc);
    total = k0 == 0 ? acc : total + acc;
  }
  float v = alpha * total;
  if (beta != 0.0f) v = std::fma(beta, c, v);
  return v;
}

// Standing rule 1 at its root: every output of every product (plain, strided-batched, bf16,
// grouped) has the bits of its own chains, whatever the number of rows around it (1 to 80: both
// tile shapes, partial tiles, k of 3 chunks, the last not a multiple of the 64-deep stage), and
// whether its chunks ran in separate blocks (decode-sized products with few tiles: Linear up to
// 64 rows, the groups below) or one after another in one block (80 rows, strided-batched).
TEST(CudaKernels, InvariantGemmGivesEachOutputItsOwnChainsBitsWhateverTheRows) {
  SKIP_WITHOUT_GPU();
  auto blas = Blas::Create();
  ASSERT_TRUE(blas.ok()) << blas.status();
  const int64_t k = 1100, n = 150, rows = 80;
  const auto x = Random(static_cast<size_t>(rows * k), 51);
  const auto w = Random(static_cast<size_t>(n * k), 52, 0.05f);
  std::vector<uint16_t> wb(w.size());
  std::vector<float> wr(w.size()), xr(x.size());  // the bf16 values, as floats
  for (size_t i = 0; i < w.size(); ++i) wr[i] = Bf16ToFloat(wb[i] = FloatToBf16(w[i]));
  for (size_t i = 0; i < x.size(); ++i) xr[i] = Bf16ToFloat(FloatToBf16(x[i]));
  DeviceBuffer dx = ToDevice(x), dw = ToDevice(w), dwb = ToDevice(wb);
  auto dy = DeviceBuffer::Alloc(static_cast<size_t>(rows * n) * 4);
  CUDA_OK(dy.status());
  const std::vector<float> poison(static_cast<size_t>(rows * n), std::nanf(""));
  for (int64_t m : {1, 3, 16, 17, 80}) {
    for (bool bf16 : {false, true}) {
      const DeviceWeight dwt{bf16 ? dwb.get() : dw.get(), bf16};
      CUDA_OK(dy->Upload(poison.data(), poison.size() * 4));  // an unwritten output shows
      CUDA_OK(Linear(*blas, dx.as<float>(), m, dwt, n, k, dy->as<float>()));
      const std::vector<float> got = ToHost<float>(*dy, static_cast<size_t>(m * n));
      const std::vector<float>& a = bf16 ? xr : x;
      const std::vector<float>& b = bf16 ? wr : w;
      int64_t differ = 0;
      for (int64_t r = 0; r < m; ++r) {
        for (int64_t o = 0; o < n; ++o) {
          const float want = Chain(&a[r * k], &b[o * k], 1, k);
          differ += std::memcmp(&got[r * n + o], &want, 4) != 0;
        }
      }
      EXPECT_EQ(differ, 0) << "m " << m << (bf16 ? ", bf16" : ", fp32");
    }
  }
  // Grouped, fp32 and bf16: groups of 0, 1, 5, 17 and 40 rows (the square tile; empty and short
  // groups) and of 1, 3 and 16 (the short tile), each with its own weights (w shifted).
  for (const std::vector<int64_t>& sizes :
       {std::vector<int64_t>{0, 1, 5, 17, 40}, std::vector<int64_t>{1, 3, 16}}) {
    for (bool bf16 : {false, true}) {
      auto xb = DeviceBuffer::Alloc(x.size() * 2);
      CUDA_OK(xb.status());
      CUDA_OK(ToBf16(dx.as<float>(), static_cast<int64_t>(x.size()), xb->as<uint16_t>()));
      GroupedGemm g;
      g.n = n - 10;
      g.k = k;
      g.bf16 = bf16;
      int64_t row = 0;
      for (size_t i = 0; i < sizes.size(); ++i) {
        const int64_t wi = static_cast<int64_t>(i) * k;  // rows i .. i + n - 11 of w
        g.m.push_back(sizes[i]);
        g.a.push_back(bf16 ? static_cast<const void*>(xb->as<uint16_t>() + row * k)
                           : dx.as<float>() + row * k);
        g.b.push_back(bf16 ? static_cast<const void*>(dwb.as<uint16_t>() + wi)
                           : dw.as<float>() + wi);
        g.c.push_back(dy->as<float>() + row * g.n);
        row += sizes[i];
      }
      CUDA_OK(RunGemmGrouped(*blas, g));
      const std::vector<float> got = ToHost<float>(*dy, static_cast<size_t>(row * g.n));
      const std::vector<float>& a = bf16 ? xr : x;
      const std::vector<float>& b = bf16 ? wr : w;
      int64_t differ = 0;
      row = 0;
      for (size_t i = 0; i < sizes.size(); ++i) {
        for (int64_t r = row; r < row + sizes[i]; ++r) {
          for (int64_t o = 0; o < g.n; ++o) {
            const float want = Chain(&a[r * k], &b[(static_cast<int64_t>(i) + o) * k], 1, k);
            differ += std::memcmp(&got[r * g.n + o], &want, 4) != 0;
          }
        }
        row += sizes[i];
      }
      EXPECT_EQ(differ, 0) << "grouped, " << sizes.size() << " groups" << (bf16 ? ", bf16" : "");
    }
  }
  // b [k, n] with alpha and beta (P @ V in prefill attention): two problems strided-batched
  // (their chunks in one block each) and one alone (its chunks in blocks of their own when k has
  // several), at k on and around the chunk edges (0 too: alpha * +0 + beta * c).
  for (const int64_t kk : {0, 1, 512, 513, 600, 1024}) {
    for (const int64_t batch : {2, 1}) {
      const int64_t m = 19, nn = 70;
      const auto p = Random(static_cast<size_t>(batch * m * std::max<int64_t>(kk, 1)), 53);
      const auto v = Random(static_cast<size_t>(batch * std::max<int64_t>(kk, 1) * nn), 54);
      const auto c0 = Random(static_cast<size_t>(batch * m * nn), 55);
      DeviceBuffer dp = ToDevice(p), dv = ToDevice(v), dc = ToDevice(c0);
      Gemm s;
      s.m = m;
      s.n = nn;
      s.k = kk;
      s.a = dp.as<float>();
      s.lda = std::max<int64_t>(kk, 1);
      s.stride_a = m * s.lda;
      s.b = dv.as<float>();
      s.ldb = nn;
      s.stride_b = s.lda * nn;
      s.b_trans = false;
      s.c = dc.as<float>();
      s.ldc = nn;
      s.stride_c = m * nn;
      s.batch = batch;
      s.alpha = 0.3f;
      s.beta = 1.0f;
      CUDA_OK(RunGemm(*blas, s));
      const std::vector<float> sc = ToHost<float>(dc, c0.size());
      int64_t differ = 0;
      for (int64_t z = 0; z < batch; ++z) {
        for (int64_t r = 0; r < m; ++r) {
          for (int64_t o = 0; o < nn; ++o) {
            const int64_t at = z * m * nn + r * nn + o;
            const float want = Chain(&p[z * s.stride_a + r * s.lda], &v[z * s.stride_b + o], nn, kk,
                                     0.3f, 1.0f, c0[static_cast<size_t>(at)]);
            differ += std::memcmp(&sc[static_cast<size_t>(at)], &want, 4) != 0;
          }
        }
      }
      EXPECT_EQ(differ, 0) << "k " << kk << ", batch " << batch;
    }
  }
}

// bf16 products: the activations rounded to bf16 (RNE, as FloatToBf16), the products summed in
// fp32; against the same sums in double over the rounded values.
TEST(CudaKernels, Bf16LinearRoundsTheActivations) {
  SKIP_WITHOUT_GPU();
  auto blas = Blas::Create();
  ASSERT_TRUE(blas.ok()) << blas.status();
  const int64_t m = 7, in = 320, out = 96;
  const auto x = Random(static_cast<size_t>(m * in), 41);
  const auto wf = Random(static_cast<size_t>(out * in), 42, 0.05f);
  std::vector<uint16_t> w(wf.size());
  for (size_t i = 0; i < wf.size(); ++i) w[i] = FloatToBf16(wf[i]);
  std::vector<float> want(static_cast<size_t>(m * out));
  for (int64_t r = 0; r < m; ++r) {
    for (int64_t o = 0; o < out; ++o) {
      double acc = 0;
      for (int64_t k = 0; k < in; ++k) {
        acc += static_cast<double>(Bf16ToFloat(FloatToBf16(x[r * in + k]))) *
               Bf16ToFloat(w[o * in + k]);
      }
      want[r * out + o] = static_cast<float>(acc);
    }
  }
  DeviceBuffer dx = ToDevice(x), dw = ToDevice(w);
  auto dy = DeviceBuffer::Alloc(want.size() * 4);
  CUDA_OK(dy.status());
  CUDA_OK(Linear(*blas, dx.as<float>(), m, DeviceWeight{dw.get(), true}, out, in, dy->as<float>()));
  EXPECT_LE(MaxRelative(ToHost<float>(*dy, want.size()), want), 1e-5);
  auto db = DeviceBuffer::Alloc(x.size() * 2);
  CUDA_OK(db.status());
  CUDA_OK(ToBf16(dx.as<float>(), static_cast<int64_t>(x.size()), db->as<uint16_t>()));
  const std::vector<uint16_t> bits = ToHost<uint16_t>(*db, x.size());
  for (size_t i = 0; i < x.size(); ++i) ASSERT_EQ(bits[i], FloatToBf16(x[i])) << i;
}

}  // namespace
}  // namespace dmoe::cuda
