#include "model/tiny_model.h"

#include <sys/stat.h>

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <random>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "kernels/cpu/qlinear.h"
#include "model/weights.h"
#include "nlohmann/json.hpp"

namespace dmoe {
namespace {

using weight_names::Layer;

uint64_t Fnv1a(const std::string& s) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char ch : s) {
    h ^= ch;
    h *= 1099511628211ull;
  }
  return h;
}

uint64_t SplitMix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// Standard normal draws by Box-Muller from a 64-bit Mersenne Twister: the same on every platform.
class NormalRng {
 public:
  explicit NormalRng(uint64_t seed) : gen_(seed) {}
  double Next() {
    if (has_spare_) {
      has_spare_ = false;
      return spare_;
    }
    double u1 = 0.0;
    while (u1 <= 0.0) u1 = static_cast<double>(gen_() >> 11) * 0x1.0p-53;
    const double u2 = static_cast<double>(gen_() >> 11) * 0x1.0p-53;
    const double r = std::sqrt(-2.0 * std::log(u1));
    spare_ = r * std::sin(2.0 * M_PI * u2);
    has_spare_ = true;
    return r * std::cos(2.0 * M_PI * u2);
  }

 private:
  std::mt19937_64 gen_;
  bool has_spare_ = false;
  double spare_ = 0.0;
};

// MODEL_SPEC.md: std = gain / sqrt(fan_in); norms 1 + 0.1 N(0,1); embeddings N(0,1).
// The MTP layer's embed_tokens / shared_head.head are drawn as the main embedding / lm_head
// (bit-identical copies, as in the released V3 weights); e_score_correction_bias 0.1 N(0,1).
void DrawTensor(const TensorSpec& t, uint64_t seed, std::vector<float>* out) {
  int64_t n = 1;
  for (int64_t d : t.shape) n *= d;
  out->resize(static_cast<size_t>(n));
  std::string name = t.name;
  if (absl::StartsWith(name, "model.layers.") && absl::EndsWith(name, ".embed_tokens.weight")) {
    name = "model.embed_tokens.weight";
  } else if (absl::EndsWith(name, ".shared_head.head.weight")) {
    name = "lm_head.weight";
  }
  NormalRng rng(SplitMix(seed ^ Fnv1a(name)));
  if (absl::EndsWith(name, "e_score_correction_bias")) {
    for (float& v : *out) v = static_cast<float>(0.1 * rng.Next());
    return;
  }
  if (absl::StrContains(name, "norm")) {
    for (float& v : *out) v = static_cast<float>(1.0 + 0.1 * rng.Next());
    return;
  }
  if (name == "model.embed_tokens.weight") {
    for (float& v : *out) v = static_cast<float>(rng.Next());
    return;
  }
  double gain = 1.0;
  if (absl::StrContains(name, "q_a_proj") || absl::StrContains(name, "q_b_proj") ||
      absl::StrContains(name, "q_proj") || name == "lm_head.weight") {
    gain = 1.5;
  } else if (absl::EndsWith(name, "mlp.gate.weight")) {
    gain = 3.0;
  } else if (absl::StrContains(name, "o_proj") || absl::StrContains(name, "down_proj")) {
    gain = 0.7;
  }
  const double std = gain / std::sqrt(static_cast<double>(t.shape.back()));
  for (float& v : *out) v = static_cast<float>(std * rng.Next());
}

// mkdir -p.
absl::Status MakeDir(const std::string& dir) {
  for (size_t at = dir.find('/', 1); at != std::string::npos; at = dir.find('/', at + 1)) {
    ::mkdir(dir.substr(0, at).c_str(), 0755);
  }
  if (::mkdir(dir.c_str(), 0755) != 0 && errno != EEXIST) {
    return absl::InternalError(absl::StrCat("cannot create ", dir, ": ", std::strerror(errno)));
  }
  return absl::OkStatus();
}

}  // namespace

