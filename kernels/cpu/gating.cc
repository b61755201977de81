#include "kernels/cpu/gating.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "kernels/cpu/ops.h"

namespace dmoe::cpu {
namespace {

// Keeps the `keep` groups with the largest g (ties: lower group); sets every expert of the other
// groups to `masked` in cand.
void MaskGroups(const std::vector<float>& g, int64_t keep, int64_t per, float masked,
                std::vector<int32_t>* order, std::vector<char>* kept, std::vector<float>* cand) {
  const int64_t groups = static_cast<int64_t>(g.size());
  // Groups by g, largest first, ties in group order: a stable insertion sort (what stable_sort
  // gives, without its temporary buffer; a few groups).
  for (int64_t j = 0; j < groups; ++j) {
    const int32_t cur = static_cast<int32_t>(j);
    int64_t at = j;
    for (; at > 0 && g[static_cast<size_t>(cur)] >
                         g[static_cast<size_t>((*order)[static_cast<size_t>(at - 1)])];
         --at) {
      (*order)[static_cast<size_t>(at)] = (*order)[static_cast<size_t>(at - 1)];
    }
    (*order)[static_cast<size_t>(at)] = cur;
  }
  kept->assign(static_cast<size_t>(groups), 0);
  for (int64_t j = 0; j < keep; ++j)
    (*kept)[static_cast<size_t>((*order)[static_cast<size_t>(j)])] = 1;
  for (size_t i = 0; i < cand->size(); ++i) {
    if (!(*kept)[i / static_cast<size_t>(per)]) (*cand)[i] = masked;
  }
}

// g[j] = the sum of the two largest values of group j (noaux_tc).
void TopTwoSums(const std::vector<float>& cand, int64_t per, std::vector<float>* g) {
  for (size_t j = 0; j < g->size(); ++j) {
    float a = -std::numeric_limits<float>::infinity(), b = a;
    for (int64_t i = 0; i < per; ++i) {
      const float v = cand[j * static_cast<size_t>(per) + static_cast<size_t>(i)];
      if (v > a) {
        b = a;
        a = v;
      } else if (v > b) {
        b = v;
      }
    }
    (*g)[j] = a + b;
  }
}

}  // namespace

void SelectExperts(const GateParams& p, float* logits, int64_t t, int32_t* ids, float* w,
                   const float* bias, GateScratch* scratch) {
  const int64_t e = p.n_experts;
  const bool noaux = p.method == GateMethod::kNoauxTc;
  if (p.scoring == GateScoring::kSigmoid) {
    // exp(-x) by ops.h's ExpScaled ((x - 0) * -1 is -x exactly): the same bits on every CPU, where
    // glibc's expf picks its code by the CPU (replicas could have routed differently)
    ExpScaled(logits, t * e, 0.0f, -1.0f, logits);
    for (int64_t i = 0; i < t * e; ++i) logits[i] = 1.0f / (1.0f + logits[i]);
  } else {
    SoftmaxRows(logits, t, e, e);
  }
  // (scratch kept from call to call: a decode step selects experts once per MoE layer)
  GateScratch* given = scratch;
  if (given == nullptr) {  // (a thread_local only where needed: no TLS set-up on pool workers)
    thread_local GateScratch own;
    given = &own;
  }
  GateScratch& sc = *given;
  std::vector<float>& cand = sc.cand;
  std::vector<float>& g = sc.g;
  std::vector<int32_t>& order = sc.order;
  cand.resize(static_cast<size_t>(e));
  g.resize(static_cast<size_t>(p.n_group));
  order.resize(static_cast<size_t>(std::max(e, p.n_group)));
  const int64_t per = e / p.n_group;
  for (int64_t r = 0; r < t; ++r) {
    const float* s = logits + r * e;
    std::copy(s, s + e, cand.begin());
    if (noaux) {
      for (int64_t i = 0; i < e; ++i) cand[static_cast<size_t>(i)] += bias[i];
      TopTwoSums(cand, per, &g);
      MaskGroups(g, p.topk_group, per, -std::numeric_limits<float>::infinity(), &order, &sc.kept,
                 &cand);
    } else if (p.method == GateMethod::kGroupLimitedGreedy) {
      for (int64_t j = 0; j < p.n_group; ++j) {
        g[static_cast<size_t>(j)] = *std::max_element(s + j * per, s + (j + 1) * per);
      }
      MaskGroups(g, p.topk_group, per, 0.0f, &order, &sc.kept, &cand);
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
      rw[j] = noaux ? s[ri[j]] : cand[static_cast<size_t>(ri[j])];  // noaux: the unbiased score
      sum += rw[j];
    }
    const bool normalize = p.top_k > 1 && p.norm_topk_prob;
    if (normalize) {
      for (int64_t j = 0; j < p.top_k; ++j) rw[j] = static_cast<float>(rw[j] / (sum + 1e-20));
    }
    if (!normalize || p.scale_after_norm) {
      for (int64_t j = 0; j < p.top_k; ++j) rw[j] *= p.routed_scaling_factor;
    }
  }
}

}  // namespace dmoe::cpu
