#include "model/kernel_params.h"

namespace dmoe {

cpu::GateParams GateParamsOf(const ModelConfig& c) {
  cpu::GateParams p;
  p.n_experts = c.n_routed_experts;
  p.top_k = c.num_experts_per_tok;
  switch (c.topk_method) {
    case TopkMethod::kGreedy:
      p.method = cpu::GateMethod::kGreedy;
      break;
    case TopkMethod::kGroupLimitedGreedy:
      p.method = cpu::GateMethod::kGroupLimitedGreedy;
      break;
    case TopkMethod::kNoauxTc:
      p.method = cpu::GateMethod::kNoauxTc;
      break;
  }
  p.scoring = c.scoring_func == ScoringFunc::kSigmoid ? cpu::GateScoring::kSigmoid
                                                      : cpu::GateScoring::kSoftmax;
  p.scale_after_norm = c.ScaleAfterNorm();
  p.n_group = c.n_group > 0 ? c.n_group : 1;
  p.topk_group = c.topk_group > 0 ? c.topk_group : 1;
  p.norm_topk_prob = c.norm_topk_prob;
  p.routed_scaling_factor = static_cast<float>(c.routed_scaling_factor);
  return p;
}

cpu::RopeParams RopeParamsOf(const ModelConfig& c) {
  cpu::RopeParams p;
  p.dim = c.qk_rope_head_dim;
  p.max_positions = c.max_position_embeddings;
  p.theta = c.rope_theta;
  p.yarn = c.rope_scaling.yarn;
  p.factor = c.rope_scaling.factor;
  p.original_max_positions = c.rope_scaling.original_max_position_embeddings;
  p.beta_fast = c.rope_scaling.beta_fast;
  p.beta_slow = c.rope_scaling.beta_slow;
  p.mscale = c.RopeMscale();
  return p;
}

}  // namespace dmoe