namespace {

// The "tiny" preset: every feature of DeepSeek-V2 (q LoRA, group-limited routing, YaRN) at a size
// that runs in milliseconds.
ModelConfig TinyConfig() {
  ModelConfig c;
  c.vocab_size = 512;
  c.hidden_size = 256;
  c.num_hidden_layers = 4;
  c.first_k_dense_replace = 1;
  c.intermediate_size = 512;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 4;
  c.q_lora_rank = 96;
  c.kv_lora_rank = 64;
  c.qk_nope_head_dim = 32;
  c.qk_rope_head_dim = 16;
  c.v_head_dim = 32;
  c.n_routed_experts = 16;
  c.n_shared_experts = 2;
  c.moe_intermediate_size = 64;
  c.num_experts_per_tok = 4;
  c.topk_method = TopkMethod::kGroupLimitedGreedy;
  c.n_group = 4;
  c.topk_group = 2;
  c.routed_scaling_factor = 2.5;
  c.norm_topk_prob = false;
  c.rope_scaling.yarn = true;
  c.rope_scaling.factor = 4;
  c.rope_scaling.original_max_position_embeddings = 128;
  c.rope_scaling.beta_fast = 32;
  c.rope_scaling.beta_slow = 1;
  c.rope_scaling.mscale = 0.707;
  c.rope_scaling.mscale_all_dim = 0.707;
  c.max_position_embeddings = 512;
  c.rms_norm_eps = 1e-6;
  c.rope_theta = 10000;
  c.tie_word_embeddings = false;
  c.bos_token_id = 0;
  c.eos_token_ids = {1};
  return c;
}

// MODEL_SPEC.md's tiny-v3 changes: V3 gating (sigmoid, noaux_tc with a selection bias,
// normalize then scale), one shared expert, YaRN mscale = mscale_all_dim = 1, one MTP layer.
void MakeV3(ModelConfig* c) {
  c->model_type = "deepseek_v3";
  c->topk_method = TopkMethod::kNoauxTc;
  c->scoring_func = ScoringFunc::kSigmoid;
  c->norm_topk_prob = true;
  c->n_shared_experts = 1;
  c->rope_scaling.mscale = 1.0;
  c->rope_scaling.mscale_all_dim = 1.0;
  c->num_nextn_predict_layers = 1;
}

}  // namespace

absl::StatusOr<ModelConfig> PresetConfig(const std::string& preset) {
  ModelConfig c = TinyConfig();
  if (preset == "tiny") return c;
  if (preset == "tiny-lite") {
    c.q_lora_rank = 0;
    c.topk_method = TopkMethod::kGreedy;
    c.n_group = 1;
    c.topk_group = 1;
    c.num_experts_per_tok = 6;
    c.routed_scaling_factor = 1.0;
    c.rope_scaling = RopeScaling();
    return c;
  }
  if (preset == "tiny-v3") {
    MakeV3(&c);
    return c;
  }
  if (preset == "small" || preset == "small-v3") {
    c.vocab_size = 32000;
    c.hidden_size = 1024;
    c.num_hidden_layers = 8;
    c.n_routed_experts = 64;
    c.num_experts_per_tok = 6;
    c.n_group = 8;
    c.topk_group = 3;
    c.moe_intermediate_size = 512;
    c.intermediate_size = 2816;
    c.q_lora_rank = 384;
    c.kv_lora_rank = 256;
    c.qk_nope_head_dim = 64;
    c.qk_rope_head_dim = 32;
    c.v_head_dim = 64;
    c.num_attention_heads = 8;
    c.num_key_value_heads = 8;
    c.max_position_embeddings = 4096;
    c.rope_scaling.original_max_position_embeddings = 1024;
    if (preset == "small-v3") MakeV3(&c);
    return c;
  }
  if (preset == "v2-lite-4l") {  // (tiny-lite's V2-Lite routing: greedy top-6, scale 1)
    c = PresetConfig("tiny-lite").value();
    c.vocab_size = 32000;
    c.hidden_size = 2048;
    c.num_hidden_layers = 4;
    c.intermediate_size = 10944;
    c.num_attention_heads = 16;
    c.num_key_value_heads = 16;
    c.kv_lora_rank = 512;
    c.qk_nope_head_dim = 128;
    c.qk_rope_head_dim = 64;
    c.v_head_dim = 128;
    c.n_routed_experts = 64;
    c.moe_intermediate_size = 1408;
    c.max_position_embeddings = 4096;
    return c;
  }
  if (preset == "tiny-demo") {
    // The tiny shape with the DeepSeek-V3 tokenizer's vocabulary (128815 tokens, padded to
    // 129280 as V3 does) and a narrower hidden size, so that text demos stay small.
    c.vocab_size = 129280;
    c.hidden_size = 64;
    c.intermediate_size = 128;
    c.moe_intermediate_size = 32;
    c.bos_token_id = 0;
    c.eos_token_ids = {1};
    return c;
  }
  return absl::InvalidArgumentError(
      absl::StrCat("--preset: unknown preset \"", preset,
                   "\" (tiny, tiny-lite, tiny-v3, tiny-demo, small, small-v3, v2-lite-4l)"));
}

