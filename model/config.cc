#include "model/config.h"

#include <cmath>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "nlohmann/json.hpp"

namespace dmoe {
namespace {

using Json = nlohmann::json;

absl::Status FieldError(absl::string_view field, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat("config.json: field ", field, ": ", what));
}

std::string TypeName(const Json& v) { return v.type_name(); }

// Reads an optional integer field. `*present` tells whether it was there and not null.
absl::Status GetInt(const Json& obj, const char* name, int64_t* out,
                    const std::string& prefix = "") {
  const std::string field = prefix + name;
  auto it = obj.find(name);
  if (it == obj.end() || it->is_null()) return absl::OkStatus();
  if (it->is_number_integer()) {
    *out = it->get<int64_t>();
  } else if (it->is_number_float()) {
    const double d = it->get<double>();
    if (!(std::floor(d) == d) || std::fabs(d) > 9e15) {
      return FieldError(field, absl::StrCat("expected an integer, got ", it->dump()));
    }
    *out = static_cast<int64_t>(d);
  } else {
    return FieldError(field, absl::StrCat("expected an integer, got ", TypeName(*it)));
  }
  return absl::OkStatus();
}

// A token id or a list of them (eos_token_id); absent or null leaves *out unchanged.
absl::Status GetIdList(const Json& obj, const char* name, std::vector<int64_t>* out) {
  auto it = obj.find(name);
  if (it == obj.end() || it->is_null()) return absl::OkStatus();
  std::vector<int64_t> ids;
  if (it->is_array()) {
    for (size_t i = 0; i < it->size(); ++i) {
      const Json& v = (*it)[i];
      if (!v.is_number_integer() || v.get<int64_t>() < 0) {
        return FieldError(absl::StrCat(name, "[", i, "]"),
                          absl::StrCat("expected a token id, got ", v.dump()));
      }
      ids.push_back(v.get<int64_t>());
    }
  } else if (it->is_number_integer() && it->get<int64_t>() >= 0) {
    ids.push_back(it->get<int64_t>());
  } else {
    return FieldError(name,
                      absl::StrCat("expected a token id or a list of them, got ", it->dump()));
  }
  *out = std::move(ids);
  return absl::OkStatus();
}

absl::Status GetDouble(const Json& obj, const char* name, double* out,
                       const std::string& prefix = "") {
  const std::string field = prefix + name;
  auto it = obj.find(name);
  if (it == obj.end() || it->is_null()) return absl::OkStatus();
  if (!it->is_number()) {
    return FieldError(field, absl::StrCat("expected a number, got ", TypeName(*it)));
  }
  *out = it->get<double>();
  if (!std::isfinite(*out)) return FieldError(field, "must be finite");
  return absl::OkStatus();
}

absl::Status GetBool(const Json& obj, const char* name, bool* out) {
  auto it = obj.find(name);
  if (it == obj.end() || it->is_null()) return absl::OkStatus();
  if (!it->is_boolean()) {
    return FieldError(name, absl::StrCat("expected true or false, got ", TypeName(*it)));
  }
  *out = it->get<bool>();
  return absl::OkStatus();
}

absl::Status GetString(const Json& obj, const char* name, std::string* out, bool* present) {
  *present = false;
  auto it = obj.find(name);
  if (it == obj.end() || it->is_null()) return absl::OkStatus();
  if (!it->is_string()) {
    return FieldError(name, absl::StrCat("expected a string, got ", TypeName(*it)));
  }
  *out = it->get<std::string>();
  *present = true;
  return absl::OkStatus();
}

// `rope_scaling` (original) or `rope_parameters` (HF >= v5; also carries rope_theta).
absl::Status ParseRope(const Json& obj, const char* field, ModelConfig* c) {
  auto it = obj.find(field);
  if (it == obj.end() || it->is_null()) return absl::OkStatus();
  if (!it->is_object()) {
    return FieldError(field, absl::StrCat("expected an object or null, got ", TypeName(*it)));
  }
  const Json& r = *it;
  std::string type;
  bool has_type = false;
  if (auto s = GetString(r, "type", &type, &has_type); !s.ok()) {
    return FieldError(absl::StrCat(field, ".type"), "expected a string");
  }
  if (!has_type) {
    if (auto s = GetString(r, "rope_type", &type, &has_type); !s.ok()) {
      return FieldError(absl::StrCat(field, ".rope_type"), "expected a string");
    }
  }
  const std::string prefix = absl::StrCat(field, ".");
  if (std::string(field) == "rope_parameters") {
    if (auto s = GetDouble(r, "rope_theta", &c->rope_theta, prefix); !s.ok()) return s;
  }
  if (!has_type || type == "default") {
    if (std::string(field) == "rope_scaling") {
      return FieldError(absl::StrCat(field, ".type"), "missing (expected \"yarn\")");
    }
    return absl::OkStatus();
  }
  if (type != "yarn") {
    return FieldError(absl::StrCat(field, ".type"),
                      absl::StrCat("\"", type, "\" is not supported (only \"yarn\")"));
  }
  RopeScaling& y = c->rope_scaling;
  y = RopeScaling();
  y.yarn = true;
  if (r.find("factor") == r.end()) return FieldError(absl::StrCat(field, ".factor"), "missing");
  if (auto s = GetDouble(r, "factor", &y.factor, prefix); !s.ok()) return s;
  if (auto s = GetInt(r, "original_max_position_embeddings", &y.original_max_position_embeddings,
                      prefix);
      !s.ok())
    return s;
  if (auto s = GetDouble(r, "beta_fast", &y.beta_fast, prefix); !s.ok()) return s;
  if (auto s = GetDouble(r, "beta_slow", &y.beta_slow, prefix); !s.ok()) return s;
  if (auto s = GetDouble(r, "mscale", &y.mscale, prefix); !s.ok()) return s;
  if (auto s = GetDouble(r, "mscale_all_dim", &y.mscale_all_dim, prefix); !s.ok()) return s;
  return absl::OkStatus();
}

absl::Status Positive(const char* name, int64_t v) {
  if (v <= 0) return FieldError(name, absl::StrCat("must be positive, got ", v));
  return absl::OkStatus();
}

// Sizes beyond what any DeepSeek checkpoint has (V3: 61 layers, 256 experts, 7168 hidden, 163840
// positions, 129280 tokens), far beyond: they size tables before any tensor can contradict them
// (RoPE tables, per-layer and per-expert arrays, KV block sizes), so a typo would otherwise mean
// an abort on a failed allocation, or an overflowed product.
absl::Status AtMost(const char* name, int64_t v, int64_t max) {
  if (v > max) return FieldError(name, absl::StrCat(v, " exceeds dmoe's limit of ", max));
  return absl::OkStatus();
}

absl::Status Bounded(const ModelConfig& c) {
  const std::pair<const char*, std::pair<int64_t, int64_t>> limits[] = {
      {"vocab_size", {c.vocab_size, int64_t{1} << 24}},
      {"hidden_size", {c.hidden_size, int64_t{1} << 16}},
      {"num_hidden_layers", {c.num_hidden_layers, 1024}},
      {"num_attention_heads", {c.num_attention_heads, 1024}},
      {"kv_lora_rank", {c.kv_lora_rank, int64_t{1} << 16}},
      {"q_lora_rank", {c.q_lora_rank, int64_t{1} << 16}},
      {"qk_nope_head_dim", {c.qk_nope_head_dim, 4096}},
      {"qk_rope_head_dim", {c.qk_rope_head_dim, 4096}},
      {"v_head_dim", {c.v_head_dim, 4096}},
      {"max_position_embeddings", {c.max_position_embeddings, int64_t{1} << 21}},
      {"intermediate_size", {c.intermediate_size, int64_t{1} << 18}},
      {"moe_intermediate_size", {c.moe_intermediate_size, int64_t{1} << 18}},
      {"n_routed_experts", {c.n_routed_experts, 4096}},
      {"n_shared_experts", {c.n_shared_experts, 64}},
      {"first_k_dense_replace", {c.first_k_dense_replace, 1024}},
  };
  for (const auto& [name, vm] : limits) {
    if (auto s = AtMost(name, vm.first, vm.second); !s.ok()) return s;
  }
  return absl::OkStatus();
}

}  // namespace

