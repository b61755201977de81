#include "model/weights.h"

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace dmoe {

namespace weight_names {
std::string Layer(int64_t layer, const std::string& suffix) {
  return absl::StrCat("model.layers.", layer, ".", suffix);
}
std::string Expert(int64_t layer, int64_t expert, const std::string& proj) {
  return absl::StrCat("model.layers.", layer, ".mlp.experts.", expert, ".", proj, ".weight");
}
}  // namespace weight_names

namespace {

absl::StatusOr<LinearWeight> ReadLinear(const Checkpoint& ck, const std::string& name, int64_t out,
                                        int64_t in) {
  LinearWeight l;
  ASSIGN_OR_RETURN(l.w, ck.ReadFloat(name, {out, in}));
  l.out = out;
  l.in = in;
  return l;
}

absl::StatusOr<MlpWeights> ReadMlp(const Checkpoint& ck, const std::string& prefix, int64_t d,
                                   int64_t width) {
  MlpWeights m;
  ASSIGN_OR_RETURN(m.gate, ReadLinear(ck, prefix + "gate_proj.weight", width, d));
  ASSIGN_OR_RETURN(m.up, ReadLinear(ck, prefix + "up_proj.weight", width, d));
  ASSIGN_OR_RETURN(m.down, ReadLinear(ck, prefix + "down_proj.weight", d, width));
  return m;
}

}  // namespace

absl::StatusOr<DenseWeights> LoadDenseWeights(const Checkpoint& ck, const ModelConfig& c) {
  using weight_names::Layer;
  const int64_t d = c.hidden_size, h = c.num_attention_heads;
  DenseWeights w;
  ASSIGN_OR_RETURN(w.embed, ck.ReadFloat("model.embed_tokens.weight", {c.vocab_size, d}));
  w.layers.resize(static_cast<size_t>(c.num_hidden_layers));
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    LayerWeights& l = w.layers[static_cast<size_t>(i)];
    ASSIGN_OR_RETURN(l.input_norm, ck.ReadFloat(Layer(i, "input_layernorm.weight"), {d}));
    ASSIGN_OR_RETURN(l.post_norm, ck.ReadFloat(Layer(i, "post_attention_layernorm.weight"), {d}));
    if (c.q_lora_rank > 0) {
      ASSIGN_OR_RETURN(l.q_a,
                       ReadLinear(ck, Layer(i, "self_attn.q_a_proj.weight"), c.q_lora_rank, d));
      ASSIGN_OR_RETURN(l.q_a_norm,
                       ck.ReadFloat(Layer(i, "self_attn.q_a_layernorm.weight"), {c.q_lora_rank}));
      ASSIGN_OR_RETURN(l.q_b, ReadLinear(ck, Layer(i, "self_attn.q_b_proj.weight"),
                                         h * c.q_head_dim(), c.q_lora_rank));
    } else {
      ASSIGN_OR_RETURN(l.q,
                       ReadLinear(ck, Layer(i, "self_attn.q_proj.weight"), h * c.q_head_dim(), d));
    }
    ASSIGN_OR_RETURN(
        l.kv_a, ReadLinear(ck, Layer(i, "self_attn.kv_a_proj_with_mqa.weight"), c.latent_dim(), d));
    ASSIGN_OR_RETURN(l.kv_a_norm,
                     ck.ReadFloat(Layer(i, "self_attn.kv_a_layernorm.weight"), {c.kv_lora_rank}));
    ASSIGN_OR_RETURN(l.kv_b, ReadLinear(ck, Layer(i, "self_attn.kv_b_proj.weight"),
                                        h * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank));
    ASSIGN_OR_RETURN(l.o, ReadLinear(ck, Layer(i, "self_attn.o_proj.weight"), d, h * c.v_head_dim));
    l.moe = c.IsMoeLayer(i);
    if (!l.moe) {
      ASSIGN_OR_RETURN(l.dense, ReadMlp(ck, Layer(i, "mlp."), d, c.intermediate_size));
      continue;
    }
    ASSIGN_OR_RETURN(l.gate, ReadLinear(ck, Layer(i, "mlp.gate.weight"), c.n_routed_experts, d));
    if (c.n_shared_experts > 0) {
      ASSIGN_OR_RETURN(l.shared, ReadMlp(ck, Layer(i, "mlp.shared_experts."), d,
                                         c.moe_intermediate_size * c.n_shared_experts));
    }
  }
  ASSIGN_OR_RETURN(w.final_norm, ck.ReadFloat("model.norm.weight", {d}));
  if (c.tie_word_embeddings) {
    w.lm_head.w = w.embed;
  } else {
    ASSIGN_OR_RETURN(w.lm_head.w, ck.ReadFloat("lm_head.weight", {c.vocab_size, d}));
  }
  w.lm_head.out = c.vocab_size;
  w.lm_head.in = d;
  return w;
}

absl::StatusOr<MlpWeights> LoadExpertWeights(const Checkpoint& ck, const ModelConfig& c,
                                             int64_t layer, int64_t expert) {
  if (!c.IsMoeLayer(layer) || expert < 0 || expert >= c.n_routed_experts) {
    return absl::InvalidArgumentError(
        absl::StrCat("no routed expert ", expert, " in layer ", layer));
  }
  return ReadMlp(ck, absl::StrCat("model.layers.", layer, ".mlp.experts.", expert, "."),
                 c.hidden_size, c.moe_intermediate_size);
}

}  // namespace dmoe
