#include "tests/reference/reference_model.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <limits>
#include <sstream>

#include "nlohmann/json.hpp"

namespace dmoe::reference {
namespace {

using Json = nlohmann::json;
using Vec = std::vector<double>;

[[noreturn]] void Die(const std::string& what) {
  std::fprintf(stderr, "reference model: %s\n", what.c_str());
  std::abort();
}

std::string Slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) Die("cannot open " + path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

double HalfBits(uint16_t h, bool bf16) {
  if (bf16) {
    uint32_t bits = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
  }
  const int e = (h >> 10) & 31, m = h & 1023;
  const double v = e == 0 ? std::ldexp(m, -24) : std::ldexp(1024 + m, e - 25);
  return (h & 0x8000) ? -v : v;
}

void ReadFile(const std::string& path, std::map<std::string, Vec>* out) {
  const std::string bytes = Slurp(path);
  uint64_t n = 0;
  std::memcpy(&n, bytes.data(), 8);
  const Json header = Json::parse(bytes.substr(8, n));
  const char* data = bytes.data() + 8 + n;
  for (auto it = header.begin(); it != header.end(); ++it) {
    if (it.key() == "__metadata__") continue;
    const std::string dtype = (*it)["dtype"];
    const uint64_t b = (*it)["data_offsets"][0], e = (*it)["data_offsets"][1];
    Vec v;
    if (dtype == "F32") {
      for (uint64_t p = b; p < e; p += 4) {
        float f;
        std::memcpy(&f, data + p, 4);
        v.push_back(f);
      }
    } else if (dtype == "BF16" || dtype == "F16") {
      for (uint64_t p = b; p < e; p += 2) {
        uint16_t h;
        std::memcpy(&h, data + p, 2);
        v.push_back(HalfBits(h, dtype == "BF16"));
      }
    } else {
      Die("dtype " + dtype);
    }
    (*out)[it.key()] = std::move(v);
  }
}

// y[T, out] = x[T, in] W^T with W [out, in].
Vec MatVecT(const Vec& x, int t, int in, const Vec& w, int out) {
  Vec y(static_cast<size_t>(t) * out, 0.0);
  for (int i = 0; i < t; ++i)
    for (int o = 0; o < out; ++o) {
      double s = 0;
      for (int j = 0; j < in; ++j)
        s += x[static_cast<size_t>(i) * in + j] * w[static_cast<size_t>(o) * in + j];
      y[static_cast<size_t>(i) * out + o] = s;
    }
  return y;
}

Vec RmsNorm(const Vec& x, int t, int n, const Vec& w, double eps) {
  Vec y(x.size());
  for (int i = 0; i < t; ++i) {
    double ss = 0;
    for (int j = 0; j < n; ++j)
      ss += x[static_cast<size_t>(i) * n + j] * x[static_cast<size_t>(i) * n + j];
    const double inv = 1.0 / std::sqrt(ss / n + eps);
    for (int j = 0; j < n; ++j)
      y[static_cast<size_t>(i) * n + j] = w[j] * x[static_cast<size_t>(i) * n + j] * inv;
  }
  return y;
}

double Silu(double x) { return x / (1.0 + std::exp(-x)); }

Vec Mlp(const Vec& x, int t, int d, const Vec& gate, const Vec& up, const Vec& down, int width) {
  Vec g = MatVecT(x, t, d, gate, width), u = MatVecT(x, t, d, up, width);
  for (size_t i = 0; i < g.size(); ++i) g[i] = Silu(g[i]) * u[i];
  return MatVecT(g, t, width, down, d);
}

double GetMscale(double s, double m) { return s <= 1 ? 1.0 : 0.1 * m * std::log(s) + 1.0; }

}  // namespace

ReferenceModel::ReferenceModel(const std::string& dir) {
  const Json c = Json::parse(Slurp(dir + "/config.json"));
  auto geti = [&](const char* k, int dflt) {
    return c.contains(k) && !c[k].is_null() ? c[k].get<int>() : dflt;
  };
  V_ = c["vocab_size"];
  D_ = c["hidden_size"];
  L_ = c["num_hidden_layers"];
  H_ = c["num_attention_heads"];
  rq_ = geti("q_lora_rank", 0);
  r_ = c["kv_lora_rank"];
  dn_ = c["qk_nope_head_dim"];
  dr_ = c["qk_rope_head_dim"];
  dv_ = c["v_head_dim"];
  I_ = c["intermediate_size"];
  Im_ = c["moe_intermediate_size"];
  E_ = geti("n_routed_experts", 0);
  S_ = geti("n_shared_experts", 0);
  k_ = geti("num_experts_per_tok", 0);
  G_ = geti("n_group", 1);
  kg_ = geti("topk_group", 1);
  first_dense_ = c["first_k_dense_replace"];
  freq_ = c["moe_layer_freq"];
  group_limited_ = c["topk_method"] == "group_limited_greedy";
  noaux_ = c["topk_method"] == "noaux_tc";
  sigmoid_ = c.contains("scoring_func") && c["scoring_func"] == "sigmoid";
  v3_ = c["model_type"] == "deepseek_v3";
  mtp_ = geti("num_nextn_predict_layers", 0);
  norm_topk_ = c["norm_topk_prob"];
  rsf_ = c["routed_scaling_factor"];
  eps_ = c["rms_norm_eps"];
  theta_ = c["rope_theta"];
  yarn_ = c.contains("rope_scaling") && !c["rope_scaling"].is_null();
  if (yarn_) {
    const Json& y = c["rope_scaling"];
    factor_ = y["factor"];
    orig_max_ = y["original_max_position_embeddings"];
    beta_fast_ = y["beta_fast"];
    beta_slow_ = y["beta_slow"];
    mscale_ = y["mscale"];
    mscale_all_ = y["mscale_all_dim"];
  }
  std::ifstream index(dir + "/model.safetensors.index.json");
  if (index) {
    const Json j = Json::parse(Slurp(dir + "/model.safetensors.index.json"));
    std::vector<std::string> files;
    for (auto& [name, file] : j["weight_map"].items()) files.push_back(file);
    std::sort(files.begin(), files.end());
    files.erase(std::unique(files.begin(), files.end()), files.end());
    for (const auto& f : files) ReadFile(dir + "/" + f, &t_);
  } else {
    ReadFile(dir + "/model.safetensors", &t_);
  }
}

const Vec& ReferenceModel::W(const std::string& name) const {
  auto it = t_.find(name);
  if (it == t_.end()) Die("missing " + name);
  return it->second;
}

void ReferenceModel::Rope(double* x, int p) const {
  // Inverse frequencies and YaRN (MODEL_SPEC.md step 5); rotates each checkpoint pair
  // (x[2j], x[2j+1]) by the angle p * f_j.
  double cs_scale = 1.0;
  for (int j = 0; j < dr_ / 2; ++j) {
    double f = std::pow(theta_, -2.0 * j / dr_);
    if (yarn_) {
      auto corr = [&](double n) {
        return dr_ * std::log(orig_max_ / (2 * M_PI * n)) / (2 * std::log(theta_));
      };
      double low = std::max(std::floor(corr(beta_fast_)), 0.0);
      double high = std::min(std::ceil(corr(beta_slow_)), dr_ - 1.0);
      if (high == low) high += 0.001;
      const double ramp = std::min(1.0, std::max(0.0, (j - low) / (high - low)));
      f = (f / factor_) * ramp + f * (1 - ramp);
      cs_scale = GetMscale(factor_, mscale_) / GetMscale(factor_, mscale_all_);
    }
    const double c = std::cos(p * f) * cs_scale, s = std::sin(p * f) * cs_scale;
    const double a = x[2 * j], b = x[2 * j + 1];
    x[2 * j] = a * c - b * s;
    x[2 * j + 1] = b * c + a * s;
  }
}

// MODEL_SPEC.md "MoE": the chosen experts and their weights for one token's router logits.
void ReferenceModel::Gate(int i, const double* logits, std::vector<int>* ids,
                          std::vector<double>* w) const {
  auto L = [](int i, const std::string& s) {
    return "model.layers." + std::to_string(i) + "." + s;
  };
  std::vector<double> s(logits, logits + E_);
  if (sigmoid_) {
    for (double& v : s) v = 1.0 / (1.0 + std::exp(-v));
  } else {
    const double mx = *std::max_element(s.begin(), s.end());
    double sum = 0;
    for (double& v : s) sum += (v = std::exp(v - mx));
    for (double& v : s) v /= sum;
  }
  std::vector<double> cand = s;
  if (noaux_) {
    const Vec& bias = W(L(i, "mlp.gate.e_score_correction_bias"));
    for (int e = 0; e < E_; ++e) cand[e] += bias[e];
  }
  if (group_limited_ || noaux_) {
    const int per = E_ / G_;
    std::vector<std::pair<double, int>> g;
    for (int j = 0; j < G_; ++j) {
      std::vector<double> grp(cand.begin() + j * per, cand.begin() + (j + 1) * per);
      std::sort(grp.rbegin(), grp.rend());
      g.push_back({noaux_ ? grp[0] + grp[1] : grp[0], j});
    }
    std::sort(g.begin(), g.end(), [](auto& a, auto& b) {
      return a.first != b.first ? a.first > b.first : a.second < b.second;
    });
    std::vector<bool> keep(static_cast<size_t>(G_), false);
    for (int j = 0; j < kg_; ++j) keep[g[j].second] = true;
    for (int e = 0; e < E_; ++e)
      if (!keep[e / per]) cand[e] = noaux_ ? -std::numeric_limits<double>::infinity() : 0.0;
  }
  std::vector<int> idx(static_cast<size_t>(E_));
  for (int e = 0; e < E_; ++e) idx[e] = e;
  std::sort(idx.begin(), idx.end(),
            [&](int a, int b) { return cand[a] != cand[b] ? cand[a] > cand[b] : a < b; });
  ids->assign(idx.begin(), idx.begin() + k_);
  w->assign(static_cast<size_t>(k_), 0.0);
  double wsum = 0;
  for (int j = 0; j < k_; ++j) wsum += ((*w)[j] = noaux_ ? s[idx[j]] : cand[idx[j]]);
  const bool normalize = k_ > 1 && norm_topk_;
  for (int j = 0; j < k_; ++j) {
    if (normalize) (*w)[j] /= wsum + 1e-20;
    if (!normalize || v3_) (*w)[j] *= rsf_;
  }
}

// Decoder layer i over h [T, D] at positions 0..T-1 (in place).
void ReferenceModel::Layer(int i, Vec& h, int T) const {
  const int qd = dn_ + dr_;
  auto L = [](int i, const std::string& s) {
    return "model.layers." + std::to_string(i) + "." + s;
  };
  double scale = 1.0 / std::sqrt(static_cast<double>(qd));
  if (yarn_ && mscale_all_ != 0)
    scale *= GetMscale(factor_, mscale_all_) * GetMscale(factor_, mscale_all_);
  {
    // Attention.
    Vec x = RmsNorm(h, T, D_, W(L(i, "input_layernorm.weight")), eps_);
    Vec q = rq_ > 0 ? MatVecT(RmsNorm(MatVecT(x, T, D_, W(L(i, "self_attn.q_a_proj.weight")), rq_),
                                      T, rq_, W(L(i, "self_attn.q_a_layernorm.weight")), 1e-6),
                              T, rq_, W(L(i, "self_attn.q_b_proj.weight")), H_ * qd)
                    : MatVecT(x, T, D_, W(L(i, "self_attn.q_proj.weight")), H_ * qd);
    Vec a = MatVecT(x, T, D_, W(L(i, "self_attn.kv_a_proj_with_mqa.weight")), r_ + dr_);
    Vec c(static_cast<size_t>(T) * r_), kpe(static_cast<size_t>(T) * dr_);
    for (int t = 0; t < T; ++t) {
      for (int j = 0; j < r_; ++j)
        c[static_cast<size_t>(t) * r_ + j] = a[static_cast<size_t>(t) * (r_ + dr_) + j];
      for (int j = 0; j < dr_; ++j)
        kpe[static_cast<size_t>(t) * dr_ + j] = a[static_cast<size_t>(t) * (r_ + dr_) + r_ + j];
      Rope(&kpe[static_cast<size_t>(t) * dr_], t);
      for (int hh = 0; hh < H_; ++hh) Rope(&q[(static_cast<size_t>(t) * H_ + hh) * qd + dn_], t);
    }
    c = RmsNorm(c, T, r_, W(L(i, "self_attn.kv_a_layernorm.weight")), 1e-6);
    Vec kv = MatVecT(c, T, r_, W(L(i, "self_attn.kv_b_proj.weight")), H_ * (dn_ + dv_));
    Vec o(static_cast<size_t>(T) * H_ * dv_, 0.0);
    for (int hh = 0; hh < H_; ++hh) {
      for (int t = 0; t < T; ++t) {
        std::vector<double> s(static_cast<size_t>(t) + 1);
        double mx = -std::numeric_limits<double>::infinity();
        for (int u = 0; u <= t; ++u) {
          double dot = 0;
          for (int j = 0; j < dn_; ++j)
            dot += q[(static_cast<size_t>(t) * H_ + hh) * qd + j] *
                   kv[(static_cast<size_t>(u) * H_ + hh) * (dn_ + dv_) + j];
          for (int j = 0; j < dr_; ++j)
            dot += q[(static_cast<size_t>(t) * H_ + hh) * qd + dn_ + j] *
                   kpe[static_cast<size_t>(u) * dr_ + j];
          s[u] = dot * scale;
          mx = std::max(mx, s[u]);
        }
        double sum = 0;
        for (double& v : s) sum += (v = std::exp(v - mx));
        for (int u = 0; u <= t; ++u)
          for (int j = 0; j < dv_; ++j)
            o[(static_cast<size_t>(t) * H_ + hh) * dv_ + j] +=
                s[u] / sum * kv[(static_cast<size_t>(u) * H_ + hh) * (dn_ + dv_) + dn_ + j];
      }
    }
    Vec ao = MatVecT(o, T, H_ * dv_, W(L(i, "self_attn.o_proj.weight")), D_);
    for (size_t j = 0; j < h.size(); ++j) h[j] += ao[j];

    // FFN.
    x = RmsNorm(h, T, D_, W(L(i, "post_attention_layernorm.weight")), eps_);
    Vec y;
    const bool moe = E_ > 0 && i >= first_dense_ && i % freq_ == 0;
    if (!moe) {
      y = Mlp(x, T, D_, W(L(i, "mlp.gate_proj.weight")), W(L(i, "mlp.up_proj.weight")),
              W(L(i, "mlp.down_proj.weight")), I_);
    } else {
      y.assign(h.size(), 0.0);
      Vec logits = MatVecT(x, T, D_, W(L(i, "mlp.gate.weight")), E_);
      for (int t = 0; t < T; ++t) {
        std::vector<int> idx;
        std::vector<double> w;
        Gate(i, &logits[static_cast<size_t>(t) * E_], &idx, &w);
        Vec xt(x.begin() + static_cast<long>(t) * D_, x.begin() + static_cast<long>(t + 1) * D_);
        for (int j = 0; j < k_; ++j) {
          const std::string p = L(i, "mlp.experts." + std::to_string(idx[j]) + ".");
          Vec ye = Mlp(xt, 1, D_, W(p + "gate_proj.weight"), W(p + "up_proj.weight"),
                       W(p + "down_proj.weight"), Im_);
          for (int d = 0; d < D_; ++d) y[static_cast<size_t>(t) * D_ + d] += w[j] * ye[d];
        }
      }
      if (S_ > 0) {
        Vec ys = Mlp(x, T, D_, W(L(i, "mlp.shared_experts.gate_proj.weight")),
                     W(L(i, "mlp.shared_experts.up_proj.weight")),
                     W(L(i, "mlp.shared_experts.down_proj.weight")), Im_ * S_);
        for (size_t j = 0; j < y.size(); ++j) y[j] += ys[j];
      }
    }
    for (size_t j = 0; j < h.size(); ++j) h[j] += y[j];
  }
}

std::vector<double> ReferenceModel::Forward(const std::vector<int>& tokens, Vec* hidden) const {
  const int T = static_cast<int>(tokens.size());
  Vec h(static_cast<size_t>(T) * D_);
  const Vec& emb = W("model.embed_tokens.weight");
  for (int t = 0; t < T; ++t)
    for (int j = 0; j < D_; ++j)
      h[static_cast<size_t>(t) * D_ + j] = emb[static_cast<size_t>(tokens[t]) * D_ + j];
  for (int i = 0; i < L_; ++i) Layer(i, h, T);
  Vec x = RmsNorm(h, T, D_, W("model.norm.weight"), eps_);
  if (hidden != nullptr) *hidden = x;
  const bool tied = t_.count("lm_head.weight") == 0;
  return MatVecT(x, T, D_, tied ? W("model.embed_tokens.weight") : W("lm_head.weight"), V_);
}

// MODEL_SPEC.md "MTP", with the MTP layer's own copies of embed_tokens and shared_head.head.
std::vector<double> ReferenceModel::MtpDraft(const std::vector<int>& tokens) const {
  if (mtp_ == 0) Die("the model has no MTP layer");
  const int T = static_cast<int>(tokens.size()) - 1;
  if (T < 1) Die("MtpDraft needs at least 2 tokens");
  Vec hidden;
  Forward(tokens, &hidden);
  const std::string m = "model.layers." + std::to_string(L_) + ".";
  const Vec& emb = W(m + "embed_tokens.weight");
  Vec e(static_cast<size_t>(T) * D_, 0.0);
  for (int t = 1; t < T; ++t)  // position 0's embedding is masked to 0
    for (int j = 0; j < D_; ++j)
      e[static_cast<size_t>(t) * D_ + j] = emb[static_cast<size_t>(tokens[t + 1]) * D_ + j];
  e = RmsNorm(e, T, D_, W(m + "enorm.weight"), eps_);
  hidden.resize(static_cast<size_t>(T) * D_);
  Vec hn = RmsNorm(hidden, T, D_, W(m + "hnorm.weight"), eps_);
  Vec cat(static_cast<size_t>(T) * 2 * D_);
  for (int t = 0; t < T; ++t)
    for (int j = 0; j < D_; ++j) {
      cat[static_cast<size_t>(t) * 2 * D_ + j] = e[static_cast<size_t>(t) * D_ + j];
      cat[static_cast<size_t>(t) * 2 * D_ + D_ + j] = hn[static_cast<size_t>(t) * D_ + j];
    }
  Vec y = MatVecT(cat, T, 2 * D_, W(m + "eh_proj.weight"), D_);
  Layer(L_, y, T);
  Vec x = RmsNorm(y, T, D_, W(m + "shared_head.norm.weight"), eps_);
  return MatVecT(x, T, D_, W(m + "shared_head.head.weight"), V_);
}

}  // namespace dmoe::reference
