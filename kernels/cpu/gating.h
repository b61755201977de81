// MoE gate selection for deepseek_v2 (softmax scoring; greedy or group_limited_greedy).
#ifndef DMOE_KERNELS_CPU_GATING_H_
#define DMOE_KERNELS_CPU_GATING_H_

#include <cstdint>
#include <vector>

namespace dmoe::cpu {

// DeepSeek-V2 `topk_method`: greedy, or group_limited_greedy (top `topk_group` groups first).
enum class GateMethod { kGreedy, kGroupLimitedGreedy };

struct GateParams {
  int64_t n_experts = 0;
  int64_t top_k = 0;
  GateMethod method = GateMethod::kGreedy;
  int64_t n_group = 1;
  int64_t topk_group = 1;
  bool norm_topk_prob = false;
  float routed_scaling_factor = 1.0f;
};

// For each of `t` rows of router logits [t, E] (modified in place into softmax scores), writes
// the chosen experts ids[t, k] and their weights w[t, k]. Ties go to the lower expert index.
// Weights: normalized (no scaling) when norm_topk_prob and k > 1, else scaled by rsf.
void SelectExperts(const GateParams& p, float* logits, int64_t t, int32_t* ids, float* w);

}  // namespace dmoe::cpu

#endif  // DMOE_KERNELS_CPU_GATING_H_
