#include "attention_service/engine.h"

#include <chrono>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "kernels/cpu/ops.h"

namespace dmoe {

namespace {
using Clock = std::chrono::steady_clock;
double Since(Clock::time_point* t) {
  const Clock::time_point now = Clock::now();
  const double s = std::chrono::duration<double>(now - *t).count();
  *t = now;
  return s;
}
constexpr double kLatentNormEps = 1e-6;  // q_a/kv_a layernorms: upstream's default (MODEL_SPEC.md)
}  // namespace

Engine::Engine(const ModelConfig& config, const DenseWeights* weights, RoutedExperts* experts,
               EngineOptions options)
    : config_(config),
      w_(weights),
      experts_(experts),
      options_(options),
      rope_(config),
      gate_(cpu::GateParams::FromConfig(config)) {}

absl::Status Engine::Step(std::vector<SequenceStep>& batch,
                          std::vector<std::vector<float>>* logits) {
  const ModelConfig& c = config_;
  const int64_t d = c.hidden_size;
  int64_t n = 0;
  for (size_t i = 0; i < batch.size(); ++i) {
    const SequenceStep& s = batch[i];
    if (s.cache == nullptr)
      return absl::InvalidArgumentError(absl::StrCat("sequence ", i, ": no cache"));
    if (s.tokens.empty()) {
      return absl::InvalidArgumentError(absl::StrCat("sequence ", i, ": tokens: empty"));
    }
    for (size_t j = 0; j < s.tokens.size(); ++j) {
      if (s.tokens[j] < 0 || s.tokens[j] >= c.vocab_size) {
        return absl::InvalidArgumentError(absl::StrCat("sequence ", i, ": tokens[", j, "]: id ",
                                                       s.tokens[j], " is outside [0, vocab_size ",
                                                       c.vocab_size, ")"));
      }
    }
    const int64_t len = s.cache->length() + static_cast<int64_t>(s.tokens.size());
    if (len > c.max_position_embeddings) {
      return absl::InvalidArgumentError(absl::StrCat("sequence ", i, ": length ", len,
                                                     " exceeds max_position_embeddings ",
                                                     c.max_position_embeddings));
    }
    n += static_cast<int64_t>(s.tokens.size());
  }
  for (size_t i = 0; i < batch.size(); ++i) {
    if (auto st = batch[i].cache->Reserve(static_cast<int64_t>(batch[i].tokens.size())); !st.ok()) {
      return absl::Status(st.code(), absl::StrCat("sequence ", i, ": ", st.message()));
    }
  }
  h_.resize(static_cast<size_t>(n * d));
  x_.resize(h_.size());
  tmp_.resize(h_.size());
  {
    int64_t row = 0;
    for (const SequenceStep& s : batch) {
      for (int32_t tok : s.tokens) {
        std::memcpy(h_.data() + row * d, w_->embed.data() + static_cast<int64_t>(tok) * d,
                    sizeof(float) * static_cast<size_t>(d));
        ++row;
      }
    }
  }
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const LayerWeights& lw = w_->layers[static_cast<size_t>(l)];
    auto t0 = Clock::now();
    cpu::RmsNorm(h_.data(), n, d, lw.input_norm.data(), c.rms_norm_eps, x_.data());
    Attention(l, batch, x_.data(), tmp_.data());
    timings_.attention += Since(&t0);
    for (int64_t i = 0; i < n * d; ++i) h_[static_cast<size_t>(i)] += tmp_[static_cast<size_t>(i)];
    cpu::RmsNorm(h_.data(), n, d, lw.post_norm.data(), c.rms_norm_eps, x_.data());
    if (auto st = Ffn(l, x_.data(), n, tmp_.data()); !st.ok()) {
      return st;  // lengths are unchanged: the rows written so far are ignored
    }
    for (int64_t i = 0; i < n * d; ++i) h_[static_cast<size_t>(i)] += tmp_[static_cast<size_t>(i)];
  }
  // Gather the rows that need logits, then one final norm + lm_head GEMM for all of them.
  auto t0 = Clock::now();
  int64_t out_rows = 0, row = 0;
  for (const SequenceStep& s : batch) {
    const int64_t m = static_cast<int64_t>(s.tokens.size());
    const int64_t first = s.all_logits ? row : row + m - 1;
    const int64_t rows = s.all_logits ? m : 1;
    cpu::RmsNorm(h_.data() + first * d, rows, d, w_->final_norm.data(), c.rms_norm_eps,
                 x_.data() + out_rows * d);
    out_rows += rows;
    row += m;
  }
  lm_out_.resize(static_cast<size_t>(out_rows * c.vocab_size));
  cpu::Linear(x_.data(), out_rows, d, w_->lm_head.w.data(), c.vocab_size, lm_out_.data());
  logits->resize(batch.size());
  out_rows = 0;
  for (SequenceStep& s : batch) {
    const int64_t m = static_cast<int64_t>(s.tokens.size());
    const int64_t rows = s.all_logits ? m : 1;
    const float* src = lm_out_.data() + out_rows * c.vocab_size;
    (*logits)[static_cast<size_t>(&s - batch.data())].assign(src, src + rows * c.vocab_size);
    out_rows += rows;
    s.cache->Advance(m);
  }
  timings_.lm_head += Since(&t0);
  return absl::OkStatus();
}

