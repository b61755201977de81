// A deliberately naive float64 DeepSeek-V2 / V3 forward pass (and V3's MTP draft), written straight
// from MODEL_SPEC.md. It shares no code with the engine: its own safetensors reading, its own
// config reading, its own loops. Slow by design; for tests on the tiny presets only.
#ifndef DMOE_TESTS_REFERENCE_REFERENCE_MODEL_H_
#define DMOE_TESTS_REFERENCE_REFERENCE_MODEL_H_

#include <map>
#include <string>
#include <vector>

namespace dmoe::reference {

class ReferenceModel {
 public:
  // Loads DIR/config.json and every tensor of DIR (single file or index). Aborts on bad input:
  // this is test code reading files the test just wrote.
  explicit ReferenceModel(const std::string& dir);
  // Logits [T, V] of one full causal forward at positions 0..T-1, row-major. `hidden`, if set,
  // receives the final-normed hidden states [T, D].
  std::vector<double> Forward(const std::vector<int>& tokens,
                              std::vector<double>* hidden = nullptr) const;
  // V3's MTP layer (num_nextn_predict_layers = 1): draft logits [T-1, V] of t_{i+2} for
  // positions i = 0..T-2 of `tokens` (T >= 2).
  std::vector<double> MtpDraft(const std::vector<int>& tokens) const;
  int vocab_size() const { return V_; }

 private:
  const std::vector<double>& W(const std::string& name) const;
  void Rope(double* x, int p) const;
  void Gate(int layer, const double* logits, std::vector<int>* ids, std::vector<double>* w) const;
  void Layer(int i, std::vector<double>& h, int T) const;

  int V_, D_, L_, H_, rq_, r_, dn_, dr_, dv_, I_, Im_, E_, S_, k_, G_, kg_, first_dense_, freq_;
  bool group_limited_, noaux_, sigmoid_, v3_, norm_topk_, yarn_;
  int mtp_;
  double rsf_, eps_, theta_, factor_, beta_fast_, beta_slow_, mscale_, mscale_all_;
  int orig_max_;
  std::map<std::string, std::vector<double>> t_;
};

}  // namespace dmoe::reference

#endif  // DMOE_TESTS_REFERENCE_REFERENCE_MODEL_H_
