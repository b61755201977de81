#include "model/config.h"

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>

#include "gtest/gtest.h"
#include "model/tiny_model.h"
#include "nlohmann/json.hpp"

namespace dmoe {
namespace {

using Json = nlohmann::json;

Json TinyJson() { return Json::parse(ModelConfigToJson(*PresetConfig("tiny"))); }

// The error message of parsing `j`, or "" when it parses.
std::string ErrorOf(const Json& j) {
  auto c = ParseModelConfig(j.dump());
  if (c.ok()) return "";
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument);
  return std::string(c.status().message());
}

TEST(ModelConfig, EmptyObjectGivesTheOriginalDeepseekV2Defaults) {
  auto c = ParseModelConfig("{}");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->vocab_size, 102400);
  EXPECT_EQ(c->hidden_size, 4096);
  EXPECT_EQ(c->intermediate_size, 11008);
  EXPECT_EQ(c->moe_intermediate_size, 1407);
  EXPECT_EQ(c->num_hidden_layers, 30);
  EXPECT_EQ(c->num_attention_heads, 32);
  EXPECT_EQ(c->num_key_value_heads, 32);
  EXPECT_EQ(c->q_lora_rank, 1536);
  EXPECT_EQ(c->kv_lora_rank, 512);
  EXPECT_EQ(c->qk_nope_head_dim, 128);
  EXPECT_EQ(c->qk_rope_head_dim, 64);
  EXPECT_EQ(c->v_head_dim, 128);
  EXPECT_EQ(c->n_routed_experts, 0);
  EXPECT_EQ(c->n_shared_experts, 0);
  EXPECT_EQ(c->topk_method, TopkMethod::kGreedy);
  EXPECT_EQ(c->routed_scaling_factor, 1.0);
  EXPECT_FALSE(c->norm_topk_prob);
  EXPECT_EQ(c->first_k_dense_replace, 0);
  EXPECT_EQ(c->moe_layer_freq, 1);
  EXPECT_EQ(c->rms_norm_eps, 1e-6);
  EXPECT_EQ(c->rope_theta, 10000.0);
  EXPECT_FALSE(c->rope_scaling.yarn);
  EXPECT_EQ(c->max_position_embeddings, 2048);
  EXPECT_FALSE(c->tie_word_embeddings);
  EXPECT_FALSE(c->IsMoeLayer(0));
}

TEST(ModelConfig, PublishedV2LiteConfigParses) {
  const char* text = R"({
    "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
    "vocab_size": 102400, "hidden_size": 2048, "intermediate_size": 10944,
    "moe_intermediate_size": 1408, "num_hidden_layers": 27, "num_attention_heads": 16,
    "num_key_value_heads": 16, "n_shared_experts": 2, "n_routed_experts": 64, "ep_size": 1,
    "routed_scaling_factor": 1.0, "kv_lora_rank": 512, "q_lora_rank": null,
    "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "greedy",
    "n_group": 1, "topk_group": 1, "num_experts_per_tok": 6, "moe_layer_freq": 1,
    "first_k_dense_replace": 1, "norm_topk_prob": false, "scoring_func": "softmax",
    "aux_loss_alpha": 0.001, "seq_aux": true, "hidden_act": "silu",
    "max_position_embeddings": 163840, "initializer_range": 0.02, "rms_norm_eps": 1e-06,
    "use_cache": true, "pad_token_id": null, "bos_token_id": 100000, "eos_token_id": 100001,
    "pretraining_tp": 1, "tie_word_embeddings": false, "rope_theta": 10000,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707,
      "mscale_all_dim": 0.707, "original_max_position_embeddings": 4096, "type": "yarn"},
    "attention_bias": false, "attention_dropout": 0.0, "torch_dtype": "bfloat16"})";
  auto c = ParseModelConfig(text);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->q_lora_rank, 0);
  EXPECT_EQ(c->n_routed_experts, 64);
  EXPECT_TRUE(c->rope_scaling.yarn);
  EXPECT_EQ(c->rope_scaling.factor, 40);
  EXPECT_FALSE(c->IsMoeLayer(0));
  EXPECT_TRUE(c->IsMoeLayer(1));
  EXPECT_EQ(c->latent_dim(), 576);
  // MODEL_SPEC.md: mscale(40, 0.707)^2 ~= 1.59 on top of 192^-0.5.
  EXPECT_NEAR(c->SoftmaxScale() * std::sqrt(192.0), 1.2608 * 1.2608, 1e-3);
  EXPECT_DOUBLE_EQ(c->RopeMscale(), 1.0);
}