namespace {

// Decoder layer i's tensors (the MTP layer's too).
void AddLayerTensors(const ModelConfig& c, int64_t i, std::vector<TensorSpec>* out) {
  std::vector<TensorSpec>& t = *out;
  const int64_t d = c.hidden_size, h = c.num_attention_heads;
  t.push_back({Layer(i, "input_layernorm.weight"), {d}});
  t.push_back({Layer(i, "post_attention_layernorm.weight"), {d}});
  if (c.q_lora_rank > 0) {
    t.push_back({Layer(i, "self_attn.q_a_proj.weight"), {c.q_lora_rank, d}});
    t.push_back({Layer(i, "self_attn.q_a_layernorm.weight"), {c.q_lora_rank}});
    t.push_back({Layer(i, "self_attn.q_b_proj.weight"), {h * c.q_head_dim(), c.q_lora_rank}});
  } else {
    t.push_back({Layer(i, "self_attn.q_proj.weight"), {h * c.q_head_dim(), d}});
  }
  t.push_back({Layer(i, "self_attn.kv_a_proj_with_mqa.weight"), {c.latent_dim(), d}});
  t.push_back({Layer(i, "self_attn.kv_a_layernorm.weight"), {c.kv_lora_rank}});
  t.push_back({Layer(i, "self_attn.kv_b_proj.weight"),
               {h * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank}});
  t.push_back({Layer(i, "self_attn.o_proj.weight"), {d, h * c.v_head_dim}});
  auto mlp = [&](const std::string& prefix, int64_t width) {
    t.push_back({prefix + "gate_proj.weight", {width, d}});
    t.push_back({prefix + "up_proj.weight", {width, d}});
    t.push_back({prefix + "down_proj.weight", {d, width}});
  };
  if (!c.IsMoeLayer(i)) {
    mlp(Layer(i, "mlp."), c.intermediate_size);
    return;
  }
  t.push_back({Layer(i, "mlp.gate.weight"), {c.n_routed_experts, d}});
  if (c.topk_method == TopkMethod::kNoauxTc) {
    t.push_back({Layer(i, "mlp.gate.e_score_correction_bias"), {c.n_routed_experts}});
  }
  for (int64_t e = 0; e < c.n_routed_experts; ++e) {
    mlp(absl::StrCat("model.layers.", i, ".mlp.experts.", e, "."), c.moe_intermediate_size);
  }
  if (c.n_shared_experts > 0) {
    mlp(Layer(i, "mlp.shared_experts."), c.moe_intermediate_size * c.n_shared_experts);
  }
}

}  // namespace

std::vector<TensorSpec> CheckpointTensors(const ModelConfig& c) {
  const int64_t d = c.hidden_size;
  std::vector<TensorSpec> t;
  t.push_back({"model.embed_tokens.weight", {c.vocab_size, d}});
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) AddLayerTensors(c, i, &t);
  t.push_back({"model.norm.weight", {d}});
  if (!c.tie_word_embeddings) t.push_back({"lm_head.weight", {c.vocab_size, d}});
  if (c.num_nextn_predict_layers > 0) {
    // The MTP layer as DeepSeek-V3 ships it: its embed_tokens and shared_head.head are copies of
    // the main embedding and lm_head (DrawTensor draws them under the main names).
    const int64_t l = c.num_hidden_layers;
    t.push_back({Layer(l, "embed_tokens.weight"), {c.vocab_size, d}});
    t.push_back({Layer(l, "enorm.weight"), {d}});
    t.push_back({Layer(l, "hnorm.weight"), {d}});
    t.push_back({Layer(l, "eh_proj.weight"), {d, 2 * d}});
    AddLayerTensors(c, l, &t);
    t.push_back({Layer(l, "shared_head.norm.weight"), {d}});
    t.push_back({Layer(l, "shared_head.head.weight"), {c.vocab_size, d}});
  }
  return t;
}

