#include "kernels/cpu/rope.h"

#include <algorithm>
#include <cmath>

namespace dmoe::cpu {

std::vector<double> RopeInverseFrequencies(const RopeParams& p) {
  const int64_t dim = p.dim;
  const int64_t half = dim / 2;
  std::vector<double> f(static_cast<size_t>(half));
  for (int64_t j = 0; j < half; ++j) {
    // Upstream: 1 / base ** (arange(0, dim, 2) / dim) in fp32.
    f[static_cast<size_t>(j)] = 1.0 / std::pow(p.theta, static_cast<double>(2 * j) / dim);
  }
  if (!p.yarn) return f;
  auto corr = [&](double n) {
    return dim * std::log(static_cast<double>(p.original_max_positions) / (2 * M_PI * n)) /
           (2 * std::log(p.theta));
  };
  const double low = std::max(std::floor(corr(p.beta_fast)), 0.0);
  double high = std::min(std::ceil(corr(p.beta_slow)), static_cast<double>(dim - 1));
  if (high == low) high += 0.001;
  for (int64_t j = 0; j < half; ++j) {
    const double ramp = std::clamp((j - low) / (high - low), 0.0, 1.0);
    double& fj = f[static_cast<size_t>(j)];
    fj = (fj / p.factor) * ramp + fj * (1.0 - ramp);
  }
  return f;
}

RopeTable::RopeTable(const RopeParams& p) : dim_(p.dim), max_pos_(p.max_positions) {
  const std::vector<double> f = RopeInverseFrequencies(p);
  const double mscale = p.mscale;
  const int64_t half = dim_ / 2;
  cos_.resize(static_cast<size_t>(max_pos_ * half));
  sin_.resize(cos_.size());
  for (int64_t p = 0; p < max_pos_; ++p) {
    for (int64_t j = 0; j < half; ++j) {
      // Upstream forms the angle in fp32 (t * inv_freq with fp32 operands).
      const float angle = static_cast<float>(p) * static_cast<float>(f[static_cast<size_t>(j)]);
      cos_[static_cast<size_t>(p * half + j)] = static_cast<float>(std::cos(angle) * mscale);
      sin_[static_cast<size_t>(p * half + j)] = static_cast<float>(std::sin(angle) * mscale);
    }
  }
}

void RopeTable::Apply(const float* x, int64_t pos, float* out) const {
  const int64_t half = dim_ / 2;
  const float* cs = cos_.data() + pos * half;
  const float* sn = sin_.data() + pos * half;
  for (int64_t j = 0; j < half; ++j) {
    const float a = x[2 * j];
    const float b = x[2 * j + 1];
    out[j] = a * cs[j] - b * sn[j];
    out[j + half] = b * cs[j] + a * sn[j];
  }
}

}  // namespace dmoe::cpu
