// Rotary position embedding with YaRN scaling, in DeepSeek's layout: the checkpoint's interleaved
// pairs (x[2j], x[2j+1]) are de-interleaved to [x0, x2, .., x1, x3, ..] and then rotated
// NeoX-style, which equals rotating each pair by the angle p * f_j (MODEL_SPEC.md, MLA step 4-5).
#ifndef DMOE_KERNELS_CPU_ROPE_H_
#define DMOE_KERNELS_CPU_ROPE_H_

#include <cstdint>
#include <vector>

#include "model/config.h"

namespace dmoe::cpu {

// The inverse frequencies f_j, j < dim/2, with YaRN's ramp when the config asks for it.
std::vector<double> RopeInverseFrequencies(const ModelConfig& c);

// cos/sin tables [max_position_embeddings, dim/2] in fp32, already multiplied by the YaRN mscale.
class RopeTable {
 public:
  explicit RopeTable(const ModelConfig& c);
  int64_t dim() const { return dim_; }
  int64_t max_positions() const { return max_pos_; }
  // Rotates x[dim] (checkpoint layout) for position `pos` into out[dim] (de-interleaved layout).
  // x and out must not alias.
  void Apply(const float* x, int64_t pos, float* out) const;

 private:
  int64_t dim_;
  int64_t max_pos_;
  std::vector<float> cos_;
  std::vector<float> sin_;
};

}  // namespace dmoe::cpu

#endif  // DMOE_KERNELS_CPU_ROPE_H_
