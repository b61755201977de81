#include "attention_service/engine.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <functional>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "kernels/cpu/ops.h"
#include "kernels/cpu/qlinear.h"
#include "kernels/cpu/thread_pool.h"
#include "model/kernel_params.h"

namespace dmoe {

namespace {
using Clock = std::chrono::steady_clock;
// The residual stream: h[i] += v[i] (a block's output) for i < n.
void AddResidual(float* h, const float* v, int64_t n) {
  for (int64_t i = 0; i < n; ++i) h[i] += v[i];
}

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
      rope_(RopeParamsOf(config)),
      gate_(GateParamsOf(config)),
      expert_tokens_(new std::atomic<uint64_t>[static_cast<size_t>(
          std::max<int64_t>(1, config.num_expert_layers() * config.n_routed_experts))]()) {}

absl::Status ValidateStep(const ModelConfig& c, std::vector<SequenceStep>& batch, int64_t* total) {
  int64_t n = 0;
  for (size_t i = 0; i < batch.size(); ++i) {
    const SequenceStep& s = batch[i];
    if (s.cache == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat("sequence ", i, ": no cache"));
    }
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
  *total = n;
  return absl::OkStatus();
}

absl::Status StepEngine::StepPingPong(std::vector<SequenceStep>& a, std::vector<SequenceStep>& b,
                                      RoutedExperts*, std::vector<std::vector<float>>* logits_a,
                                      std::vector<std::vector<float>>* logits_b) {
  std::vector<SequenceStep> both = a;
  both.insert(both.end(), b.begin(), b.end());
  std::vector<std::vector<float>> all;
  RETURN_IF_ERROR(Step(both, &all));
  logits_a->assign(std::make_move_iterator(all.begin()),
                   std::make_move_iterator(all.begin() + static_cast<long>(a.size())));
  logits_b->assign(std::make_move_iterator(all.begin() + static_cast<long>(a.size())),
                   std::make_move_iterator(all.end()));
  return absl::OkStatus();
}

absl::Status StepEngine::StepMtp(std::vector<SequenceStep>&, const float*,
                                 std::vector<std::vector<float>>*) {
  return absl::UnimplementedError("this engine does not run the MTP layer");
}

std::unique_ptr<KvSequence> Engine::NewSequence() {
  return std::make_unique<SequenceKvCache>(config_);
}

absl::Status Engine::Validate(std::vector<SequenceStep>& batch, int64_t* n) {
  for (size_t i = 0; i < batch.size(); ++i) {
    if (batch[i].cache != nullptr && !batch[i].cache->on_host()) {
      return absl::FailedPreconditionError(
          absl::StrCat("sequence ", i, ": its cache is in device memory (a GPU engine's pool)"));
    }
  }
  return ValidateStep(config_, batch, n);
}

absl::Status Engine::Step(std::vector<SequenceStep>& batch,
                          std::vector<std::vector<float>>* logits) {
  MicroBatch& mb = mb_[0];
  RETURN_IF_ERROR(Validate(batch, &mb.n));
  mb.batch = &batch;
  mb.logits = logits;
  mb.experts = experts_;
  return Run(1);
}

absl::Status Engine::StepPingPong(std::vector<SequenceStep>& a, std::vector<SequenceStep>& b,
                                  RoutedExperts* experts_b,
                                  std::vector<std::vector<float>>* logits_a,
                                  std::vector<std::vector<float>>* logits_b) {
  RETURN_IF_ERROR(Validate(a, &mb_[0].n));
  RETURN_IF_ERROR(Validate(b, &mb_[1].n));
  mb_[0].batch = &a;
  mb_[0].logits = logits_a;
  mb_[0].experts = experts_;
  mb_[1].batch = &b;
  mb_[1].logits = logits_b;
  mb_[1].experts = experts_b;
  return Run(2);
}

absl::Status Engine::Run(int count) {
  const int64_t d = config_.hidden_size;
  for (int m = 0; m < count; ++m) {
    MicroBatch& mb = mb_[m];
    mb.h.resize(static_cast<size_t>(mb.n * d));
    mb.x.resize(mb.h.size());
    mb.tmp.resize(mb.h.size());
    int64_t row = 0;
    for (const SequenceStep& s : *mb.batch) {
      for (int32_t tok : s.tokens) {
        w_->embed.Row(tok, mb.h.data() + row * d);
        ++row;
      }
    }
  }
  RETURN_IF_ERROR(Layers(count, 0, config_.num_hidden_layers));
  for (int m = 0; m < count; ++m) Logits(mb_[m], w_->final_norm, true);
  return absl::OkStatus();
}

absl::Status Engine::Layers(int count, int64_t first, int64_t last) {
  absl::Status status;
  for (int64_t l = first; l < last && status.ok(); ++l) {
    for (int m = 0; m < count && status.ok(); ++m) status = LayerFront(l, mb_[m]);
    for (int m = 0; m < count && status.ok(); ++m) status = LayerBack(l, mb_[m]);
  }
  if (!status.ok()) {
    // Collect what is still at the experts, so nothing stays in flight; lengths are unchanged
    // and the rows written so far are ignored.
    for (int m = 0; m < count; ++m) {
      mb_[m].shared_split = false;
      if (mb_[m].in_flight) {
        mb_[m].in_flight = false;
        mb_[m].experts->Finish(mb_[m].tmp.data()).IgnoreError();
      }
    }
  }
  return status;
}

const LayerWeights& Engine::LayerAt(int64_t l) const {
  return l == config_.num_hidden_layers ? w_->mtp->layer : w_->layers[static_cast<size_t>(l)];
}

ModelConfig Engine::MtpCacheConfig(const ModelConfig& c) {
  ModelConfig m = c;
  m.num_hidden_layers = 1;
  m.num_nextn_predict_layers = 0;
  return m;
}

absl::Status Engine::StepMtp(std::vector<SequenceStep>& batch, const float* hidden,
                             std::vector<std::vector<float>>* logits) {
  if (w_->mtp == nullptr) {
    return absl::FailedPreconditionError("the model has no MTP layer (num_nextn_predict_layers)");
  }
  const MtpWeights& mtp = *w_->mtp;
  MicroBatch& mb = mb_[0];
  RETURN_IF_ERROR(Validate(batch, &mb.n));
  mb.batch = &batch;
  mb.logits = logits;
  mb.experts = experts_;
  const ModelConfig& c = config_;
  const int64_t d = c.hidden_size, n = mb.n;
  // [enorm(e_{p+1}) | hnorm(h_p)], e = 0 at position 0 (MODEL_SPEC.md "MTP").
  mtp_in_.assign(static_cast<size_t>(n * 2 * d), 0.0f);
  int64_t row = 0;
  for (const SequenceStep& s : batch) {
    for (size_t i = 0; i < s.tokens.size(); ++i, ++row) {
      float* in = mtp_in_.data() + row * 2 * d;
      if (s.cache->length() + static_cast<int64_t>(i) > 0) {
        w_->embed.Row(s.tokens[i], in);
        cpu::RmsNorm(in, 1, d, mtp.enorm.data(), c.rms_norm_eps, in);
      }
      cpu::RmsNorm(hidden + row * d, 1, d, mtp.hnorm.data(), c.rms_norm_eps, in + d);
    }
  }
  mb.h.resize(static_cast<size_t>(n * d));
  mb.x.resize(mb.h.size());
  mb.tmp.resize(mb.h.size());
  cpu::LinearW(mtp_in_.data(), n, mtp.eh_proj.ref(), mb.h.data());
  RETURN_IF_ERROR(Layers(1, c.num_hidden_layers, c.num_hidden_layers + 1));
  Logits(mb, mtp.head_norm, false);
  return absl::OkStatus();
}

absl::Status Engine::LayerFront(int64_t l, MicroBatch& mb) {
  const ModelConfig& c = config_;
  const LayerWeights& lw = LayerAt(l);
  const int64_t d = c.hidden_size, n = mb.n;
  auto t0 = Clock::now();
  cpu::RmsNorm(mb.h.data(), n, d, lw.input_norm.data(), c.rms_norm_eps, mb.x.data());
  Attention(l, *mb.batch, mb.x.data(), mb.tmp.data());
  AddResidual(mb.h.data(), mb.tmp.data(), n * d);
  cpu::RmsNorm(mb.h.data(), n, d, lw.post_norm.data(), c.rms_norm_eps, mb.x.data());
  timings_.attention += Since(&t0);
  if (!lw.moe) {
    cpu::SwiGluMlpW(mb.x.data(), n, lw.dense.gate.ref(), lw.dense.up.ref(), lw.dense.down.ref(),
                    mb.tmp.data(), &scratch_);
    AddResidual(mb.h.data(), mb.tmp.data(), n * d);
    timings_.dense_mlp += Since(&t0);
    return absl::OkStatus();
  }
  RouteBesideSharedExperts(l, lw, mb);
  timings_.router += Since(&t0);
  RETURN_IF_ERROR(mb.experts->Begin(l, mb.x.data(), n, mb.gate_ids.data(), mb.gate_w.data(),
                                    c.num_experts_per_tok));
  mb.in_flight = true;
  return absl::OkStatus();
}

void Engine::Route(int64_t l, const LayerWeights& lw, MicroBatch& mb) {
  const int64_t n = mb.n, e = config_.n_routed_experts, k = config_.num_experts_per_tok;
  mb.router.resize(static_cast<size_t>(n * e));
  // fp32 or row-major bf16 (never packed, so never rounded to A16: the fp32 upcast's bits).
  cpu::LinearW(mb.x.data(), n, lw.gate.ref(), mb.router.data());
  mb.gate_ids.resize(static_cast<size_t>(n * k));
  mb.gate_w.resize(static_cast<size_t>(n * k));
  cpu::SelectExperts(gate_, mb.router.data(), n, mb.gate_ids.data(), mb.gate_w.data(),
                     lw.gate_bias.empty() ? nullptr : lw.gate_bias.data(), &mb.gate_scratch);
  for (int32_t id : mb.gate_ids) {
    expert_tokens_[static_cast<size_t>(l * e + id)].fetch_add(1, std::memory_order_relaxed);
  }
}

// At batch 1 the router's product (~14 us on one core for `small`) left the other core idle, and
// the shared experts ran as one task of the routed pass, twice a routed expert's bytes: the pass
// then ended on whichever core took the last large task. In pieces, the router shares a pass
// with the shared experts' gate / up rows and their down rows fill the end of the routed pass.
// The router is one task there (its product inline on one thread) only while that is no more
// than a core's share of the pass (V2's 160 x 5120 router beside int8 shared experts on many
// cores is not); else it runs first, over the whole pool.
void Engine::RouteBesideSharedExperts(int64_t l, const LayerWeights& lw, MicroBatch& mb) {
  const int cores = cpu::ThePool().size();
  mb.shared_split = options_.split_shared_experts && config_.n_shared_experts > 0 &&
                    mb.experts->RunsOnKernelPool() && mb.n <= cores &&
                    mb.shared.Prepare(mb.x.data(), mb.n, lw.shared.gate.ref(), lw.shared.up.ref(),
                                      lw.shared.down.ref(), mb.tmp.data());
  const double router = static_cast<double>(lw.gate.bytes());
  const bool beside =
      mb.shared_split &&
      router * cores <= router + static_cast<double>(lw.shared.gate.bytes() + lw.shared.up.bytes());
  if (!beside) Route(l, lw, mb);
  if (!mb.shared_split) return;
  ++shared_in_pieces_;
  struct Front {  // (one pointer captured: no allocation)
    Engine* engine;
    int64_t l;
    const LayerWeights* lw;
    MicroBatch* mb;
    int first;  // the shared experts' first task (1 after the router's, else 0)
  } front{this, l, &lw, &mb, beside ? 1 : 0};
  cpu::ThePool().RunEach(front.first + mb.shared.fronts(), [f = &front](int i) {
    if (i < f->first) {
      f->engine->Route(f->l, *f->lw, *f->mb);
    } else {
      f->mb->shared.Front(i - f->first);
    }
  });
  mb.shared.Middle();
}

// tmp = the shared experts' output for x (zeros without shared experts); returns its seconds.
double Engine::SharedExperts(const LayerWeights& lw, MicroBatch& mb) {
  auto t0 = Clock::now();
  const int64_t n = mb.n;
  if (config_.n_shared_experts > 0) {
    cpu::SwiGluMlpW(mb.x.data(), n, lw.shared.gate.ref(), lw.shared.up.ref(), lw.shared.down.ref(),
                    mb.tmp.data(), &scratch_);
  } else {
    std::memset(mb.tmp.data(), 0, sizeof(float) * static_cast<size_t>(n * config_.hidden_size));
  }
  return Since(&t0);
}

absl::Status Engine::LayerBack(int64_t l, MicroBatch& mb) {
  if (!mb.in_flight) return absl::OkStatus();  // a dense layer: done in LayerFront
  const ModelConfig& c = config_;
  const LayerWeights& lw = LayerAt(l);
  const int64_t d = c.hidden_size, n = mb.n;
  auto t0 = Clock::now();
  if (mb.shared_split) {  // the shared experts' down rows at the end of the routed pass
    mb.in_flight = false;
    mb.shared_split = false;
    const std::function<void(int)> back = [s = &mb.shared](int i) { s->Back(i); };
    RETURN_IF_ERROR(mb.experts->FinishWithTail(back, mb.shared.backs(), mb.tmp.data()));
    timings_.routed += Since(&t0);  // (the shared experts' time in the router's and this)
    AddResidual(mb.h.data(), mb.tmp.data(), n * d);
    return absl::OkStatus();
  }
  // The shared experts run while the routed ones are at work (remote experts), or beside them in
  // one pass over the kernel pool (in-process ones, where that balances). (One pointer captured:
  // the std::function holds it without allocating.)
  struct Shared {
    Engine* engine;
    const LayerWeights* lw;
    MicroBatch* mb;
    double seconds;
  } job{this, &lw, &mb, 0.0};
  const std::function<void()> shared = [j = &job] {
    j->seconds = j->engine->SharedExperts(*j->lw, *j->mb);
  };
  mb.in_flight = false;
  RETURN_IF_ERROR(
      mb.experts->FinishAfter(shared, static_cast<double>(c.n_shared_experts), mb.tmp.data()));
  // (beside the routed experts, their time is the pass's less the shared experts' own)
  const double all_s = Since(&t0);
  timings_.shared += job.seconds;
  timings_.routed += all_s - job.seconds;
  AddResidual(mb.h.data(), mb.tmp.data(), n * d);
  return absl::OkStatus();
}

// The rows that need logits, then one final norm + lm_head GEMM for all of them.
void Engine::Logits(MicroBatch& mb, const std::vector<float>& norm, bool normed_hidden) {
  const ModelConfig& c = config_;
  const int64_t d = c.hidden_size;
  auto t0 = Clock::now();
  std::vector<SequenceStep>& batch = *mb.batch;
  int64_t out_rows = 0, row = 0;
  for (const SequenceStep& s : batch) out_rows += s.all_logits ? s.tokens.size() : 1;
  final_x_.resize(static_cast<size_t>(out_rows * d));
  out_rows = 0;
  for (const SequenceStep& s : batch) {
    const int64_t m = static_cast<int64_t>(s.tokens.size());
    const int64_t first = s.all_logits ? row : row + m - 1;
    const int64_t rows = s.all_logits ? m : 1;
    cpu::RmsNorm(mb.h.data() + first * d, rows, d, norm.data(), c.rms_norm_eps,
                 final_x_.data() + out_rows * d);
    if (s.hidden != nullptr && normed_hidden) {
      s.hidden->resize(static_cast<size_t>(m * d));
      cpu::RmsNorm(mb.h.data() + row * d, m, d, norm.data(), c.rms_norm_eps, s.hidden->data());
    } else if (s.hidden != nullptr) {
      s.hidden->assign(mb.h.begin() + row * d, mb.h.begin() + (row + m) * d);
    }
    out_rows += rows;
    row += m;
  }
  lm_out_.resize(static_cast<size_t>(out_rows * c.vocab_size));
  cpu::LinearW(final_x_.data(), out_rows, w_->lm_head.ref(), lm_out_.data());
  mb.logits->resize(batch.size());
  out_rows = 0;
  for (size_t i = 0; i < batch.size(); ++i) {
    SequenceStep& s = batch[i];
    const int64_t m = static_cast<int64_t>(s.tokens.size());
    const int64_t rows = s.all_logits ? m : 1;
    const float* src = lm_out_.data() + out_rows * c.vocab_size;
    (*mb.logits)[i].assign(src, src + rows * c.vocab_size);
    out_rows += rows;
    s.cache->Advance(m);
  }
  timings_.lm_head += Since(&t0);
}

// q_ [n, heads, q_head_dim] (through the q LoRA when the model has one) and kva_ [n, latent_dim]
// for the n rows of x.
void Engine::ProjectQueriesAndLatents(const LayerWeights& lw, const float* x, int64_t n) {
  const ModelConfig& c = config_;
  q_.resize(static_cast<size_t>(n * c.num_attention_heads * c.q_head_dim()));
  kva_.resize(static_cast<size_t>(n * c.latent_dim()));
  if (c.q_lora_rank > 0) {
    qa_.resize(static_cast<size_t>(n * c.q_lora_rank));
    cpu::LinearW2(x, n, lw.q_a.ref(), qa_.data(), lw.kv_a.ref(), kva_.data());  // the same x
    cpu::RmsNorm(qa_.data(), n, c.q_lora_rank, lw.q_a_norm.data(), kLatentNormEps, qa_.data());
    cpu::LinearW(qa_.data(), n, lw.q_b.ref(), q_.data());
  } else {
    cpu::LinearW2(x, n, lw.q.ref(), q_.data(), lw.kv_a.ref(), kva_.data());
  }
}

// Every single-token (decode) sequence of the step at once (decode_rows_/caches_/ctx_), into attn_.
void Engine::AttendDecodes(const cpu::MlaParams& p) {
  const int64_t h = config_.num_attention_heads, qd = config_.q_head_dim();
  const int64_t nd = static_cast<int64_t>(decode_rows_.size());
  const int64_t orow = h * config_.v_head_dim;
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

void Engine::Attention(int64_t l, std::vector<SequenceStep>& batch, const float* x, float* out) {
  const ModelConfig& c = config_;
  const LayerWeights& lw = LayerAt(l);
  const int64_t cl = CacheLayer(l);
  const int64_t h = c.num_attention_heads, qd = c.q_head_dim();
  const int64_t r = c.kv_lora_rank, dr = c.qk_rope_head_dim, lc = c.latent_dim();
  int64_t n = 0;
  for (const SequenceStep& s : batch) n += static_cast<int64_t>(s.tokens.size());

  ProjectQueriesAndLatents(lw, x, n);

  attn_.resize(static_cast<size_t>(n * h * c.v_head_dim));
  cpu::MlaParams p;
  p.num_heads = h;
  p.nope_dim = c.qk_nope_head_dim;
  p.rope_dim = dr;
  p.v_dim = c.v_head_dim;
  p.latent_rank = r;
  p.softmax_scale = static_cast<float>(c.SoftmaxScale());
  if (lw.kv_b.format == cpu::WeightFormat::kBf16) {  // row-major: ReadExact never packs it
    p.kv_b_bf16 = lw.kv_b.h.data();
  } else {
    p.kv_b = lw.kv_b.w.data();
  }
  rotated_.resize(static_cast<size_t>(dr));
  kv_row_.resize(static_cast<size_t>(lc));
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
      float* dst = kv_row_.data();
      cpu::RmsNorm(a, 1, r, lw.kv_a_norm.data(), kLatentNormEps, dst);
      rope_.Apply(a + r, pos, dst + r);
      s.cache->WriteRow(cl, pos, dst);
      for (int64_t head = 0; head < h; ++head) {
        float* qpe = q_.data() + ((row + i) * h + head) * qd + c.qk_nope_head_dim;
        rope_.Apply(qpe, pos, rotated);
        std::memcpy(qpe, rotated, sizeof(float) * static_cast<size_t>(dr));
      }
    }
    const bool absorbed = options_.attention_form == AttentionForm::kAbsorbed ||
                          (options_.attention_form == AttentionForm::kAuto &&
                           (m == 1 || cpu::GetKernelMode() == cpu::KernelMode::kInvariant));
    if (absorbed && m == 1) {
      decode_rows_.push_back(row);
      decode_caches_.push_back(s.cache->Rows(cl));
      decode_ctx_.push_back(pos0 + 1);
    } else {
      float* o = attn_.data() + row * h * c.v_head_dim;
      const float* q = q_.data() + row * h * qd;
      if (absorbed) {
        cpu::MlaAttentionAbsorbed(p, q, m, s.cache->Rows(cl), pos0 + m, pos0, o, &scratch_);
      } else {
        cpu::MlaAttentionNaive(p, q, m, s.cache->Rows(cl), pos0 + m, pos0, o, &scratch_);
      }
    }
    row += m;
  }
  if (!decode_rows_.empty()) AttendDecodes(p);
  cpu::LinearW(attn_.data(), n, lw.o.ref(), out);
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