namespace {

// What goes into the files. fp8 (like DeepSeek-V3): every *_proj.weight as F8_E4M3 with its
// 128x128 block scales in "<name>_scale_inv" (F32) right after it; everything else BF16.
struct OutTensor {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  size_t spec;
  bool scale;
  uint64_t bytes = 0;
};

std::vector<OutTensor> PlanTensors(const std::vector<TensorSpec>& specs, DType dtype) {
  std::vector<OutTensor> tensors;
  const bool fp8 = dtype == DType::kF8E4M3;
  for (size_t i = 0; i < specs.size(); ++i) {
    const std::string& name = specs[i].name;
    const bool proj = name.size() > 12 && name.compare(name.size() - 12, 12, "_proj.weight") == 0;
    if (fp8 && proj && specs[i].shape.size() == 2) {
      tensors.push_back({name, DType::kF8E4M3, specs[i].shape, i, false});
      tensors.push_back({name + "_scale_inv",
                         DType::kF32,
                         {(specs[i].shape[0] + cpu::kFp8Block - 1) / cpu::kFp8Block,
                          (specs[i].shape[1] + cpu::kFp8Block - 1) / cpu::kFp8Block},
                         i,
                         true});
    } else {
      tensors.push_back({name, fp8 ? DType::kBF16 : dtype, specs[i].shape, i, false});
    }
  }
  for (OutTensor& t : tensors) {
    t.bytes = DTypeSize(t.dtype);
    for (int64_t dim : t.shape) t.bytes *= static_cast<uint64_t>(dim);
  }
  return tensors;
}

// Splits the tensors, in order, into `nshards` runs of about equal bytes: shard s takes the
// tensors whose bytes start in its 1/nshards of the total; steps of at most one shard per tensor,
// and the last tensors fill the last shards, so no shard is empty.
std::vector<int> AssignShards(const std::vector<OutTensor>& tensors, int nshards) {
  uint64_t total = 0;
  for (const OutTensor& t : tensors) total += t.bytes;
  std::vector<int> shard_of(tensors.size());
  uint64_t acc = 0;
  const int ntensors = static_cast<int>(tensors.size());
  for (int i = 0; i < ntensors; ++i) {
    int s = static_cast<int>(std::min<uint64_t>(acc * nshards / total, nshards - 1));
    if (i > 0) s = std::min(s, shard_of[i - 1] + 1);
    shard_of[i] = std::max(s, nshards - (ntensors - i));
    acc += tensors[i].bytes;
  }
  return shard_of;
}

// Writes tensors [first, last) with their drawn values into one safetensors file at `path`.
class ShardWriter {
 public:
  ShardWriter(const std::vector<TensorSpec>& specs, uint64_t seed) : specs_(specs), seed_(seed) {}
  absl::Status Write(const std::string& path, const std::vector<OutTensor>& tensors, size_t first,
                     size_t last) {
    nlohmann::json header = nlohmann::json::object();
    header["__metadata__"] = {{"format", "pt"}};
    uint64_t off = 0;
    for (size_t i = first; i < last; ++i) {
      header[tensors[i].name] = {{"dtype", DTypeName(tensors[i].dtype)},
                                 {"shape", tensors[i].shape},
                                 {"data_offsets", {off, off + tensors[i].bytes}}};
      off += tensors[i].bytes;
    }
    std::string text = header.dump();
    while (text.size() % 8 != 0) text.push_back(' ');
    std::FILE* f = std::fopen(path.c_str(), "wb");
    if (f == nullptr) {
      return absl::InternalError(absl::StrCat("cannot write ", path, ": ", std::strerror(errno)));
    }
    uint8_t len[8];
    for (int b = 0; b < 8; ++b) {
      len[b] = static_cast<uint8_t>(static_cast<uint64_t>(text.size()) >> (8 * b));
    }
    bool ok = std::fwrite(len, 1, 8, f) == 8 &&
              std::fwrite(text.data(), 1, text.size(), f) == text.size();
    for (size_t i = first; ok && i < last; ++i) ok = WriteTensor(tensors[i], f);
    if (std::fclose(f) != 0 || !ok) {
      return absl::InternalError(
          absl::StrCat("write to ", path, " failed: ", std::strerror(errno)));
    }
    return absl::OkStatus();
  }

