// Weight binding by the Hugging Face names of MODEL_SPEC.md, converted to fp32 at load.
// The dense part (everything an attention node needs) and routed experts load separately, so
// that each process reads only the tensors it uses.
#ifndef DMOE_MODEL_WEIGHTS_H_
#define DMOE_MODEL_WEIGHTS_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/huge_pages.h"
#include "kernels/cpu/qlinear.h"
#include "model/config.h"
#include "model/safetensors.h"

namespace dmoe {

// [out, in], as nn.Linear stores it (row-major, or rows interleaved in groups of 8 when `packed`):
// fp32 (w), bf16 (h), or 8-bit (q) with scales —
// int8 with one scale per output channel, or fp8 e4m3 with 128x128 block scales (cpu::WeightRef).
struct LinearWeight {
  cpu::WeightFormat format = cpu::WeightFormat::kF32;
  std::vector<float> w;       // kF32
  std::vector<uint16_t> h;    // kBf16 (bits)
  std::vector<uint8_t> q;     // kInt8 / kFp8
  std::vector<float> scales;  // kInt8: [out]; kFp8: [ceil(out/128), ceil(in/128)]
  std::vector<int32_t> sums;  // kInt8: sum of each row's int8 (the W8A8 kernel's correction)
  int64_t out = 0;
  int64_t in = 0;
  // h / q hold rows interleaved in groups of 8 (cpu::PackRows: the decode kernels' layout). Every
  // bf16 and int8 matrix whose shape allows it is packed at load, except kv_b and the router gate
  // (read row-major by the attention's and the router's fp32 products); Row() and ConvertTo() read
  // either.
  bool packed = false;
  bool empty() const { return w.empty() && h.empty() && q.empty(); }
  cpu::WeightRef ref() const;
  // Bytes held (weights and scales).
  uint64_t bytes() const {
    return 4 * w.size() + 2 * h.size() + q.size() + 4 * (scales.size() + sums.size());
  }
  // Converts in place (through fp32 when neither side is fp32).
  void ConvertTo(cpu::WeightFormat f);
  // Becomes `f` (bf16, int8 or fp8) made from the fp32 matrix `src` [out, in]; `w` is dropped.
  void QuantizeFrom(const float* src, cpu::WeightFormat f);
  // Packs h / q in place where the format and shape allow (a no-op otherwise).
  void Pack();
  // Backs the buffers with transparent huge pages (UseHugePages).
  void UseHugePages() const;
  // Row r as fp32 (the embedding lookup).
  void Row(int64_t r, float* dst) const;
};

// What to hold a linear weight as: kAuto keeps a checkpoint's bf16 as bf16 and its fp8 as fp8 and
// reads anything else (f32, f16) as fp32; the others convert at load (rounding to bf16,
// quantizing to 8 bits, or dequantizing). bf16 held as bf16 gives the same bits as its fp32 upcast.
enum class WeightDType { kAuto, kF32, kBf16, kInt8, kFp8 };
// "auto", "f32", "bf16", "int8", "fp8"; false for anything else.
bool ParseWeightDType(const std::string& s, WeightDType* out);
// The name ParseWeightDType reads.
const char* WeightDTypeName(WeightDType t);
// What a tensor stored as `stored` is held as when `requested` (kAuto: bf16 and fp8 as stored,
// anything else as f32).
WeightDType HeldWeightDType(WeightDType requested, DType stored);
// How a node's products compute, for the router's check that every node of a role computes alike
// (a request's output must not depend on which of them serves it): `what` ("experts",
// "weights") = the held dtype's name (+a16 for bf16 / fp8 with --bf16-activations on the CPU; the
// GPU always rounds bf16 products' activations), " stored=" the checkpoint's dtype (int8 from bf16
// and int8 from fp8 differ), " device=" `device`.
std::string NumericsString(const char* what, const std::string& held, bool bf16_activations,
                           DType stored, const std::string& device);

struct MlpWeights {
  LinearWeight gate;  // [I, D]
  LinearWeight up;    // [I, D]
  LinearWeight down;  // [D, I]
};

struct LayerWeights {
  std::vector<float> input_norm;  // [D]
  std::vector<float> post_norm;   // [D]
  LinearWeight q_a;               // [r_q, D]       (q_lora_rank > 0)
  std::vector<float> q_a_norm;    // [r_q]
  LinearWeight q_b;               // [H*(dn+dr), r_q]
  LinearWeight q;                 // [H*(dn+dr), D] (q_lora_rank == 0)
  LinearWeight kv_a;              // [r+dr, D]
  std::vector<float> kv_a_norm;   // [r]
  LinearWeight kv_b;              // [H*(dn+dv), r]
  LinearWeight o;                 // [D, H*dv]
  bool moe = false;
  MlpWeights dense;              // !moe
  LinearWeight gate;             // moe: router [E, D]
  std::vector<float> gate_bias;  // moe && noaux_tc: e_score_correction_bias [E]
  MlpWeights shared;             // moe && n_shared_experts > 0: width moe_intermediate_size * S
};

// V3's multi-token-prediction layer (MODEL_SPEC.md "MTP"): for position i,
// x_i = eh_proj([enorm(embed(t_{i+1})), hnorm(h_i)]), y_i = layer(x_i), and the draft logits of
// t_{i+2} = lm_head(head_norm(y_i)) (embed and lm_head: the main model's).
struct MtpWeights {
  std::vector<float> enorm;      // [D]
  std::vector<float> hnorm;      // [D]
  LinearWeight eh_proj;          // [D, 2D]
  LayerWeights layer;            // a full decoder layer (index num_hidden_layers)
  std::vector<float> head_norm;  // [D] shared_head.norm
};

// Everything except the routed experts.
struct DenseWeights {
  LinearWeight embed;  // [V, D], fp32 or bf16 (read one row per token)
  std::vector<LayerWeights> layers;
  std::vector<float> final_norm;          // [D]
  LinearWeight lm_head;                   // [V, D]; a copy of embed when tied
  std::shared_ptr<const MtpWeights> mtp;  // num_nextn_predict_layers > 0; else null
};

namespace weight_names {
std::string Layer(int64_t layer, const std::string& suffix);
std::string Expert(int64_t layer, int64_t expert, const std::string& proj);  // proj: gate_proj, ...
}  // namespace weight_names

// Every weight matrix of the dense part.
void UseHugePages(const DenseWeights& w);

// `dtype` applies to the projections: q/q_a/q_b, kv_a, o, the dense and shared MLPs, lm_head
// (and, when bf16 or auto, the embedding table). kv_b (absorbed into the attention) and the
// router gate are read by fp32 products: held as bf16 (row-major) where the checkpoint stores bf16
// and `dtype` is not f32 (the products widen it exactly: the fp32 upcast's bits), else fp32; the
// embeddings stay 16/32-bit.
absl::StatusOr<DenseWeights> LoadDenseWeights(const Checkpoint& ck, const ModelConfig& c,
                                              WeightDType dtype = WeightDType::kAuto);
// Frees this thread's fp32 conversion scratch when it goes out of scope: a load through
// LoadDenseWeights or ExpertStore::Load (which hold one) leaves no scratch resident after it.
struct LoadScratchRelease {
  LoadScratchRelease() = default;
  LoadScratchRelease(const LoadScratchRelease&) = delete;
  LoadScratchRelease& operator=(const LoadScratchRelease&) = delete;
  ~LoadScratchRelease();
};
// Bytes this thread's conversion scratch holds (tests).
size_t LoadScratchBytesForTesting();
// One routed expert of one MoE layer.
absl::StatusOr<MlpWeights> LoadExpertWeights(const Checkpoint& ck, const ModelConfig& c,
                                             int64_t layer, int64_t expert,
                                             WeightDType dtype = WeightDType::kAuto);
// A linear weight: fp8 tensors need "<name>_scale_inv" (F32/BF16, [ceil(out/128), ceil(in/128)],
// finite and positive); a missing or mis-shaped one is an error naming it.
absl::StatusOr<LinearWeight> ReadLinear(const Checkpoint& ck, const std::string& name, int64_t out,
                                        int64_t in, WeightDType dtype = WeightDType::kAuto);

}  // namespace dmoe

#endif  // DMOE_MODEL_WEIGHTS_H_