// DeepSeek-V3's published config.json (R1's differs only in nothing this parser reads), unmodified.
TEST(ModelConfig, PublishedV3ConfigParses) {
  const char* text = R"({
    "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": false,
    "attention_dropout": 0.0, "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
      "AutoModel": "modeling_deepseek.DeepseekV3Model",
      "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"},
    "aux_loss_alpha": 0.001, "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1,
    "first_k_dense_replace": 3, "hidden_act": "silu", "hidden_size": 7168,
    "initializer_range": 0.02, "intermediate_size": 18432, "kv_lora_rank": 512,
    "max_position_embeddings": 163840, "model_type": "deepseek_v3",
    "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256,
    "n_shared_experts": 1, "norm_topk_prob": true, "num_attention_heads": 128,
    "num_experts_per_tok": 8, "num_hidden_layers": 61, "num_key_value_heads": 128,
    "num_nextn_predict_layers": 1, "pretraining_tp": 1, "q_lora_rank": 1536,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3",
      "quant_method": "fp8", "weight_block_size": [128, 128]},
    "rms_norm_eps": 1e-06, "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40,
      "mscale": 1.0, "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
      "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid",
    "seq_aux": true, "tie_word_embeddings": false, "topk_group": 4, "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16", "transformers_version": "4.33.1", "use_cache": true,
    "v_head_dim": 128, "vocab_size": 129280})";
  auto c = ParseModelConfig(text);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_TRUE(c->is_v3());
  EXPECT_EQ(c->topk_method, TopkMethod::kNoauxTc);
  EXPECT_EQ(c->scoring_func, ScoringFunc::kSigmoid);
  EXPECT_TRUE(c->ScaleAfterNorm());
  EXPECT_EQ(c->num_nextn_predict_layers, 1);
  EXPECT_EQ(c->num_expert_layers(), 62);
  EXPECT_FALSE(c->IsMoeLayer(2));
  EXPECT_TRUE(c->IsExpertLayer(61));  // the MTP layer's experts
  EXPECT_FALSE(c->IsExpertLayer(62));
  // MODEL_SPEC.md: mscale(40, 1.0)^2 ~= 1.87 on top of 192^-0.5.
  EXPECT_NEAR(c->SoftmaxScale() * std::sqrt(192.0), 1.3689 * 1.3689, 1e-3);
  auto back = ParseModelConfig(ModelConfigToJson(*c));
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(ModelConfigToJson(*back), ModelConfigToJson(*c));
}

TEST(ModelConfig, NoauxTcNeedsV3AndGroupsOfTwo) {
  Json j = Json::parse(ModelConfigToJson(*PresetConfig("tiny-v3")));
  j["model_type"] = "deepseek_v2";
  EXPECT_NE(ErrorOf(j).find("field topk_method: noaux_tc needs model_type deepseek_v3"),
            std::string::npos);
  j = Json::parse(ModelConfigToJson(*PresetConfig("tiny-v3")));
  j["n_group"] = 16;
  j["topk_group"] = 8;
  EXPECT_NE(ErrorOf(j).find("field n_group: noaux_tc ranks groups by their two best experts"),
            std::string::npos);
}

TEST(ModelConfig, TinyPresetSoftmaxScaleMatchesTheSpec) {
  auto c = PresetConfig("tiny");
  ASSERT_TRUE(c.ok());
  EXPECT_NEAR(c->SoftmaxScale() * std::sqrt(48.0), 1.2057, 1e-4);
}

TEST(ModelConfig, GeneratedJsonRoundTrips) {
  for (const char* preset : {"tiny", "tiny-lite", "tiny-v3", "small", "v2-lite-4l"}) {
    auto c = PresetConfig(preset);
    ASSERT_TRUE(c.ok());
    auto back = ParseModelConfig(ModelConfigToJson(*c));
    ASSERT_TRUE(back.ok()) << back.status();
    EXPECT_EQ(ModelConfigToJson(*back), ModelConfigToJson(*c)) << preset;
  }
}