void Engine::Attention(int64_t l, std::vector<SequenceStep>& batch, const float* x, float* out) {
  const ModelConfig& c = config_;
  const LayerWeights& lw = w_->layers[static_cast<size_t>(l)];
  const int64_t d = c.hidden_size, h = c.num_attention_heads, qd = c.q_head_dim();
  const int64_t r = c.kv_lora_rank, dr = c.qk_rope_head_dim, lc = c.latent_dim();
  int64_t n = 0;
  for (const SequenceStep& s : batch) n += static_cast<int64_t>(s.tokens.size());

  q_.resize(static_cast<size_t>(n * h * qd));
  if (c.q_lora_rank > 0) {
    qa_.resize(static_cast<size_t>(n * c.q_lora_rank));
    cpu::Linear(x, n, d, lw.q_a.w.data(), c.q_lora_rank, qa_.data());
    cpu::RmsNorm(qa_.data(), n, c.q_lora_rank, lw.q_a_norm.data(), kLatentNormEps, qa_.data());
    cpu::Linear(qa_.data(), n, c.q_lora_rank, lw.q_b.w.data(), h * qd, q_.data());
  } else {
    cpu::Linear(x, n, d, lw.q.w.data(), h * qd, q_.data());
  }
  kva_.resize(static_cast<size_t>(n * lc));
  cpu::Linear(x, n, d, lw.kv_a.w.data(), lc, kva_.data());

  attn_.resize(static_cast<size_t>(n * h * c.v_head_dim));
  cpu::MlaParams p;
  p.num_heads = h;
  p.nope_dim = c.qk_nope_head_dim;
  p.rope_dim = dr;
  p.v_dim = c.v_head_dim;
  p.latent_rank = r;
  p.softmax_scale = static_cast<float>(c.SoftmaxScale());
  p.kv_b = lw.kv_b.w.data();
  rotated_.resize(static_cast<size_t>(dr));
  float* rotated = rotated_.data();
  decode_rows_.clear();
  decode_caches_.clear();
  decode_ctx_.clear();
  int64_t row = 0;
  for (SequenceStep& s : batch) {
    const int64_t m = static_cast<int64_t>(s.tokens.size());
    const int64_t pos0 = s.cache->length();
    for (int64_t i = 0; i < m; ++i) {
      const int64_t pos = pos0 + i;
      const float* a = kva_.data() + (row + i) * lc;
      float* dst = s.cache->Row(l, pos);
      cpu::RmsNorm(a, 1, r, lw.kv_a_norm.data(), kLatentNormEps, dst);
      rope_.Apply(a + r, pos, dst + r);
      for (int64_t head = 0; head < h; ++head) {
        float* qpe = q_.data() + ((row + i) * h + head) * qd + c.qk_nope_head_dim;
        rope_.Apply(qpe, pos, rotated);
        std::memcpy(qpe, rotated, sizeof(float) * static_cast<size_t>(dr));
      }
    }
    const bool absorbed = options_.attention_form == AttentionForm::kAbsorbed ||
                          (options_.attention_form == AttentionForm::kAuto && m == 1);
    if (absorbed && m == 1) {
      decode_rows_.push_back(row);
      decode_caches_.push_back(s.cache->Rows(l));
      decode_ctx_.push_back(pos0 + 1);
    } else {
      float* o = attn_.data() + row * h * c.v_head_dim;
      const float* q = q_.data() + row * h * qd;
      if (absorbed) {
        cpu::MlaAttentionAbsorbed(p, q, m, s.cache->Rows(l), pos0 + m, pos0, o, &scratch_);
      } else {
        cpu::MlaAttentionNaive(p, q, m, s.cache->Rows(l), pos0 + m, pos0, o, &scratch_);
      }
    }
    row += m;
  }
  // Every single-token (decode) sequence of the step at once.
  if (!decode_rows_.empty()) {
    const int64_t nd = static_cast<int64_t>(decode_rows_.size());
    const int64_t orow = h * c.v_head_dim;
    decode_q_.resize(static_cast<size_t>(nd * h * qd));
    decode_o_.resize(static_cast<size_t>(nd * orow));
    for (int64_t i = 0; i < nd; ++i) {
      std::memcpy(decode_q_.data() + i * h * qd, q_.data() + decode_rows_[i] * h * qd,
                  sizeof(float) * static_cast<size_t>(h * qd));
    }
    cpu::MlaDecodeAbsorbedBatch(p, decode_q_.data(), nd, decode_caches_.data(), decode_ctx_.data(),
                                decode_o_.data(), &scratch_);
    for (int64_t i = 0; i < nd; ++i) {
      std::memcpy(attn_.data() + decode_rows_[i] * orow, decode_o_.data() + i * orow,
                  sizeof(float) * static_cast<size_t>(orow));
    }
  }
  cpu::Linear(attn_.data(), n, h * c.v_head_dim, lw.o.w.data(), d, out);
}

