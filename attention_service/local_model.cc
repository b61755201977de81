#include "attention_service/local_model.h"

#include <chrono>
#include <cmath>
#include <cstdio>
#include <random>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace dmoe {

absl::StatusOr<std::unique_ptr<LocalModel>> LocalModel::Load(const std::string& dir,
                                                             const LocalModelOptions& options) {
  const auto start = std::chrono::steady_clock::now();
  auto m = std::unique_ptr<LocalModel>(new LocalModel());
  ASSIGN_OR_RETURN(m->config_, LoadModelConfig(dir));
  ASSIGN_OR_RETURN(std::unique_ptr<Checkpoint> ck, Checkpoint::Open(dir));
  const bool remote = !options.expert_shards.empty() || !options.shard_client.router.empty();
  std::unique_ptr<LoadProgress> progress;
  if (options.log_progress) {
    // Everything but the routed experts when they are remote (MTP layers are not read: the
    // totals may stay above what is read; the last line says what was).
    uint64_t tensors = 0;
    const uint64_t bytes = ck->BytesOf(
        [remote](const std::string& name) {
          return !remote || name.find(".mlp.experts.") == std::string::npos;
        },
        &tensors);
    progress = std::make_unique<LoadProgress>(
        absl::StrCat("loading ", dir, remote ? " (without the routed experts)" : ""), tensors,
        bytes);
    ck->set_progress(progress.get());
  }
  ASSIGN_OR_RETURN(m->dense_, LoadDenseWeights(*ck, m->config_, options.weight_dtype));
  RoutedExperts* routed = nullptr;
  if (!remote) {
    ASSIGN_OR_RETURN(m->experts_,
                     ExpertStore::Load(*ck, m->config_, ExpertStore::AllExperts(m->config_),
                                       options.expert_dtype));
    m->routed_ = std::make_unique<LocalRoutedExperts>(m->config_, m->experts_.get(),
                                                      options.expert_accelerator);
    routed = m->routed_.get();
  }
  if (progress != nullptr) {
    progress->Done();
    ck->set_progress(nullptr);
  }
  if (remote) {
    m->experts_ = std::make_unique<ExpertStore>();
    if (!options.shard_client.router.empty()) {
      ASSIGN_OR_RETURN(m->shards_, ExpertShardSet::ConnectRouter(m->config_, options.shard_client));
    } else {
      ASSIGN_OR_RETURN(m->shards_, ExpertShardSet::Connect(m->config_, options.expert_shards,
                                                           options.shard_client));
    }
    routed = m->shards_->experts();
  }
  m->routed_experts_ = routed;
  m->engine_ = std::make_unique<Engine>(m->config_, &m->dense_, routed, options.engine);
  if (options.log_progress) {
    const double s =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    std::fprintf(
        stderr, "model ready: %.1f MiB of weights, %.2f s%s\n",
        static_cast<double>(ck->bytes_read()) / (1 << 20), s,
        !remote ? ""
        : m->shards_->member() != nullptr
            ? absl::StrCat("; routed experts on the shards of placement ", m->shards_->version(),
                           " from router ", options.shard_client.router)
                  .c_str()
            : absl::StrCat("; routed experts on ", options.expert_shards.size(), " shard(s)")
                  .c_str());
  }
  return m;
}

uint64_t LocalModel::weight_bytes() const {
  uint64_t n = dense_.embed.bytes() + 4 * dense_.final_norm.size() + dense_.lm_head.bytes();
  for (const LayerWeights& l : dense_.layers) {
    n += 4 * (l.input_norm.size() + l.post_norm.size() + l.q_a_norm.size() + l.kv_a_norm.size());
    for (const LinearWeight* w :
         {&l.q_a, &l.q_b, &l.q, &l.kv_a, &l.kv_b, &l.o, &l.dense.gate, &l.dense.up, &l.dense.down,
          &l.gate, &l.shared.gate, &l.shared.up, &l.shared.down}) {
      n += w->bytes();
    }
  }
  return n + experts_->bytes();
}

absl::StatusOr<std::vector<int32_t>> Generate(StepEngine& engine,
                                              const std::vector<int32_t>& prompt,
                                              const GenerateOptions& options) {
  const ModelConfig& c = engine.config();
  SamplingParams sp;
  sp.temperature = options.temperature;
  sp.top_k = options.top_k;
  sp.top_p = options.top_p;
  sp.min_p = options.min_p;
  sp.seed = options.seed;
  sp.max_tokens = options.max_tokens;
  if (options.stop_token >= 0) sp.stop_token_ids.push_back(options.stop_token);
  sp.ignore_eos = options.ignore_eos;
  RETURN_IF_ERROR(ValidateRequest(prompt, sp, c));
  std::unique_ptr<KvSequence> cache = engine.NewSequence();
  std::vector<SequenceStep> batch(1);
  batch[0].cache = cache.get();
  std::vector<std::vector<float>> logits;
  const size_t chunk =
      options.prefill_chunk > 0 ? static_cast<size_t>(options.prefill_chunk) : prompt.size();
  for (size_t at = 0; at < prompt.size(); at += chunk) {
    const size_t end = std::min(prompt.size(), at + chunk);
    batch[0].tokens.assign(prompt.begin() + static_cast<long>(at),
                           prompt.begin() + static_cast<long>(end));
    RETURN_IF_ERROR(engine.Step(batch, &logits));
  }
  Sampler sampler(sp, prompt);
  std::vector<int32_t> out;
  for (int64_t i = 0; i < options.max_tokens; ++i) {
    const int32_t next = sampler.Sample(logits[0].data(), c.vocab_size).token;
    out.push_back(next);
    if (IsStopToken(sp, c, next) || i + 1 == options.max_tokens) break;
    batch[0].tokens.assign(1, next);
    RETURN_IF_ERROR(engine.Step(batch, &logits));
  }
  return out;
}

}  // namespace dmoe
