// DeepSeek-V2 / V3 `config.json`: every field MODEL_SPEC.md lists, with the defaults of the
// original `DeepseekV2Config` where a field is absent, validated with errors that name the field.
#ifndef DMOE_MODEL_CONFIG_H_
#define DMOE_MODEL_CONFIG_H_

#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace dmoe {

// V2: greedy / group_limited_greedy over softmax scores. V3: noaux_tc (sigmoid scores, a
// selection bias, groups ranked by the sum of their two largest biased scores).
enum class TopkMethod { kGreedy, kGroupLimitedGreedy, kNoauxTc };
enum class ScoringFunc { kSoftmax, kSigmoid };

struct RopeScaling {
  bool yarn = false;  // false: plain RoPE (no `rope_scaling`)
  double factor = 1.0;
  int64_t original_max_position_embeddings = 4096;
  double beta_fast = 32.0;
  double beta_slow = 1.0;
  double mscale = 1.0;
  double mscale_all_dim = 0.0;
};

struct ModelConfig {
  std::string model_type = "deepseek_v2";  // or "deepseek_v3"
  int64_t vocab_size = 102400;
  int64_t hidden_size = 4096;
  int64_t intermediate_size = 11008;
  int64_t moe_intermediate_size = 1407;
  int64_t num_hidden_layers = 30;
  int64_t num_attention_heads = 32;
  int64_t num_key_value_heads = 32;
  int64_t q_lora_rank = 1536;  // 0: `null`, a plain q_proj (V2-Lite)
  int64_t kv_lora_rank = 512;
  int64_t qk_nope_head_dim = 128;
  int64_t qk_rope_head_dim = 64;
  int64_t v_head_dim = 128;
  int64_t n_routed_experts = 0;  // 0: `null`, no MoE layers
  int64_t n_shared_experts = 0;  // 0: `null`, no shared expert
  int64_t num_experts_per_tok = 0;
  TopkMethod topk_method = TopkMethod::kGreedy;
  ScoringFunc scoring_func = ScoringFunc::kSoftmax;
  int64_t n_group = 0;     // 0: `null`
  int64_t topk_group = 0;  // 0: `null`
  double routed_scaling_factor = 1.0;
  bool norm_topk_prob = false;
  int64_t first_k_dense_replace = 0;
  int64_t moe_layer_freq = 1;
  // V3's multi-token-prediction layers (0 or 1), stored as layer index num_hidden_layers.
  int64_t num_nextn_predict_layers = 0;
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  RopeScaling rope_scaling;
  int64_t max_position_embeddings = 2048;
  bool tie_word_embeddings = false;
  int64_t bos_token_id = -1;  // -1: absent
  // End of sequence: config.json's `eos_token_id` (an int or a list), replaced by
  // generation_config.json's when that file names one (as Hugging Face's generate() does).
  // Generation stops at any of them unless a request sets ignore_eos.
  std::vector<int64_t> eos_token_ids;
  // generation_config.json's sampling fields, NaN (top_k: -1) where it has none: the defaults of
  // an OpenAI API request that omits them (as vLLM's --generation-config auto; DeepSeek's chat
  // checkpoints ship e.g. temperature 0.3 or 0.6 and top_p 0.95 there).
  struct SamplingDefaults {
    double temperature = std::numeric_limits<double>::quiet_NaN();
    double top_p = std::numeric_limits<double>::quiet_NaN();
    double min_p = std::numeric_limits<double>::quiet_NaN();
    double repetition_penalty = std::numeric_limits<double>::quiet_NaN();
    int64_t top_k = -1;
    // Fields of the file that were mistyped or out of range, so not taken ("top_p: 1.5 is
    // outside (0, 1]"): logged by the gateway, never an error (these are only defaults).
    std::vector<std::string> problems;
    // "temperature=0.6 top_p=0.95" (what is set), "" when nothing is.
    std::string ToString() const;
  } sampling_defaults;

  int64_t q_head_dim() const { return qk_nope_head_dim + qk_rope_head_dim; }
  // Values per token per layer in the latent KV cache: c_kv plus the rotated k_pe.
  int64_t latent_dim() const { return kv_lora_rank + qk_rope_head_dim; }
  bool is_v3() const { return model_type == "deepseek_v3"; }
  // MoE gating: V3 normalizes the top-k weights and then scales them; V2 normalizes or scales.
  bool ScaleAfterNorm() const { return is_v3(); }
  // Layers whose routed experts exist: the decoder layers plus the MTP layer.
  int64_t num_expert_layers() const { return num_hidden_layers + num_nextn_predict_layers; }
  bool IsMoeLayer(int64_t layer) const {
    return n_routed_experts > 0 && layer >= first_k_dense_replace && layer % moe_layer_freq == 0;
  }
  // A MoE layer whose routed experts exist: a decoder layer's or the MTP layer's.
  bool IsExpertLayer(int64_t layer) const {
    return layer >= 0 && layer < num_expert_layers() && IsMoeLayer(layer);
  }
  // Attention softmax scale, including YaRN's mscale(s, mscale_all_dim)^2.
  double SoftmaxScale() const;
  // Multiplier of the RoPE cos/sin tables: mscale(s, mscale) / mscale(s, mscale_all_dim).
  double RopeMscale() const;
};

// Parses and validates config.json text. INVALID_ARGUMENT naming the field on any problem.
absl::StatusOr<ModelConfig> ParseModelConfig(absl::string_view json_text);
// Reads DIR/config.json.
absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& model_dir);
// Checks the cross-field rules (also run by ParseModelConfig).
absl::Status ValidateModelConfig(const ModelConfig& c);
// Writes every field (nothing left to defaults), as the tiny-model generator does.
std::string ModelConfigToJson(const ModelConfig& c);
// 16 hex digits identifying the model's shape and numerics-relevant settings (a hash of
// ModelConfigToJson): equal for equal configs. The router refuses nodes whose model differs.
std::string ModelFingerprint(const ModelConfig& c);

// YaRN's get_mscale: 1 when scale <= 1, else 0.1 * m * ln(scale) + 1.
double YarnGetMscale(double scale, double m);

}  // namespace dmoe

#endif  // DMOE_MODEL_CONFIG_H_
