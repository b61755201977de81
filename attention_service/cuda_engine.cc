#include "attention_service/cuda_engine.h"

#include <algorithm>
#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "model/cuda_experts.h"
#include "model/kernel_params.h"

namespace dmoe {

namespace {
constexpr double kLatentNormEps = 1e-6;  // as Engine: the q_a / kv_a layernorms
}  // namespace

// One decoder layer's tensors in device memory (fp32), null where the model has none.
// The projections fp32, or bf16 where the host holds them as bf16 (CudaEngineOptions::keep_bf16);
// kv_b (read by the attention kernels) and the router are uploaded as fp32 (the CPU holds them as
// the checkpoint's bf16 where it is bf16 and reads them through exact fp32 products).
struct CudaEngine::DeviceLayer {
  const float *input_norm = nullptr, *post_norm = nullptr, *q_a_norm = nullptr;
  cuda::DeviceWeight q_a, q_b, q, kv_a, o;
  const float *kv_a_norm = nullptr, *kv_b = nullptr;
  bool moe = false;
  const float *gate = nullptr, *gate_bias = nullptr;  // moe: the router
  cuda::DeviceWeight mlp_gate, mlp_up, mlp_down;      // dense MLP
  cuda::DeviceWeight shared_gate, shared_up, shared_down;
};

// Where one step's rows go. Inside the engine the rows that attend in the absorbed form come first
// (every sequence's, in batch order; with naive_prefill only the single-token ones), so that their
// queries are contiguous for the batched MLA kernel, then the naive form's multi-token sequences'
// rows; logits go back in batch order.
struct CudaEngine::Plan {
  int64_t n = 0;   // tokens
  int64_t nd = 0;  // query rows of the absorbed form: the first nd rows of the step
  int64_t max_blocks = 1, max_ctx = 1;
  std::vector<int64_t> row0, rows, pos0;  // per batch index
  std::vector<size_t> prefill;            // batch indices of multi-token sequences
  const int32_t* ids = nullptr;           // device, [n]
  const int32_t* pos = nullptr;           // device, [n]
  const int32_t* slots = nullptr;         // device, [n]: block * block_tokens + offset
  const int32_t* dtable = nullptr;        // device, [nd, max_blocks]: each query row's table
  const int32_t* dctx = nullptr;          // device, [nd]: its position + 1
  std::vector<const int32_t*> ptable;     // device, per batch index (naive prefill only)
};

CudaEngine::~CudaEngine() {
  // The current device is per thread: free the buffers on the engine's own.
  if (!layers_.empty()) cuda::SetDevice(options_.device).IgnoreError();
}

absl::StatusOr<std::unique_ptr<CudaEngine>> CudaEngine::Create(const ModelConfig& c,
                                                               const DenseWeights& w,
                                                               RoutedExperts* experts,
                                                               const CudaEngineOptions& options) {
  const cuda::DeviceProbe probe = cuda::Probe();
  if (probe.count == 0) return absl::UnavailableError(probe.reason);
  if (options.device < 0 || options.device >= probe.count) {
    return absl::InvalidArgumentError(
        absl::StrCat("--gpu ", options.device, ": ", probe.count, " usable CUDA device(s)"));
  }
  if (options.block_tokens <= 0 || options.kv_blocks <= 0) {
    return absl::InvalidArgumentError("block_tokens and kv_blocks must be positive");
  }
  if (options.kv_blocks * options.block_tokens > INT32_MAX) {  // slots are int32 on the device
    return absl::InvalidArgumentError("kv_blocks * block_tokens must stay below 2^31");
  }
  bool moe = false;
  for (const LayerWeights& lw : w.layers) moe |= lw.moe;
  if (moe && experts == nullptr) {
    return absl::InvalidArgumentError("the model has MoE layers but no routed experts were given");
  }
  RETURN_IF_ERROR(cuda::SetDevice(options.device));
  std::unique_ptr<CudaEngine> e(new CudaEngine());
  e->config_ = c;
  e->experts_ = experts;
  e->options_ = options;
  e->gate_ = GateParamsOf(c);
  e->expert_tokens_.reset(new std::atomic<uint64_t>[static_cast<size_t>(
      std::max<int64_t>(1, c.num_expert_layers() * c.n_routed_experts))]());
  ASSIGN_OR_RETURN(e->blas_, cuda::Blas::Create(nullptr));
  e->blas_.set_cublas(options.cublas_gemms);
  ASSIGN_OR_RETURN(e->rope_, cuda::RopeTable::Upload(cpu::RopeTable(RopeParamsOf(c))));
  RETURN_IF_ERROR(e->Upload(w));
  e->cache_ = std::make_unique<LatentKvCache>(c, options.block_tokens, options.kv_blocks,
                                              options.kv_dtype, /*host_storage=*/false);
  ASSIGN_OR_RETURN(
      e->pool_,
      cuda::DeviceBuffer::Alloc(static_cast<size_t>(options.kv_blocks * e->cache_->block_bytes())));
  return e;
}

absl::Status CudaEngine::Upload(const DenseWeights& w) {
  absl::Status status;
  auto vec = [&](const std::vector<float>& v) -> const float* {
    if (v.empty() || !status.ok()) return nullptr;
    auto b = cuda::DeviceBuffer::Alloc(v.size() * sizeof(float));
    if (b.ok()) status = b->Upload(v.data(), v.size() * sizeof(float));
    if (!b.ok()) status = b.status();
    if (!status.ok()) return nullptr;
    weight_bytes_ += b->bytes();
    weights_.push_back(std::move(*b));
    return weights_.back().as<float>();
  };
  auto linear = [&](const LinearWeight& lw, bool keep_bf16) -> cuda::DeviceWeight {
    cuda::DeviceWeight d;
    if (lw.empty() || !status.ok()) return d;
    auto b = UploadLinear(lw, keep_bf16, &d.bf16);
    if (!b.ok()) {
      status = b.status();
      return d;
    }
    weight_bytes_ += b->bytes();
    weights_.push_back(std::move(*b));
    d.w = weights_.back().get();
    return d;
  };
  auto fp32 = [&](const LinearWeight& lw) {
    return static_cast<const float*>(linear(lw, false).w);
  };
  const bool bf16 = options_.keep_bf16;
  embed_ = linear(w.embed, bf16);
  final_norm_ = vec(w.final_norm);
  lm_head_ = linear(w.lm_head, bf16);
  layers_.resize(w.layers.size());
  for (size_t l = 0; l < w.layers.size() && status.ok(); ++l) {
    const LayerWeights& lw = w.layers[l];
    DeviceLayer& d = layers_[l];
    d.input_norm = vec(lw.input_norm);
    d.post_norm = vec(lw.post_norm);
    d.q_a = linear(lw.q_a, bf16);
    d.q_a_norm = vec(lw.q_a_norm);
    d.q_b = linear(lw.q_b, bf16);
    d.q = linear(lw.q, bf16);
    d.kv_a = linear(lw.kv_a, bf16);
    d.kv_a_norm = vec(lw.kv_a_norm);
    d.kv_b = fp32(lw.kv_b);
    d.o = linear(lw.o, bf16);
    d.moe = lw.moe;
    d.gate = fp32(lw.gate);
    d.gate_bias = vec(lw.gate_bias);
    d.mlp_gate = linear(lw.dense.gate, bf16);
    d.mlp_up = linear(lw.dense.up, bf16);
    d.mlp_down = linear(lw.dense.down, bf16);
    d.shared_gate = linear(lw.shared.gate, bf16);
    d.shared_up = linear(lw.shared.up, bf16);
    d.shared_down = linear(lw.shared.down, bf16);
  }
  return status;
}

absl::StatusOr<float*> CudaEngine::Scratch(cuda::DeviceBuffer& b, int64_t floats) {
  RETURN_IF_ERROR(b.Reserve(static_cast<size_t>(std::max<int64_t>(floats, 1)) * sizeof(float)));
  return b.as<float>();
}

cpu::MlaParams CudaEngine::MlaParamsOf(int64_t l) const {
  const ModelConfig& c = config_;
  cpu::MlaParams p;
  p.num_heads = c.num_attention_heads;
  p.nope_dim = c.qk_nope_head_dim;
  p.rope_dim = c.qk_rope_head_dim;
  p.v_dim = c.v_head_dim;
  p.latent_rank = c.kv_lora_rank;
  p.softmax_scale = static_cast<float>(c.SoftmaxScale());
  p.kv_b = layers_[static_cast<size_t>(l)].kv_b;
  return p;
}

cuda::LatentPool CudaEngine::PoolOf(int64_t l) const {
  cuda::LatentPool p;
  p.pool = pool_.as<uint8_t>() + cache_->LayerOffset(0, l);
  p.dtype = cache_->dtype();
  p.block_tokens = cache_->block_tokens();
  p.block_bytes = static_cast<int64_t>(cache_->block_bytes());
  return p;
}

absl::Status CudaEngine::Step(std::vector<SequenceStep>& batch,
                              std::vector<std::vector<float>>* logits) {
  for (size_t i = 0; i < batch.size(); ++i) {
    const auto* paged = dynamic_cast<const PagedKvSequence*>(batch[i].cache);
    if (batch[i].cache != nullptr && (paged == nullptr || paged->cache() != cache_.get())) {
      return absl::FailedPreconditionError(absl::StrCat(
          "sequence ", i, ": its cache is not a PagedKvSequence over this GPU engine's pool"));
    }
    if (batch[i].hidden != nullptr) {
      return absl::UnimplementedError(
          absl::StrCat("sequence ", i, ": hidden states (MTP) are not supported on the GPU yet"));
    }
  }
  // The current device is per thread, and steps may come from any thread (the scheduler's).
  RETURN_IF_ERROR(cuda::SetDevice(options_.device));
  Plan plan;
  RETURN_IF_ERROR(ValidateStep(config_, batch, &plan.n));
  RETURN_IF_ERROR(Prepare(batch, plan.n, &plan));
  ASSIGN_OR_RETURN(float* h, Scratch(h_, plan.n * config_.hidden_size));
  RETURN_IF_ERROR(cuda::Embedding(embed_.w, embed_.bf16, config_.hidden_size, plan.ids, plan.n, h));
  for (int64_t l = 0; l < config_.num_hidden_layers; ++l) RETURN_IF_ERROR(Layer(l, plan));
  return Logits(batch, plan, logits);
}

// The step's integer inputs (token ids, positions, cache slots, block tables, context lengths)
// built on the host in the engine's row order and uploaded in one copy.
absl::Status CudaEngine::Prepare(std::vector<SequenceStep>& batch, int64_t n, Plan* plan) {
  const int64_t bt = cache_->block_tokens();
  const size_t b = batch.size();
  plan->row0.assign(b, 0);
  plan->rows.assign(b, 0);
  plan->pos0.assign(b, 0);
  plan->ptable.assign(b, nullptr);
  // The absorbed form's sequences first (every one, unless options_.naive_prefill), each row a
  // query over its own position's rows; then the naive form's multi-token ones.
  std::vector<size_t> order;
  for (size_t i = 0; i < b; ++i) {
    plan->rows[i] = static_cast<int64_t>(batch[i].tokens.size());
    plan->pos0[i] = batch[i].cache->length();
    if (plan->rows[i] == 1 || !options_.naive_prefill) {
      order.push_back(i);
      plan->nd += plan->rows[i];
      plan->max_ctx = std::max(plan->max_ctx, plan->pos0[i] + plan->rows[i]);
    } else {
      plan->prefill.push_back(i);
    }
  }
  const size_t absorbed = order.size();
  order.insert(order.end(), plan->prefill.begin(), plan->prefill.end());
  plan->max_blocks = (plan->max_ctx + bt - 1) / bt;
  std::vector<int32_t> ints(static_cast<size_t>(3 * n + plan->nd * (plan->max_blocks + 1)));
  int32_t* ids = ints.data();
  int32_t* pos = ids + n;
  int32_t* slots = pos + n;
  int32_t* dtable = slots + n;
  int32_t* dctx = dtable + plan->nd * plan->max_blocks;
  std::vector<size_t> ptable_at(b, 0);
  std::vector<int32_t>
      ptables;  // appended to `ints` after the loop (the pointers above stay valid)
  int64_t row = 0;
  for (size_t k = 0; k < order.size(); ++k) {
    const size_t i = order[k];
    const auto* seq = static_cast<const PagedKvSequence*>(batch[i].cache);
    const std::vector<int32_t>& table = seq->block_table();
    plan->row0[i] = row;
    for (int64_t j = 0; j < plan->rows[i]; ++j, ++row) {
      const int64_t p = plan->pos0[i] + j;
      ids[row] = batch[i].tokens[static_cast<size_t>(j)];
      pos[row] = static_cast<int32_t>(p);
      slots[row] = static_cast<int32_t>(table[static_cast<size_t>(p / bt)] * bt + p % bt);
      if (k < absorbed) {  // row < nd: a query over rows 0..p
        std::copy(table.begin(), table.begin() + (p + bt) / bt, dtable + row * plan->max_blocks);
        dctx[row] = static_cast<int32_t>(p + 1);
      }
    }
    if (k >= absorbed) {
      ptable_at[i] = ints.size() + ptables.size();
      ptables.insert(ptables.end(), table.begin(), table.end());
    }
  }
  ints.insert(ints.end(), ptables.begin(), ptables.end());
  ASSIGN_OR_RETURN(float* dev, Scratch(ints_, static_cast<int64_t>(ints.size())));
  RETURN_IF_ERROR(cuda::CopyToDevice(dev, ints.data(), ints.size() * sizeof(int32_t)));
  const auto* base = reinterpret_cast<const int32_t*>(dev);
  plan->ids = base;
  plan->pos = base + n;
  plan->slots = base + 2 * n;
  plan->dtable = base + 3 * n;
  plan->dctx = plan->dtable + plan->nd * plan->max_blocks;
  for (size_t i : plan->prefill) plan->ptable[i] = base + ptable_at[i];
  return absl::OkStatus();
}

absl::Status CudaEngine::Layer(int64_t l, const Plan& plan) {
  const ModelConfig& c = config_;
  const DeviceLayer& dl = layers_[static_cast<size_t>(l)];
  const int64_t d = c.hidden_size, n = plan.n;
  float* h = h_.as<float>();
  ASSIGN_OR_RETURN(float* x, Scratch(x_, n * d));
  ASSIGN_OR_RETURN(float* tmp, Scratch(tmp_, n * d));
  RETURN_IF_ERROR(cuda::RmsNorm(h, n, d, dl.input_norm, c.rms_norm_eps, x));
  RETURN_IF_ERROR(Attention(l, plan));
  RETURN_IF_ERROR(cuda::Add(tmp, n * d, h));
  RETURN_IF_ERROR(cuda::RmsNorm(h, n, d, dl.post_norm, c.rms_norm_eps, x));
  if (dl.moe) return Moe(l, plan);
  RETURN_IF_ERROR(Mlp(dl, /*shared=*/false, n, tmp));
  return cuda::Add(tmp, n * d, h);
}

// tmp_ = o_proj(MLA(x_)), after storing the step's latent rows in the pool.
absl::Status CudaEngine::Attention(int64_t l, const Plan& plan) {
  const ModelConfig& c = config_;
  const DeviceLayer& dl = layers_[static_cast<size_t>(l)];
  const int64_t n = plan.n, d = c.hidden_size, h = c.num_attention_heads, qd = c.q_head_dim();
  const int64_t r = c.kv_lora_rank, lc = c.latent_dim(), dn = c.qk_nope_head_dim;
  const float* x = x_.as<float>();
  ASSIGN_OR_RETURN(float* q, Scratch(q_, n * h * qd));
  ASSIGN_OR_RETURN(float* kva, Scratch(kva_, n * lc));
  ASSIGN_OR_RETURN(float* attn, Scratch(attn_, n * h * c.v_head_dim));
  if (c.q_lora_rank > 0) {
    ASSIGN_OR_RETURN(float* qa, Scratch(qa_, n * c.q_lora_rank));
    RETURN_IF_ERROR(cuda::Linear(blas_, x, n, dl.q_a, c.q_lora_rank, d, qa));
    RETURN_IF_ERROR(cuda::RmsNorm(qa, n, c.q_lora_rank, dl.q_a_norm, kLatentNormEps, qa));
    RETURN_IF_ERROR(cuda::Linear(blas_, qa, n, dl.q_b, h * qd, c.q_lora_rank, q));
  } else {
    RETURN_IF_ERROR(cuda::Linear(blas_, x, n, dl.q, h * qd, d, q));
  }
  RETURN_IF_ERROR(cuda::Linear(blas_, x, n, dl.kv_a, lc, d, kva));
  RETURN_IF_ERROR(cuda::RmsNorm(kva, n, r, lc, dl.kv_a_norm, kLatentNormEps, kva, lc));
  RETURN_IF_ERROR(rope_.Apply(kva + r, plan.pos, n, 1, lc, 0, kva + r));
  RETURN_IF_ERROR(rope_.Apply(q + dn, plan.pos, n, h, h * qd, qd, q + dn));
  const cpu::MlaParams p = MlaParamsOf(l);
  const cuda::LatentPool pool = PoolOf(l);
  RETURN_IF_ERROR(cuda::StoreLatentRows(p, pool, kva, n, plan.slots));
  if (plan.nd > 0) {
    cuda::PagedLatentCache cache;
    cache.pool = pool.pool;
    cache.dtype = pool.dtype;
    cache.block_tokens = pool.block_tokens;
    cache.block_bytes = pool.block_bytes;
    cache.table_stride = plan.max_blocks;
    cache.max_ctx = plan.max_ctx;
    // In slices whose partial sums fit options_.prefill_score_floats: a query's result is its
    // own, whatever slice it is in.
    const int64_t per_row = cuda::MlaDecodeScratchFloats(p, 1, plan.max_ctx);
    const int64_t slice = std::clamp<int64_t>(
        options_.prefill_score_floats / std::max<int64_t>(per_row, 1), 1,
        std::min<int64_t>(plan.nd, 65535));  // the kernel's grid takes at most 65535 queries
    ASSIGN_OR_RETURN(float* scratch,
                     Scratch(mla_scratch_, cuda::MlaDecodeScratchFloats(p, slice, plan.max_ctx)));
    for (int64_t r0 = 0; r0 < plan.nd; r0 += slice) {
      const int64_t rows = std::min(slice, plan.nd - r0);
      cache.table = plan.dtable + r0 * plan.max_blocks;
      cache.ctx = plan.dctx + r0;
      RETURN_IF_ERROR(cuda::MlaDecodeAbsorbed(p, q + r0 * h * qd, rows, cache,
                                              attn + r0 * h * c.v_head_dim, scratch));
    }
  }
  for (size_t i : plan.prefill) RETURN_IF_ERROR(Prefill(p, pool, plan, i));
  return cuda::Linear(blas_, attn, n, dl.o, d, h * c.v_head_dim, tmp_.as<float>());
}

// The naive form for one multi-token sequence (options_.naive_prefill): its latent rows expanded
// through kv_b, scores per
// head (nope and rope parts), the causal softmax, and P @ V, as strided-batched GEMMs over heads,
// in groups of heads whose expanded K/V and scores fit options_.prefill_score_floats.
absl::Status CudaEngine::Prefill(const cpu::MlaParams& p, const cuda::LatentPool& pool,
                                 const Plan& plan, size_t seq) {
  const int64_t h = p.num_heads, dn = p.nope_dim, dr = p.rope_dim, dv = p.v_dim;
  const int64_t r = p.latent_rank, lc = r + dr, qd = dn + dr, kvd = dn + dv;
  const int64_t m = plan.rows[seq], pos0 = plan.pos0[seq], ctx = pos0 + m;
  // A group's expanded K/V [ctx, heads * kvd] and scores [heads, m, ctx] fit the budget.
  const int64_t hg =
      std::clamp<int64_t>(options_.prefill_score_floats / (m * ctx + ctx * kvd), 1, h);
  ASSIGN_OR_RETURN(float* lat, Scratch(lat_, ctx * lc));
  ASSIGN_OR_RETURN(float* kv, Scratch(kv_, ctx * hg * kvd));
  ASSIGN_OR_RETURN(float* s, Scratch(scores_, hg * m * ctx));
  RETURN_IF_ERROR(cuda::GatherLatentRows(p, pool, plan.ptable[seq], ctx, lat));
  for (int64_t h0 = 0; h0 < h; h0 += hg) {
    const int64_t heads = std::min(hg, h - h0), ldkv = heads * kvd;
    const float* q = q_.as<float>() + plan.row0[seq] * h * qd + h0 * qd;
    float* o = attn_.as<float>() + plan.row0[seq] * h * dv + h0 * dv;
    cuda::Gemm g;  // kv [ctx, heads * kvd] = c [ctx, r] @ kv_b[the group's rows]^T
    g.m = ctx;
    g.n = ldkv;
    g.k = r;
    g.a = lat;
    g.lda = lc;
    g.b = p.kv_b + h0 * kvd * r;
    g.ldb = r;
    g.c = kv;
    g.ldc = ldkv;
    RETURN_IF_ERROR(cuda::RunGemm(blas_, g));
    g = cuda::Gemm();  // s[head] [m, ctx] = q_nope[head] @ k_nope[head]^T
    g.m = m;
    g.n = ctx;
    g.k = dn;
    g.a = q;
    g.lda = h * qd;
    g.stride_a = qd;
    g.b = kv;
    g.ldb = ldkv;
    g.stride_b = kvd;
    g.c = s;
    g.ldc = ctx;
    g.stride_c = m * ctx;
    g.batch = heads;
    RETURN_IF_ERROR(cuda::RunGemm(blas_, g));
    g.k = dr;  // s[head] += q_pe[head] @ k_pe^T (k_pe shared by the heads)
    g.a = q + dn;
    g.b = lat + r;
    g.ldb = lc;
    g.stride_b = 0;
    g.beta = 1.0f;
    RETURN_IF_ERROR(cuda::RunGemm(blas_, g));
    RETURN_IF_ERROR(cuda::CausalSoftmax(s, heads, m, ctx, pos0, p.softmax_scale));
    g = cuda::Gemm();  // o[:, head] [m, dv] = P[head] [m, ctx] @ v[head] [ctx, dv]
    g.m = m;
    g.n = dv;
    g.k = ctx;
    g.a = s;
    g.lda = ctx;
    g.stride_a = m * ctx;
    g.b = kv + dn;
    g.ldb = ldkv;
    g.stride_b = kvd;
    g.b_trans = false;
    g.c = o;
    g.ldc = h * dv;
    g.stride_c = dv;
    g.batch = heads;
    RETURN_IF_ERROR(cuda::RunGemm(blas_, g));
  }
  return absl::OkStatus();
}

// out [n, D] = the dense MLP (or the shared experts) of x_.
absl::Status CudaEngine::Mlp(const DeviceLayer& dl, bool shared, int64_t n, float* out) {
  const ModelConfig& c = config_;
  const int64_t d = c.hidden_size;
  const int64_t width = shared ? c.moe_intermediate_size * c.n_shared_experts : c.intermediate_size;
  const cuda::DeviceWeight gate = shared ? dl.shared_gate : dl.mlp_gate;
  const cuda::DeviceWeight up = shared ? dl.shared_up : dl.mlp_up;
  const cuda::DeviceWeight down = shared ? dl.shared_down : dl.mlp_down;
  ASSIGN_OR_RETURN(float* g, Scratch(mlp_, 2 * n * width));
  float* u = g + n * width;
  RETURN_IF_ERROR(cuda::Linear(blas_, x_.as<float>(), n, gate, width, d, g));
  RETURN_IF_ERROR(cuda::Linear(blas_, x_.as<float>(), n, up, width, d, u));
  RETURN_IF_ERROR(cuda::SiluMul(g, u, n * width, g));
  return cuda::Linear(blas_, g, n, down, d, width, out);
}

// The router and expert choice on the device; the routed experts through experts_ (host rows),
// the shared experts on the device meanwhile; h += shared + routed (Engine's order).
absl::Status CudaEngine::Moe(int64_t l, const Plan& plan) {
  const ModelConfig& c = config_;
  const DeviceLayer& dl = layers_[static_cast<size_t>(l)];
  const int64_t n = plan.n, d = c.hidden_size, e = c.n_routed_experts, k = c.num_experts_per_tok;
  ASSIGN_OR_RETURN(float* router, Scratch(router_, 2 * n * e));
  ASSIGN_OR_RETURN(float* w, Scratch(gate_w_, 2 * n * k));
  auto* ids = reinterpret_cast<int32_t*>(w + n * k);
  RETURN_IF_ERROR(cuda::Linear(blas_, x_.as<float>(), n, dl.gate, e, d, router));
  RETURN_IF_ERROR(cuda::SelectExperts(gate_, router, n, dl.gate_bias, ids, w, router + n * e));
  // Rows cross to the experts and back through page-locked host memory: x, out [n, D], then
  // the weights and ids [n, k].
  const size_t rows = static_cast<size_t>(n * d), picks = static_cast<size_t>(n * k);
  RETURN_IF_ERROR(staging_.Reserve((2 * rows + 2 * picks) * 4));
  float* host_x = staging_.as<float>();
  float* host_out = host_x + rows;
  float* host_w = host_out + rows;
  auto* host_ids = reinterpret_cast<int32_t*>(host_w + picks);
  std::fill(host_out, host_out + rows, 0.0f);
  RETURN_IF_ERROR(cuda::CopyToHost(host_x, x_.as<float>(), rows * 4));
  RETURN_IF_ERROR(cuda::CopyToHost(host_w, w, picks * 4));
  RETURN_IF_ERROR(cuda::CopyToHost(host_ids, ids, picks * 4));
  for (size_t i = 0; i < picks; ++i) {
    expert_tokens_[static_cast<size_t>(l * e + host_ids[i])].fetch_add(1,
                                                                       std::memory_order_relaxed);
  }
  RETURN_IF_ERROR(experts_->Begin(l, host_x, n, host_ids, host_w, k));
  float* tmp = tmp_.as<float>();
  absl::Status shared;
  if (c.n_shared_experts > 0) {
    shared = Mlp(dl, /*shared=*/true, n, tmp);
    if (shared.ok()) shared = cuda::CopyToHost(host_out, tmp, rows * 4);
  }
  if (!shared.ok()) {
    std::vector<float> drop(rows);
    experts_->Finish(drop.data()).IgnoreError();  // nothing stays at the experts
    return shared;
  }
  RETURN_IF_ERROR(experts_->Finish(host_out));
  RETURN_IF_ERROR(cuda::CopyToDevice(tmp, host_out, rows * 4));
  return cuda::Add(tmp, n * d, h_.as<float>());
}

// The final norm and lm_head of the rows that need logits, downloaded in batch order; then the
// caches commit the step's rows.
absl::Status CudaEngine::Logits(std::vector<SequenceStep>& batch, const Plan& plan,
                                std::vector<std::vector<float>>* logits) {
  const ModelConfig& c = config_;
  const int64_t d = c.hidden_size, v = c.vocab_size;
  int64_t out_rows = 0;
  for (const SequenceStep& s : batch) out_rows += s.all_logits ? s.tokens.size() : 1;
  ASSIGN_OR_RETURN(float* fx, Scratch(final_, out_rows * d));
  ASSIGN_OR_RETURN(float* lo, Scratch(logits_, out_rows * v));
  int64_t at = 0;
  for (size_t i = 0; i < batch.size(); ++i) {
    const int64_t m = plan.rows[i];
    const int64_t first = plan.row0[i] + (batch[i].all_logits ? 0 : m - 1);
    const int64_t rows = batch[i].all_logits ? m : 1;
    RETURN_IF_ERROR(cuda::RmsNorm(h_.as<float>() + first * d, rows, d, final_norm_, c.rms_norm_eps,
                                  fx + at * d));
    at += rows;
  }
  RETURN_IF_ERROR(cuda::Linear(blas_, fx, out_rows, lm_head_, v, d, lo));
  logits->resize(batch.size());
  at = 0;
  for (size_t i = 0; i < batch.size(); ++i) {
    const int64_t rows = batch[i].all_logits ? plan.rows[i] : 1;
    (*logits)[i].resize(static_cast<size_t>(rows * v));
    RETURN_IF_ERROR(cuda::CopyToHost((*logits)[i].data(), lo + at * v,
                                     static_cast<size_t>(rows * v) * sizeof(float)));
    at += rows;
  }
  RETURN_IF_ERROR(cuda::Synchronize());
  for (size_t i = 0; i < batch.size(); ++i) batch[i].cache->Advance(plan.rows[i]);
  return absl::OkStatus();
}

std::unique_ptr<KvSequence> CudaEngine::NewSequence() {
  return std::make_unique<PagedKvSequence>(cache_.get());
}

absl::StatusOr<std::vector<float>> CudaEngine::Forward(const std::vector<int32_t>& tokens) {
  PagedKvSequence seq(cache_.get());
  std::vector<SequenceStep> batch(1);
  batch[0].cache = &seq;
  batch[0].tokens = tokens;
  batch[0].all_logits = true;
  std::vector<std::vector<float>> logits;
  RETURN_IF_ERROR(Step(batch, &logits));
  return std::move(logits[0]);
}

}  // namespace dmoe