TEST(ModelConfig, HfV5RopeParametersAreAccepted) {
  Json j = TinyJson();
  j.erase("rope_scaling");
  j.erase("rope_theta");
  j["rope_parameters"] = {{"rope_type", "yarn"}, {"rope_theta", 50000.0},
                          {"factor", 4.0},       {"original_max_position_embeddings", 128},
                          {"mscale", 0.707},     {"mscale_all_dim", 0.707}};
  auto c = ParseModelConfig(j.dump());
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_TRUE(c->rope_scaling.yarn);
  EXPECT_EQ(c->rope_theta, 50000.0);
  EXPECT_EQ(c->rope_scaling.beta_fast, 32.0);  // per-key default
}

TEST(ModelConfig, GreadyTypoMeansGreedy) {
  Json j = TinyJson();
  j["topk_method"] = "gready";
  auto c = ParseModelConfig(j.dump());
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->topk_method, TopkMethod::kGreedy);
}

TEST(ModelConfig, ErrorsNameTheField) {
  struct Case {
    const char* field;
    Json value;
    const char* expect;  // substring of the message
  };
  const Case cases[] = {
      {"n_routed_experts", 10, "n_routed_experts 10 is not divisible by n_group 4"},
      {"hidden_size", "big", "field hidden_size: expected an integer, got string"},
      {"hidden_size", 0, "field hidden_size: must be positive"},
      {"vocab_size", -5, "field vocab_size: must be positive"},
      {"num_key_value_heads", 2, "field num_key_value_heads: 2 must equal num_attention_heads"},
      {"qk_rope_head_dim", 15, "field qk_rope_head_dim: 15 must be even"},
      {"topk_method", "noaux_tc", "field scoring_func: must be sigmoid with topk_method noaux_tc"},
      {"topk_method", "random", "field topk_method: unknown method"},
      {"scoring_func", "sigmoid", "field scoring_func: sigmoid needs topk_method noaux_tc"},
      {"scoring_func", "tanh", "field scoring_func: \"tanh\" is not supported"},
      {"num_nextn_predict_layers", 2, "field num_nextn_predict_layers: 2 is not supported"},
      {"topk_group", 5, "field topk_group: 5 must be in [1, n_group 4]"},
      {"num_experts_per_tok", 17, "field num_experts_per_tok: 17 exceeds n_routed_experts 16"},
      {"num_experts_per_tok", 9, "field num_experts_per_tok: 9 exceeds the 8 experts"},
      {"model_type", "llama", "field model_type"},
      {"rms_norm_eps", "tiny", "field rms_norm_eps: expected a number"},
      {"norm_topk_prob", 1, "field norm_topk_prob: expected true or false"},
      {"rope_scaling", Json{{"type", "linear"}, {"factor", 2}}, "field rope_scaling.type"},
      {"rope_scaling", Json{{"type", "yarn"}}, "field rope_scaling.factor: missing"},
      {"rope_scaling", Json{{"type", "yarn"}, {"factor", "x"}}, "field rope_scaling.factor"},
      {"rope_scaling", 3, "field rope_scaling: expected an object"},
      {"moe_layer_freq", 0, "field moe_layer_freq: must be positive"},
      {"hidden_act", "gelu", "field hidden_act"},
      {"attention_bias", true, "field attention_bias"},
      {"q_lora_rank", 0, "field q_lora_rank"},
      {"max_position_embeddings", 1.5, "field max_position_embeddings: expected an integer"},
      // Sizes that would size tables before any tensor contradicts them.
      {"num_hidden_layers", 4503599627370496LL,
       "field num_hidden_layers: 4503599627370496 exceeds"},
      {"n_routed_experts", 1000000000000LL, "field n_routed_experts: 1000000000000 exceeds"},
      {"max_position_embeddings", 1000000000, "field max_position_embeddings: 1000000000 exceeds"},
      {"vocab_size", int64_t{1} << 30, "field vocab_size: 1073741824 exceeds"},
      {"hidden_size", 100000, "field hidden_size: 100000 exceeds"},
      {"rope_scaling",
       Json{{"type", "yarn"}, {"factor", 2.718281828459045}, {"mscale_all_dim", -10}},
       "field rope_scaling.mscale_all_dim: must be finite"},
  };
  for (const Case& c : cases) {
    Json j = TinyJson();
    j[c.field] = c.value;
    const std::string err = ErrorOf(j);
    EXPECT_NE(err.find(c.expect), std::string::npos)
        << c.field << "=" << c.value.dump() << " gave \"" << err << "\"";
  }
}