double YarnGetMscale(double scale, double m) {
  if (scale <= 1.0) return 1.0;
  return 0.1 * m * std::log(scale) + 1.0;
}

double ModelConfig::SoftmaxScale() const {
  double scale = 1.0 / std::sqrt(static_cast<double>(q_head_dim()));
  if (rope_scaling.yarn && rope_scaling.mscale_all_dim != 0.0) {
    const double m = YarnGetMscale(rope_scaling.factor, rope_scaling.mscale_all_dim);
    scale *= m * m;
  }
  return scale;
}

double ModelConfig::RopeMscale() const {
  if (!rope_scaling.yarn) return 1.0;
  return YarnGetMscale(rope_scaling.factor, rope_scaling.mscale) /
         YarnGetMscale(rope_scaling.factor, rope_scaling.mscale_all_dim);
}

namespace {

// The attention and layer shape: dimensions, MLA's constraints, norms, dense layers.
absl::Status ValidateShape(const ModelConfig& c) {
  if (auto s = Positive("vocab_size", c.vocab_size); !s.ok()) return s;
  if (auto s = Bounded(c); !s.ok()) return s;
  for (int64_t id : c.eos_token_ids) {
    if (id >= c.vocab_size) {
      return FieldError("eos_token_id",
                        absl::StrCat(id, " is outside the vocabulary (", c.vocab_size, ")"));
    }
  }
  if (auto s = Positive("hidden_size", c.hidden_size); !s.ok()) return s;
  if (auto s = Positive("num_hidden_layers", c.num_hidden_layers); !s.ok()) return s;
  if (auto s = Positive("num_attention_heads", c.num_attention_heads); !s.ok()) return s;
  if (auto s = Positive("kv_lora_rank", c.kv_lora_rank); !s.ok()) return s;
  if (auto s = Positive("qk_nope_head_dim", c.qk_nope_head_dim); !s.ok()) return s;
  if (auto s = Positive("qk_rope_head_dim", c.qk_rope_head_dim); !s.ok()) return s;
  if (auto s = Positive("v_head_dim", c.v_head_dim); !s.ok()) return s;
  if (auto s = Positive("max_position_embeddings", c.max_position_embeddings); !s.ok()) return s;
  if (c.qk_rope_head_dim % 2 != 0) {
    return FieldError("qk_rope_head_dim", absl::StrCat(c.qk_rope_head_dim, " must be even"));
  }
  if (c.q_lora_rank < 0) return FieldError("q_lora_rank", "must be positive or null");
  if (c.num_key_value_heads != c.num_attention_heads) {
    return FieldError("num_key_value_heads",
                      absl::StrCat(c.num_key_value_heads, " must equal num_attention_heads ",
                                   c.num_attention_heads, " (MLA)"));
  }
  if (!(c.rms_norm_eps > 0)) return FieldError("rms_norm_eps", "must be positive");
  if (!(c.rope_theta > 1.0)) return FieldError("rope_theta", "must be greater than 1");
  if (c.first_k_dense_replace < 0) return FieldError("first_k_dense_replace", "must be >= 0");
  if (c.moe_layer_freq <= 0) return FieldError("moe_layer_freq", "must be positive");
  // Some layer is dense (not IsMoeLayer) iff there are no routed experts, layer 0 is dense, or
  // layer 1 exists and moe_layer_freq skips it. Closed form: num_hidden_layers is untrusted (a loop
  // over 10^13 layers hangs).
  const bool any_dense = c.n_routed_experts <= 0 || c.first_k_dense_replace > 0 ||
                         (c.moe_layer_freq > 1 && c.num_hidden_layers > 1);
  if (any_dense) {
    if (auto s = Positive("intermediate_size", c.intermediate_size); !s.ok()) return s;
  }
  if (c.num_nextn_predict_layers < 0 || c.num_nextn_predict_layers > 1) {
    return FieldError("num_nextn_predict_layers",
                      absl::StrCat(c.num_nextn_predict_layers, " is not supported (0 or 1)"));
  }
  // -1 stands for absent (written as null).
  if (c.bos_token_id < -1) return FieldError("bos_token_id", "must be a token id (>= 0) or null");
  return absl::OkStatus();
}

const char* TopkMethodName(TopkMethod m) {
  switch (m) {
    case TopkMethod::kGreedy:
      return "greedy";
    case TopkMethod::kGroupLimitedGreedy:
      return "group_limited_greedy";
    case TopkMethod::kNoauxTc:
      return "noaux_tc";
  }
  return "?";
}

// Which scoring goes with which selection, in which model, and the MTP layer count.
absl::Status ValidateGateKind(const ModelConfig& c) {
  const bool noaux = c.topk_method == TopkMethod::kNoauxTc;
  if (noaux != (c.scoring_func == ScoringFunc::kSigmoid)) {
    return FieldError("scoring_func", noaux ? "must be sigmoid with topk_method noaux_tc"
                                            : "sigmoid needs topk_method noaux_tc");
  }
  if (noaux && !c.is_v3()) {
    return FieldError("topk_method", "noaux_tc needs model_type deepseek_v3");
  }
  if (noaux && c.n_group > 0 && c.n_routed_experts / c.n_group < 2) {
    return FieldError("n_group",
                      "noaux_tc ranks groups by their two best experts: each group "
                      "needs at least 2");
  }
  return absl::OkStatus();
}

// The routed experts and their gate.
absl::Status ValidateMoe(const ModelConfig& c) {
  if (c.n_routed_experts < 0) return FieldError("n_routed_experts", "must be positive or null");
  // ModelConfigToJson writes these as null unless positive, so a negative value would not survive a
  // round trip: reject it even where the field is unused (no routed experts, greedy routing).
  if (c.n_shared_experts < 0) return FieldError("n_shared_experts", "must be >= 0 or null");
  if (c.num_experts_per_tok < 0) {
    return FieldError("num_experts_per_tok", "must be positive or null");
  }
  if (c.n_group < 0) return FieldError("n_group", "must be positive or null");
  if (c.topk_group < 0) return FieldError("topk_group", "must be positive or null");
  if (c.n_routed_experts <= 0) return absl::OkStatus();
  {
    const int64_t e = c.n_routed_experts;
    if (auto s = Positive("moe_intermediate_size", c.moe_intermediate_size); !s.ok()) return s;
    if (c.num_experts_per_tok <= 0) {
      return FieldError("num_experts_per_tok", "must be set and positive when n_routed_experts is");
    }
    if (c.num_experts_per_tok > e) {
      return FieldError("num_experts_per_tok",
                        absl::StrCat(c.num_experts_per_tok, " exceeds n_routed_experts ", e));
    }
    if (!(c.routed_scaling_factor > 0)) {
      return FieldError("routed_scaling_factor", "must be positive");
    }
    if (c.n_group > 0 && e % c.n_group != 0) {
      return FieldError("n_group", absl::StrCat("n_routed_experts ", e,
                                                " is not divisible by n_group ", c.n_group));
    }
    if (auto s = ValidateGateKind(c); !s.ok()) return s;
    if (c.topk_method != TopkMethod::kGreedy) {
      if (c.n_group <= 0) {
        return FieldError(
            "n_group", absl::StrCat("must be set for topk_method ", TopkMethodName(c.topk_method)));
      }
      if (c.topk_group <= 0 || c.topk_group > c.n_group) {
        return FieldError("topk_group",
                          absl::StrCat(c.topk_group, " must be in [1, n_group ", c.n_group, "]"));
      }
      if (c.num_experts_per_tok > c.topk_group * (e / c.n_group)) {
        return FieldError(
            "num_experts_per_tok",
            absl::StrCat(c.num_experts_per_tok, " exceeds the ", c.topk_group * (e / c.n_group),
                         " experts of topk_group groups"));
      }
    }
  }
  return absl::OkStatus();
}

absl::Status ValidateYarn(const ModelConfig& c) {
  if (c.rope_scaling.yarn) {
    const RopeScaling& y = c.rope_scaling;
    if (!(y.factor > 0)) return FieldError("rope_scaling.factor", "must be positive");
    if (y.original_max_position_embeddings <= 0) {
      return FieldError("rope_scaling.original_max_position_embeddings", "must be positive");
    }
    if (!(y.beta_fast > 0) || !(y.beta_slow > 0)) {
      return FieldError("rope_scaling.beta_fast", "beta_fast and beta_slow must be positive");
    }
    if (!std::isfinite(y.factor) || y.factor > 1e6) {
      return FieldError("rope_scaling.factor", "must be finite (at most 10^6)");
    }
    // (A negative one can make YaRN's magnitude scale 0: the attention scale infinite.)
    if (!(y.mscale >= 0) || !std::isfinite(y.mscale)) {
      return FieldError("rope_scaling.mscale", "must be finite and >= 0");
    }
    if (!(y.mscale_all_dim >= 0) || !std::isfinite(y.mscale_all_dim)) {
      return FieldError("rope_scaling.mscale_all_dim", "must be finite and >= 0");
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status ValidateModelConfig(const ModelConfig& c) {
  if (auto s = ValidateShape(c); !s.ok()) return s;
  if (auto s = ValidateMoe(c); !s.ok()) return s;
  return ValidateYarn(c);
}

namespace {

// model_type, hidden_act, attention_bias: what this implementation can run at all.
absl::Status ParseKind(const Json& j, ModelConfig* out) {
  ModelConfig& c = *out;
  bool present = false;
  std::string s;
  if (auto st = GetString(j, "model_type", &s, &present); !st.ok()) return st;
  if (present) {
    if (s != "deepseek_v2" && s != "deepseek_v3") {
      return FieldError("model_type",
                        absl::StrCat("\"", s, "\" is not deepseek_v2 or deepseek_v3"));
    }
    c.model_type = s;
  }
  if (auto st = GetString(j, "hidden_act", &s, &present); !st.ok()) return st;
  if (present && s != "silu") {
    return FieldError("hidden_act", absl::StrCat("\"", s, "\" is not supported (only silu)"));
  }
  bool bias = false;
  if (auto st = GetBool(j, "attention_bias", &bias); !st.ok()) return st;
  if (bias) return FieldError("attention_bias", "true is not supported");
  return absl::OkStatus();
}

// The integer, float and boolean fields.
absl::Status ParseNumbers(const Json& j, ModelConfig* out) {
  ModelConfig& c = *out;
  struct IntField {
    const char* name;
    int64_t* dst;
  };
  const IntField ints[] = {
      {"vocab_size", &c.vocab_size},
      {"hidden_size", &c.hidden_size},
      {"intermediate_size", &c.intermediate_size},
      {"moe_intermediate_size", &c.moe_intermediate_size},
      {"num_hidden_layers", &c.num_hidden_layers},
      {"num_attention_heads", &c.num_attention_heads},
      {"kv_lora_rank", &c.kv_lora_rank},
      {"qk_nope_head_dim", &c.qk_nope_head_dim},
      {"qk_rope_head_dim", &c.qk_rope_head_dim},
      {"v_head_dim", &c.v_head_dim},
      {"n_shared_experts", &c.n_shared_experts},
      {"n_routed_experts", &c.n_routed_experts},
      {"num_experts_per_tok", &c.num_experts_per_tok},
      {"n_group", &c.n_group},
      {"topk_group", &c.topk_group},
      {"first_k_dense_replace", &c.first_k_dense_replace},
      {"moe_layer_freq", &c.moe_layer_freq},
      {"max_position_embeddings", &c.max_position_embeddings},
      {"bos_token_id", &c.bos_token_id},
      {"num_nextn_predict_layers", &c.num_nextn_predict_layers},
  };
  for (const IntField& f : ints) {
    if (auto st = GetInt(j, f.name, f.dst); !st.ok()) return st;
  }
  if (auto st = GetIdList(j, "eos_token_id", &c.eos_token_ids); !st.ok()) return st;
  // q_lora_rank: absent means the default 1536, an explicit null means a plain q_proj.
  if (auto it = j.find("q_lora_rank"); it != j.end() && it->is_null()) {
    c.q_lora_rank = 0;
  } else if (auto st = GetInt(j, "q_lora_rank", &c.q_lora_rank); !st.ok()) {
    return st;
  } else if (it != j.end() && c.q_lora_rank == 0) {
    return FieldError("q_lora_rank", "must be positive or null");
  }
  c.num_key_value_heads = c.num_attention_heads;
  if (auto st = GetInt(j, "num_key_value_heads", &c.num_key_value_heads); !st.ok()) return st;

  if (auto st = GetDouble(j, "routed_scaling_factor", &c.routed_scaling_factor); !st.ok()) {
    return st;
  }
  if (auto st = GetDouble(j, "rms_norm_eps", &c.rms_norm_eps); !st.ok()) return st;
  if (auto st = GetDouble(j, "rope_theta", &c.rope_theta); !st.ok()) return st;
  if (auto st = GetBool(j, "norm_topk_prob", &c.norm_topk_prob); !st.ok()) return st;
  if (auto st = GetBool(j, "tie_word_embeddings", &c.tie_word_embeddings); !st.ok()) return st;
  return absl::OkStatus();
}

// topk_method and scoring_func.
absl::Status ParseGate(const Json& j, ModelConfig* out) {
  ModelConfig& c = *out;
  bool present = false;
  std::string s;
  if (auto st = GetString(j, "topk_method", &s, &present); !st.ok()) return st;
  if (present) {
    if (s == "greedy" || s == "gready") {
      c.topk_method = TopkMethod::kGreedy;
    } else if (s == "group_limited_greedy") {
      c.topk_method = TopkMethod::kGroupLimitedGreedy;
    } else if (s == "noaux_tc") {
      c.topk_method = TopkMethod::kNoauxTc;
    } else {
      return FieldError("topk_method", absl::StrCat("unknown method \"", s, "\""));
    }
  }
  if (auto st = GetString(j, "scoring_func", &s, &present); !st.ok()) return st;
  if (present) {
    if (s == "softmax") {
      c.scoring_func = ScoringFunc::kSoftmax;
    } else if (s == "sigmoid") {
      c.scoring_func = ScoringFunc::kSigmoid;
    } else {
      return FieldError("scoring_func",
                        absl::StrCat("\"", s, "\" is not supported (softmax or sigmoid)"));
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<ModelConfig> ParseModelConfig(absl::string_view json_text) {
  Json j = Json::parse(json_text.begin(), json_text.end(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return absl::InvalidArgumentError("config.json: not valid JSON");
  if (!j.is_object()) return absl::InvalidArgumentError("config.json: top level is not an object");
  ModelConfig c;
  if (auto st = ParseKind(j, &c); !st.ok()) return st;
  if (auto st = ParseNumbers(j, &c); !st.ok()) return st;
  if (auto st = ParseGate(j, &c); !st.ok()) return st;
  if (auto st = ParseRope(j, "rope_scaling", &c); !st.ok()) return st;
  if (j.contains("rope_parameters") && !c.rope_scaling.yarn) {
    if (auto st = ParseRope(j, "rope_parameters", &c); !st.ok()) return st;
  }
  if (auto st = ValidateModelConfig(c); !st.ok()) return st;
  return c;
}

namespace {

// generation_config.json's sampling fields, each checked against the range a request may give.
// A field that is mistyped or out of range is left unset and described in d->problems (the
// gateway logs them): these are only defaults of the OpenAI API, and a checkpoint must not fail
// to load over one. Values equal to Hugging Face's own defaults (top_k 50, and 1.0 for the
// others) are dropped as vLLM's to_diff_dict() drops them: they are not the checkpoint's choice.
void ParseSamplingDefaults(const Json& g, ModelConfig::SamplingDefaults* d) {
  struct Field {
    const char* name;
    double* out;
    double lo, hi, hf_default;
    bool lo_open;
  };
  const Field fields[] = {{"temperature", &d->temperature, 0, 2, 1.0, false},
                          {"top_p", &d->top_p, 0, 1, 1.0, true},
                          {"min_p", &d->min_p, 0, 1, -1, false},
                          {"repetition_penalty", &d->repetition_penalty, 0, 1e6, 1.0, true}};
  for (const Field& f : fields) {
    double v = std::numeric_limits<double>::quiet_NaN();
    if (absl::Status st = GetDouble(g, f.name, &v); !st.ok()) {
      d->problems.push_back(absl::StrCat(f.name, ": ", st.message()));
      continue;
    }
    if (std::isnan(v) || v == f.hf_default) continue;
    if (v > f.hi || v < f.lo || (f.lo_open && v == f.lo)) {
      d->problems.push_back(absl::StrCat(f.name, ": ", v, " is outside ", f.lo_open ? "(" : "[",
                                         f.lo, ", ", f.hi, "]"));
      continue;
    }
    *f.out = v;
  }
  int64_t top_k = -1;
  if (absl::Status st = GetInt(g, "top_k", &top_k); !st.ok()) {
    d->problems.push_back(absl::StrCat("top_k: ", st.message()));
  } else if (top_k > 0 && top_k != 50) {  // 0 and -1: off, as the API's own default
    d->top_k = top_k;
  }
}

}  // namespace

std::string ModelConfig::SamplingDefaults::ToString() const {
  std::string s;
  auto add = [&](const char* name, double v) {
    if (!std::isnan(v)) absl::StrAppend(&s, s.empty() ? "" : " ", name, "=", v);
  };
  add("temperature", temperature);
  add("top_p", top_p);
  if (top_k >= 0) absl::StrAppend(&s, s.empty() ? "" : " ", "top_k=", top_k);
  add("min_p", min_p);
  add("repetition_penalty", repetition_penalty);
  return s;
}

absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& model_dir) {
  const std::string path = model_dir + "/config.json";
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  std::stringstream ss;
  ss << in.rdbuf();
  auto c = ParseModelConfig(ss.str());
  if (!c.ok()) {
    return absl::Status(c.status().code(), absl::StrCat(path, ": ", c.status().message()));
  }
  const std::string gen_path = model_dir + "/generation_config.json";
  if (std::ifstream gen(gen_path, std::ios::binary); gen) {
    std::stringstream gs;
    gs << gen.rdbuf();
    const Json g = Json::parse(gs.str(), nullptr, /*allow_exceptions=*/false);
    if (g.is_discarded() || !g.is_object()) {
      return absl::InvalidArgumentError(absl::StrCat(gen_path, ": not a JSON object"));
    }
    if (auto st = GetIdList(g, "eos_token_id", &c->eos_token_ids); !st.ok()) {
      return absl::Status(st.code(), absl::StrCat(gen_path, ": ", st.message()));
    }
    ParseSamplingDefaults(g, &c->sampling_defaults);
  }
  for (size_t i = 0; i < c->eos_token_ids.size(); ++i) {
    if (c->eos_token_ids[i] >= c->vocab_size) {
      return absl::InvalidArgumentError(
          absl::StrCat(model_dir, ": eos_token_id ", c->eos_token_ids[i],
                       " is outside the vocabulary (", c->vocab_size, ")"));
    }
  }
  return c;
}

std::string ModelConfigToJson(const ModelConfig& c) {
  Json j = Json::object();
  auto nullable = [](int64_t v) { return v > 0 ? Json(v) : Json(nullptr); };
  j["architectures"] = Json::array({c.is_v3() ? "DeepseekV3ForCausalLM" : "DeepseekV2ForCausalLM"});
  j["model_type"] = c.model_type;
  j["vocab_size"] = c.vocab_size;
  j["hidden_size"] = c.hidden_size;
  j["intermediate_size"] = c.intermediate_size;
  j["moe_intermediate_size"] = c.moe_intermediate_size;
  j["num_hidden_layers"] = c.num_hidden_layers;
  j["num_attention_heads"] = c.num_attention_heads;
  j["num_key_value_heads"] = c.num_key_value_heads;
  j["q_lora_rank"] = nullable(c.q_lora_rank);
  j["kv_lora_rank"] = c.kv_lora_rank;
  j["qk_nope_head_dim"] = c.qk_nope_head_dim;
  j["qk_rope_head_dim"] = c.qk_rope_head_dim;
  j["v_head_dim"] = c.v_head_dim;
  j["n_routed_experts"] = nullable(c.n_routed_experts);
  j["n_shared_experts"] = nullable(c.n_shared_experts);
  j["num_experts_per_tok"] = nullable(c.num_experts_per_tok);
  j["topk_method"] = TopkMethodName(c.topk_method);
  j["n_group"] = nullable(c.n_group);
  j["topk_group"] = nullable(c.topk_group);
  j["routed_scaling_factor"] = c.routed_scaling_factor;
  j["norm_topk_prob"] = c.norm_topk_prob;
  j["scoring_func"] = c.scoring_func == ScoringFunc::kSigmoid ? "sigmoid" : "softmax";
  j["first_k_dense_replace"] = c.first_k_dense_replace;
  j["moe_layer_freq"] = c.moe_layer_freq;
  if (c.num_nextn_predict_layers > 0) j["num_nextn_predict_layers"] = c.num_nextn_predict_layers;
  j["rms_norm_eps"] = c.rms_norm_eps;
  j["rope_theta"] = c.rope_theta;
  if (c.rope_scaling.yarn) {
    const RopeScaling& y = c.rope_scaling;
    j["rope_scaling"] = {{"type", "yarn"},
                         {"factor", y.factor},
                         {"original_max_position_embeddings", y.original_max_position_embeddings},
                         {"beta_fast", y.beta_fast},
                         {"beta_slow", y.beta_slow},
                         {"mscale", y.mscale},
                         {"mscale_all_dim", y.mscale_all_dim}};
  } else {
    j["rope_scaling"] = nullptr;
  }
  j["max_position_embeddings"] = c.max_position_embeddings;
  j["tie_word_embeddings"] = c.tie_word_embeddings;
  j["hidden_act"] = "silu";
  j["attention_bias"] = false;
  j["bos_token_id"] = c.bos_token_id >= 0 ? Json(c.bos_token_id) : Json(nullptr);
  if (c.eos_token_ids.empty()) {
    j["eos_token_id"] = nullptr;
  } else if (c.eos_token_ids.size() == 1) {
    j["eos_token_id"] = c.eos_token_ids[0];
  } else {
    j["eos_token_id"] = c.eos_token_ids;
  }
  j["torch_dtype"] = "float32";
  return j.dump(2) + "\n";
}

std::string ModelFingerprint(const ModelConfig& c) {
  uint64_t h = 0xcbf29ce484222325ull;  // FNV-1a
  for (unsigned char ch : ModelConfigToJson(c)) {
    h ^= ch;
    h *= 0x100000001b3ull;
  }
  char buf[17];
  std::snprintf(buf, sizeof(buf), "%016llx", static_cast<unsigned long long>(h));
  return buf;
}

}  // namespace dmoe
