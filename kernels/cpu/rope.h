// Rotary position embedding with YaRN scaling, in DeepSeek's layout: the checkpoint's interleaved
// pairs (x[2j], x[2j+1]) are de-interleaved to [x0, x2, .., x1, x3, ..] and then rotated
// NeoX-style, which equals rotating each pair by the angle p * f_j (MODEL_SPEC.md, MLA step 4-5).
#ifndef DMOE_KERNELS_CPU_ROPE_H_
#define DMOE_KERNELS_CPU_ROPE_H_

#include <cstdint>
#include <vector>

namespace dmoe::cpu {

// RoPE over the `dim` rotary channels of a head, with YaRN's frequency ramp and mscale when `yarn`.
struct RopeParams {
  int64_t dim = 0;            // qk_rope_head_dim
  int64_t max_positions = 0;  // max_position_embeddings: table rows
  double theta = 10000.0;     // rope_theta
  bool yarn = false;
  double factor = 1.0;
  int64_t original_max_positions = 4096;
  double beta_fast = 32.0;
  double beta_slow = 1.0;
  double mscale = 1.0;  // multiplies cos and sin (YaRN: mscale(factor, m) / mscale(factor, m_all))
};

// The inverse frequencies f_j, j < dim/2, with YaRN's ramp when the config asks for it.
std::vector<double> RopeInverseFrequencies(const RopeParams& p);

// cos/sin tables [max_position_embeddings, dim/2] in fp32, already multiplied by the YaRN mscale.
class RopeTable {
 public:
  explicit RopeTable(const RopeParams& p);
  int64_t dim() const { return dim_; }
  int64_t max_positions() const { return max_pos_; }
  // Rotates x[dim] (checkpoint layout) for position `pos` into out[dim] (de-interleaved layout).
  // x and out must not alias.
  void Apply(const float* x, int64_t pos, float* out) const;
  // The tables [max_positions, dim/2] (kernels/cuda uploads them).
  const std::vector<float>& cos_table() const { return cos_; }
  const std::vector<float>& sin_table() const { return sin_; }

 private:
  int64_t dim_;
  int64_t max_pos_;
  std::vector<float> cos_;
  std::vector<float> sin_;
};

}  // namespace dmoe::cpu

#endif  // DMOE_KERNELS_CPU_ROPE_H_