TEST(ModelConfig, MissingExpertsPerTokenWithExpertsIsAnError) {
  Json j = TinyJson();
  j.erase("num_experts_per_tok");
  EXPECT_NE(ErrorOf(j).find("field num_experts_per_tok: must be set"), std::string::npos);
}

TEST(ModelConfig, GroupLimitedWithoutGroupsIsAnError) {
  Json j = TinyJson();
  j["n_group"] = nullptr;
  EXPECT_NE(ErrorOf(j).find("field n_group: must be set"), std::string::npos);
}

TEST(ModelConfig, NotJsonOrNotAnObject) {
  EXPECT_NE(ErrorOf(Json()).find("not an object"), std::string::npos);  // "null"
  auto c = ParseModelConfig("{\"vocab_size\": 12");
  EXPECT_FALSE(c.ok());
  EXPECT_NE(std::string(c.status().message()).find("not valid JSON"), std::string::npos);
}

TEST(ModelConfig, LoadNamesTheFile) {
  auto c = LoadModelConfig("/nonexistent-dir");
  EXPECT_FALSE(c.ok());
  EXPECT_NE(std::string(c.status().message()).find("/nonexistent-dir/config.json"),
            std::string::npos);
}

// generation_config.json's sampling fields become the OpenAI API's defaults; absent ones, and
// values equal to Hugging Face's own defaults (top_k 50, temperature 1.0: vLLM drops them too),
// stay unset (NaN / -1). Out-of-range or mistyped ones are left unset and described, never an
// error: the checkpoint still loads (every process reads this file).
TEST(ModelConfig, SamplingDefaultsFromGenerationConfig) {
  const std::string dir = std::string(std::getenv("TEST_TMPDIR")) + "/gen_defaults";
  std::filesystem::create_directories(dir);
  std::ofstream(dir + "/config.json") << TinyJson().dump();
  auto write = [&](const std::string& gen) {
    std::ofstream(dir + "/generation_config.json") << gen;
  };
  write(R"({"do_sample": true, "temperature": 0.6, "top_p": 0.95, "top_k": 40})");
  auto c = LoadModelConfig(dir);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->sampling_defaults.temperature, 0.6);
  EXPECT_EQ(c->sampling_defaults.top_p, 0.95);
  EXPECT_EQ(c->sampling_defaults.top_k, 40);
  EXPECT_TRUE(std::isnan(c->sampling_defaults.min_p));
  EXPECT_TRUE(std::isnan(c->sampling_defaults.repetition_penalty));
  EXPECT_EQ(c->sampling_defaults.ToString(), "temperature=0.6 top_p=0.95 top_k=40");
  EXPECT_TRUE(c->sampling_defaults.problems.empty());
  for (const char* gen : {R"({"eos_token_id": 1})",
                          R"({"temperature": 1.0, "top_p": 1.0, "top_k": 50, "do_sample": false})",
                          R"({"top_k": -1, "repetition_penalty": 1.0})"}) {
    write(gen);
    c = LoadModelConfig(dir);
    ASSERT_TRUE(c.ok()) << c.status();
    EXPECT_EQ(c->sampling_defaults.ToString(), "") << gen;
    EXPECT_TRUE(c->sampling_defaults.problems.empty()) << gen;
  }
  const std::pair<const char*, const char*> bad[] = {
      {R"({"temperature": -0.1, "top_p": 0.9})", "temperature: -0.1 is outside [0, 2]"},
      {R"({"top_p": 0, "top_p_x": 1})", "top_p: 0 is outside (0, 1]"},
      {R"({"top_p": "high"})", "top_p: "},
      {R"({"min_p": 1.5})", "min_p: 1.5 is outside [0, 1]"},
      {R"({"repetition_penalty": 0})", "repetition_penalty: 0 is outside (0, 1e+06]"},
      {R"({"top_k": "many"})", "top_k: "},
  };
  for (const auto& [gen, problem] : bad) {
    write(gen);
    c = LoadModelConfig(dir);
    ASSERT_TRUE(c.ok()) << gen << ": " << c.status();
    ASSERT_EQ(c->sampling_defaults.problems.size(), 1u) << gen;
    EXPECT_EQ(c->sampling_defaults.problems[0].rfind(problem, 0), 0u)
        << c->sampling_defaults.problems[0];
  }
  write(R"({"temperature": -0.1, "top_p": 0.9})");
  EXPECT_EQ(LoadModelConfig(dir)->sampling_defaults.ToString(), "top_p=0.9");  // the good one kept
}

}  // namespace
}  // namespace dmoe