absl::Status Engine::Ffn(int64_t l, const float* x, int64_t n, float* out) {
  const ModelConfig& c = config_;
  const LayerWeights& lw = w_->layers[static_cast<size_t>(l)];
  const int64_t d = c.hidden_size;
  auto t0 = Clock::now();
  if (!lw.moe) {
    cpu::SwiGluMlp(x, n, d, lw.dense.gate.w.data(), lw.dense.up.w.data(), lw.dense.down.w.data(),
                   c.intermediate_size, out, &scratch_);
    timings_.dense_mlp += Since(&t0);
    return absl::OkStatus();
  }
  const int64_t e = c.n_routed_experts, k = c.num_experts_per_tok;
  router_.resize(static_cast<size_t>(n * e));
  cpu::Linear(x, n, d, lw.gate.w.data(), e, router_.data());
  gate_ids_.resize(static_cast<size_t>(n * k));
  gate_w_.resize(static_cast<size_t>(n * k));
  cpu::SelectExperts(gate_, router_.data(), n, gate_ids_.data(), gate_w_.data());
  timings_.router += Since(&t0);
  // Hand the tokens to the routed experts, compute the shared experts meanwhile, then add.
  RETURN_IF_ERROR(experts_->Begin(l, x, n, gate_ids_.data(), gate_w_.data(), k));
  if (c.n_shared_experts > 0) {
    cpu::SwiGluMlp(x, n, d, lw.shared.gate.w.data(), lw.shared.up.w.data(), lw.shared.down.w.data(),
                   c.moe_intermediate_size * c.n_shared_experts, out, &scratch_);
  } else {
    std::memset(out, 0, sizeof(float) * static_cast<size_t>(n * d));
  }
  timings_.shared += Since(&t0);
  RETURN_IF_ERROR(experts_->Finish(out));
  timings_.routed += Since(&t0);
  return absl::OkStatus();
}

absl::StatusOr<std::vector<float>> Engine::Forward(const std::vector<int32_t>& tokens) {
  SequenceKvCache cache(config_);
  std::vector<SequenceStep> batch(1);
  batch[0].cache = &cache;
  batch[0].tokens = tokens;
  batch[0].all_logits = true;
  std::vector<std::vector<float>> logits;
  if (auto st = Step(batch, &logits); !st.ok()) return st;
  return std::move(logits[0]);
}

}  // namespace dmoe
