// MoE gate selection: deepseek_v2 (softmax scoring; greedy or group_limited_greedy) and
// deepseek_v3 (sigmoid scoring, noaux_tc with a selection bias).
#ifndef DMOE_KERNELS_CPU_GATING_H_
#define DMOE_KERNELS_CPU_GATING_H_

#include <cstdint>
#include <vector>

namespace dmoe::cpu {

// `topk_method`: greedy, group_limited_greedy (top `topk_group` groups by their best score
// first), or noaux_tc (groups ranked by the sum of their two best biased scores; the other
// groups' experts masked with -inf; experts chosen by biased score, weighted by unbiased score).
enum class GateMethod { kGreedy, kGroupLimitedGreedy, kNoauxTc };
enum class GateScoring { kSoftmax, kSigmoid };

struct GateParams {
  int64_t n_experts = 0;
  int64_t top_k = 0;
  GateMethod method = GateMethod::kGreedy;
  GateScoring scoring = GateScoring::kSoftmax;
  int64_t n_group = 1;
  int64_t topk_group = 1;
  bool norm_topk_prob = false;
  float routed_scaling_factor = 1.0f;
  // V3: the normalized weights are also scaled by rsf (V2 normalizes or scales).
  bool scale_after_norm = false;
};

// SelectExperts' scratch, kept from call to call by its caller (see there).
struct GateScratch {
  std::vector<float> cand, g;
  std::vector<int32_t> order;
  std::vector<char> kept;
};

// For each of `t` rows of router logits [t, E] (modified in place into the scores: softmax or
// sigmoid), writes the chosen experts ids[t, k] and their weights w[t, k]. Ties go to the lower
// expert (and group) index. Weights: normalized when norm_topk_prob and k > 1, else scaled by
// rsf; normalized and then scaled with scale_after_norm. `bias` [E] (noaux_tc's
// e_score_correction_bias) is required for noaux_tc and ignored otherwise.
// `scratch`: kept from call to call by the caller (repeated calls then allocate nothing on any
// thread); nullptr: the calling thread's own.
void SelectExperts(const GateParams& p, float* logits, int64_t t, int32_t* ids, float* w,
                   const float* bias = nullptr, GateScratch* scratch = nullptr);

}  // namespace dmoe::cpu

#endif  // DMOE_KERNELS_CPU_GATING_H_
