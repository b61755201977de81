// Weight binding by the Hugging Face names of MODEL_SPEC.md, converted to fp32 at load.
// The dense part (everything an attention node needs) and routed experts load separately, so
// that each process reads only the tensors it uses.
#ifndef DMOE_MODEL_WEIGHTS_H_
#define DMOE_MODEL_WEIGHTS_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "model/config.h"
#include "model/safetensors.h"

namespace dmoe {

// Row-major [out, in], as nn.Linear stores it.
struct LinearWeight {
  std::vector<float> w;
  int64_t out = 0;
  int64_t in = 0;
  bool empty() const { return w.empty(); }
};

struct MlpWeights {
  LinearWeight gate;  // [I, D]
  LinearWeight up;    // [I, D]
  LinearWeight down;  // [D, I]
};

struct LayerWeights {
  std::vector<float> input_norm;  // [D]
  std::vector<float> post_norm;   // [D]
  LinearWeight q_a;               // [r_q, D]       (q_lora_rank > 0)
  std::vector<float> q_a_norm;    // [r_q]
  LinearWeight q_b;               // [H*(dn+dr), r_q]
  LinearWeight q;                 // [H*(dn+dr), D] (q_lora_rank == 0)
  LinearWeight kv_a;              // [r+dr, D]
  std::vector<float> kv_a_norm;   // [r]
  LinearWeight kv_b;              // [H*(dn+dv), r]
  LinearWeight o;                 // [D, H*dv]
  bool moe = false;
  MlpWeights dense;   // !moe
  LinearWeight gate;  // moe: router [E, D]
  MlpWeights shared;  // moe && n_shared_experts > 0: width moe_intermediate_size * S
};

// Everything except the routed experts.
struct DenseWeights {
  std::vector<float> embed;  // [V, D]
  std::vector<LayerWeights> layers;
  std::vector<float> final_norm;  // [D]
  LinearWeight lm_head;           // [V, D]; a copy of embed when tied
};

namespace weight_names {
std::string Layer(int64_t layer, const std::string& suffix);
std::string Expert(int64_t layer, int64_t expert, const std::string& proj);  // proj: gate_proj, ...
}  // namespace weight_names

absl::StatusOr<DenseWeights> LoadDenseWeights(const Checkpoint& ck, const ModelConfig& c);
// One routed expert of one MoE layer.
absl::StatusOr<MlpWeights> LoadExpertWeights(const Checkpoint& ck, const ModelConfig& c,
                                             int64_t layer, int64_t expert);

}  // namespace dmoe

#endif  // DMOE_MODEL_WEIGHTS_H_
