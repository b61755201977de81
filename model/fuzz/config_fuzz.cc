// libFuzzer target: config.json parsing and validation on arbitrary text.
//
// Checked for every accepted input: the config satisfies its own validation, and
// ParseModelConfig(ModelConfigToJson(c)) gives back a config equal to c in every field (doubles bit
// for bit), whose JSON is again the same text.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>

#include "model/config.h"

namespace {

using dmoe::ModelConfig;

// The helper below compares each field by name; a field added to ModelConfig (or RopeScaling)
// changes the size and stops this build until it is compared too (then update the size).
static_assert(sizeof(ModelConfig) == 400 && sizeof(dmoe::RopeScaling) == 56,
              "ModelConfig changed: compare the new field in FirstDifference, then fix the sizes");

bool SameBits(double a, double b) { return std::memcmp(&a, &b, sizeof(double)) == 0; }

// Name of the first field in which a and b differ, or nullptr when they are equal.
const char* FirstDifference(const ModelConfig& a, const ModelConfig& b) {
#define CMP(f) \
  if (!(a.f == b.f)) return #f
#define CMP_DOUBLE(f) \
  if (!SameBits(a.f, b.f)) return #f
  CMP(model_type);
  CMP(vocab_size);
  CMP(hidden_size);
  CMP(intermediate_size);
  CMP(moe_intermediate_size);
  CMP(num_hidden_layers);
  CMP(num_attention_heads);
  CMP(num_key_value_heads);
  CMP(q_lora_rank);
  CMP(kv_lora_rank);
  CMP(qk_nope_head_dim);
  CMP(qk_rope_head_dim);
  CMP(v_head_dim);
  CMP(n_routed_experts);
  CMP(n_shared_experts);
  CMP(num_experts_per_tok);
  CMP(topk_method);
  CMP(scoring_func);
  CMP(n_group);
  CMP(topk_group);
  CMP_DOUBLE(routed_scaling_factor);
  CMP(norm_topk_prob);
  CMP(first_k_dense_replace);
  CMP(moe_layer_freq);
  CMP(num_nextn_predict_layers);
  CMP_DOUBLE(rms_norm_eps);
  CMP_DOUBLE(rope_theta);
  CMP(rope_scaling.yarn);
  CMP_DOUBLE(rope_scaling.factor);
  CMP(rope_scaling.original_max_position_embeddings);
  CMP_DOUBLE(rope_scaling.beta_fast);
  CMP_DOUBLE(rope_scaling.beta_slow);
  CMP_DOUBLE(rope_scaling.mscale);
  CMP_DOUBLE(rope_scaling.mscale_all_dim);
  CMP(max_position_embeddings);
  CMP(tie_word_embeddings);
  CMP(bos_token_id);
  CMP(eos_token_ids);
  // (From generation_config.json, which this target does not write: unset on both sides.)
  CMP_DOUBLE(sampling_defaults.temperature);
  CMP_DOUBLE(sampling_defaults.top_p);
  CMP_DOUBLE(sampling_defaults.min_p);
  CMP_DOUBLE(sampling_defaults.repetition_penalty);
  CMP(sampling_defaults.top_k);
  CMP(sampling_defaults.problems);
#undef CMP
#undef CMP_DOUBLE
  return nullptr;
}

[[noreturn]] void Fail(const char* what, const char* field, const std::string& json) {
  std::fprintf(stderr, "config_fuzz: %s%s\n--- ModelConfigToJson ---\n%s\n", what,
               field != nullptr ? field : "", json.c_str());
  __builtin_trap();
}

// The equality helper must not be vacuous: changing any one field must make it report that field.
void SelfTestFirstDifference() {
  using Change = void (*)(ModelConfig*);
  static const Change kChanges[] = {
      [](ModelConfig* c) { c->model_type += "x"; },
      [](ModelConfig* c) { ++c->vocab_size; },
      [](ModelConfig* c) { ++c->hidden_size; },
      [](ModelConfig* c) { ++c->intermediate_size; },
      [](ModelConfig* c) { ++c->moe_intermediate_size; },
      [](ModelConfig* c) { ++c->num_hidden_layers; },
      [](ModelConfig* c) { ++c->num_attention_heads; },
      [](ModelConfig* c) { ++c->num_key_value_heads; },
      [](ModelConfig* c) { ++c->q_lora_rank; },
      [](ModelConfig* c) { ++c->kv_lora_rank; },
      [](ModelConfig* c) { ++c->qk_nope_head_dim; },
      [](ModelConfig* c) { ++c->qk_rope_head_dim; },
      [](ModelConfig* c) { ++c->v_head_dim; },
      [](ModelConfig* c) { ++c->n_routed_experts; },
      [](ModelConfig* c) { ++c->n_shared_experts; },
      [](ModelConfig* c) { ++c->num_experts_per_tok; },
      [](ModelConfig* c) { c->topk_method = dmoe::TopkMethod::kGroupLimitedGreedy; },
      [](ModelConfig* c) { c->scoring_func = dmoe::ScoringFunc::kSigmoid; },
      [](ModelConfig* c) { ++c->n_group; },
      [](ModelConfig* c) { ++c->topk_group; },
      [](ModelConfig* c) { c->routed_scaling_factor = -c->routed_scaling_factor; },
      [](ModelConfig* c) { c->norm_topk_prob = !c->norm_topk_prob; },
      [](ModelConfig* c) { ++c->first_k_dense_replace; },
      [](ModelConfig* c) { ++c->moe_layer_freq; },
      [](ModelConfig* c) { ++c->num_nextn_predict_layers; },
      [](ModelConfig* c) { c->rms_norm_eps = -c->rms_norm_eps; },
      [](ModelConfig* c) { c->rope_theta = -c->rope_theta; },
      [](ModelConfig* c) { c->rope_scaling.yarn = !c->rope_scaling.yarn; },
      [](ModelConfig* c) { c->rope_scaling.factor = -c->rope_scaling.factor; },
      [](ModelConfig* c) { ++c->rope_scaling.original_max_position_embeddings; },
      [](ModelConfig* c) { c->rope_scaling.beta_fast = -c->rope_scaling.beta_fast; },
      [](ModelConfig* c) { c->rope_scaling.beta_slow = -c->rope_scaling.beta_slow; },
      [](ModelConfig* c) { c->rope_scaling.mscale = -c->rope_scaling.mscale; },
      // -0.0 == 0.0 as doubles, but not as the bits a round trip must keep.
      [](ModelConfig* c) { c->rope_scaling.mscale_all_dim = -c->rope_scaling.mscale_all_dim; },
      [](ModelConfig* c) { ++c->max_position_embeddings; },
      [](ModelConfig* c) { c->tie_word_embeddings = !c->tie_word_embeddings; },
      [](ModelConfig* c) { ++c->bos_token_id; },
      [](ModelConfig* c) { c->eos_token_ids.push_back(0); },
  };
  const ModelConfig base;
  if (FirstDifference(base, base) != nullptr)
    Fail("self-test: a config differs from itself", "", "");
  for (const Change change : kChanges) {
    ModelConfig changed = base;
    change(&changed);
    if (FirstDifference(base, changed) == nullptr) {
      Fail("self-test: FirstDifference missed a changed field", "",
           dmoe::ModelConfigToJson(changed));
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int* /*argc*/, char*** /*argv*/) {
  SelfTestFirstDifference();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto c = dmoe::ParseModelConfig(std::string(reinterpret_cast<const char*>(data), size));
  if (!c.ok()) return 0;
  if (!dmoe::ValidateModelConfig(*c).ok()) Fail("accepted config fails its own validation", "", "");
  const std::string json = dmoe::ModelConfigToJson(*c);
  auto back = dmoe::ParseModelConfig(json);
  if (!back.ok()) {
    Fail("ModelConfigToJson output is rejected: ", std::string(back.status().message()).c_str(),
         json);
  }
  if (const char* field = FirstDifference(*c, *back)) {
    Fail("round trip changed field ", field, json);
  }
  if (dmoe::ModelConfigToJson(*back) != json)
    Fail("ModelConfigToJson is not a fixed point", "", json);
  return 0;
}
