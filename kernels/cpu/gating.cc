#include "kernels/cpu/gating.h"

#include <algorithm>
#include <numeric>

#include "kernels/cpu/ops.h"

namespace dmoe::cpu {

void SelectExperts(const GateParams& p, float* logits, int64_t t, int32_t* ids, float* w) {
  const int64_t e = p.n_experts;
  SoftmaxRows(logits, t, e, e);
  std::vector<float> cand(static_cast<size_t>(e));
  std::vector<int32_t> order(static_cast<size_t>(std::max(e, p.n_group)));
  for (int64_t r = 0; r < t; ++r) {
    const float* s = logits + r * e;
    std::copy(s, s + e, cand.begin());
    if (p.method == GateMethod::kGroupLimitedGreedy) {
      const int64_t per = e / p.n_group;
      std::vector<float> g(static_cast<size_t>(p.n_group));
      for (int64_t j = 0; j < p.n_group; ++j) {
        g[static_cast<size_t>(j)] = *std::max_element(s + j * per, s + (j + 1) * per);
      }
      std::iota(order.begin(), order.begin() + p.n_group, 0);
      std::stable_sort(order.begin(), order.begin() + p.n_group, [&](int32_t a, int32_t b) {
        return g[static_cast<size_t>(a)] > g[static_cast<size_t>(b)];
      });
      std::vector<char> keep(static_cast<size_t>(p.n_group), 0);
      for (int64_t j = 0; j < p.topk_group; ++j)
        keep[static_cast<size_t>(order[static_cast<size_t>(j)])] = 1;
      for (int64_t i = 0; i < e; ++i) {
        if (!keep[static_cast<size_t>(i / per)]) cand[static_cast<size_t>(i)] = 0.0f;
      }
    }
    std::iota(order.begin(), order.begin() + e, 0);
    std::partial_sort(
        order.begin(), order.begin() + p.top_k, order.begin() + e, [&](int32_t a, int32_t b) {
          const float ca = cand[static_cast<size_t>(a)], cb = cand[static_cast<size_t>(b)];
          return ca != cb ? ca > cb : a < b;
        });
    int32_t* ri = ids + r * p.top_k;
    float* rw = w + r * p.top_k;
    double sum = 0.0;
    for (int64_t j = 0; j < p.top_k; ++j) {
      ri[j] = order[static_cast<size_t>(j)];
      rw[j] = cand[static_cast<size_t>(ri[j])];
      sum += rw[j];
    }
    if (p.top_k > 1 && p.norm_topk_prob) {
      for (int64_t j = 0; j < p.top_k; ++j) rw[j] = static_cast<float>(rw[j] / (sum + 1e-20));
    } else {
      for (int64_t j = 0; j < p.top_k; ++j) rw[j] *= p.routed_scaling_factor;
    }
  }
}

}  // namespace dmoe::cpu