 private:
  bool WriteTensor(const OutTensor& t, std::FILE* f) {
    if (t.scale) {  // the scales of the fp8 tensor just before it
      return std::fwrite(scales_.data(), 4, scales_.size(), f) == scales_.size();
    }
    DrawTensor(specs_[t.spec], seed_, &draw_);
    if (t.dtype == DType::kF32)
      return std::fwrite(draw_.data(), 4, draw_.size(), f) == draw_.size();
    if (t.dtype == DType::kF8E4M3) {
      cpu::QuantizeFp8Blocks(draw_.data(), t.shape[0], t.shape[1], &q_, &scales_);
      return std::fwrite(q_.data(), 1, q_.size(), f) == q_.size();
    }
    half_.resize(draw_.size());
    for (size_t k = 0; k < draw_.size(); ++k) half_[k] = FloatToBf16(draw_[k]);
    return std::fwrite(half_.data(), 2, half_.size(), f) == half_.size();
  }

  const std::vector<TensorSpec>& specs_;
  uint64_t seed_;
  std::vector<float> draw_;
  std::vector<uint16_t> half_;
  std::vector<uint8_t> q_;
  std::vector<float> scales_;  // of the last fp8 tensor written
};

}  // namespace

absl::Status WriteTinyModel(const std::string& out_dir, const ModelConfig& config,
                            const TinyModelOptions& options) {
  if (auto s = ValidateModelConfig(config); !s.ok()) return s;
  if (options.dtype != DType::kF32 && options.dtype != DType::kBF16 &&
      options.dtype != DType::kF8E4M3) {
    return absl::InvalidArgumentError("--dtype: must be f32, bf16 or fp8");
  }
  const std::vector<TensorSpec> specs = CheckpointTensors(config);
  const std::vector<OutTensor> tensors = PlanTensors(specs, options.dtype);
  if (options.shards < 1 || static_cast<size_t>(options.shards) > tensors.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("--shards: must be in [1, ", tensors.size(), "], got ", options.shards));
  }
  if (auto s = MakeDir(out_dir); !s.ok()) return s;
  const int nshards = options.shards;
  const std::vector<int> shard_of = AssignShards(tensors, nshards);
  auto file_name = [&](int s) {
    return nshards == 1 ? std::string("model.safetensors")
                        : absl::StrFormat("model-%05d-of-%05d.safetensors", s + 1, nshards);
  };
  nlohmann::json weight_map = nlohmann::json::object();
  uint64_t total = 0;
  ShardWriter writer(specs, options.seed);
  for (size_t first = 0, last = 0; first < tensors.size(); first = last) {
    const int s = shard_of[first];
    while (last < tensors.size() && shard_of[last] == s) {
      weight_map[tensors[last].name] = file_name(s);
      total += tensors[last].bytes;
      ++last;
    }
    if (auto st = writer.Write(out_dir + "/" + file_name(s), tensors, first, last); !st.ok()) {
      return st;
    }
  }
  if (nshards > 1) {
    nlohmann::json index = {{"metadata", {{"total_size", total}}}, {"weight_map", weight_map}};
    std::ofstream out(out_dir + "/model.safetensors.index.json");
    out << index.dump(2) << "\n";
    if (!out) return absl::InternalError("cannot write model.safetensors.index.json");
  }
  std::ofstream cfg(out_dir + "/config.json");
  cfg << ModelConfigToJson(config);
  if (!cfg) return absl::InternalError(absl::StrCat("cannot write ", out_dir, "/config.json"));
  return absl::OkStatus();
}

}  // namespace dmoe
