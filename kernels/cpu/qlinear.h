// Linear layers over bf16 weights (DotRowsBf16) and 8-bit weights (weight-only quantization;
// activations stay fp32):
//   int8 with one fp32 scale per output channel  (w[o, i] = q[o, i] * scale[o]), and
//   fp8 e4m3 with 128x128 block scales as DeepSeek-V3 ships them
//                                           (w[o, i] = fp8(q[o, i]) * scale_inv[o / 128, i / 128]).
// Few rows (decode, t <= 16): AVX2 kernels convert the 8-bit weights in registers (groups of 8
// rows per pass), so memory traffic is a quarter of fp32's; more rows (prefill): dequantize (in
// parallel) into fp32 and sgemm.
#ifndef DMOE_KERNELS_CPU_QLINEAR_H_
#define DMOE_KERNELS_CPU_QLINEAR_H_

#include <cstdint>
#include <vector>

namespace dmoe::cpu {

// kBf16: bf16 bits, widened exactly to fp32 in registers (DotRowsBf16): the same results as the
// fp32 upcast, half its bytes.
enum class WeightFormat { kF32, kInt8, kFp8, kBf16 };
const char* WeightFormatName(WeightFormat f);

constexpr int64_t kFp8Block = 128;

// A weight matrix [out, in] in one of the formats (pointers owned elsewhere).
struct WeightRef {
  WeightFormat format = WeightFormat::kF32;
  const float* f32 = nullptr;     // kF32
  const uint8_t* q = nullptr;     // kInt8 (as int8_t) / kFp8 (e4m3 bytes)
  const float* scales = nullptr;  // kInt8: [out]; kFp8: [ceil(out/128), ceil(in/128)]
  int64_t out = 0;
  int64_t in = 0;
  const uint16_t* bf16 = nullptr;  // kBf16 (last: the fields above keep their positions)
  const int32_t* sums = nullptr;   // kInt8: sum of each row's int8 (nullptr: computed per call)
  // kBf16 / kInt8 / kFp8: rows interleaved in groups of 8 (PackRows: the layout the decode kernels
  // read as one stream); scales and sums stay in row order.
  bool packed = false;
};

// Whether a [out, in] matrix of format f can be packed (kBf16, kInt8 and kFp8).
bool Packable(WeightFormat f, int64_t out, int64_t in);
// Packed layouts (invariant_gemm.h, w8a8.h): each group of 8 rows occupies the bytes of those rows
// (so a matrix can be packed group by group in place), as in/C blocks of 8 x C elements, row r's
// C columns at block offset r * C; C = 8 for bf16 and fp8, 32 for int8. Packed fp8 gives the bits
// of row-major fp8 on AVX2 at every ISA level (AVX-512 decodes two rows' 8 weights per register;
// the portable path follows the same chains).
// Packs the row-major bf16 bits / int8 bytes of a packable matrix into dst (out * in elements;
// any alignment). dst == src packs in place (one group of scratch).
void PackRows(WeightFormat f, const void* src, int64_t out, int64_t in, void* dst);
// Row o of a packed matrix, row-major into dst (in elements).
void UnpackRow(WeightFormat f, const void* w, int64_t in, int64_t o, void* dst);

// int8 weights multiply int8-quantized activations (W8A8, kernels/cpu/w8a8.h: the default) or
// fp32 ones (W8A16: slower, for comparing accuracy; a packed matrix is dequantized per call and
// multiplied in fp32, so W8A16 on packed weights is slower still).
void SetInt8Activations(bool w8a8);
bool Int8ActivationsW8A8();

// y[t, out] = x[t, in] @ W^T. Row strides ldx / ldy (0: packed).
void LinearW(const float* x, int64_t t, const WeightRef& w, float* y, int64_t ldx = 0,
             int64_t ldy = 0);
// y1[t, w1.out] = x @ W1^T and y2[t, w2.out] = x @ W2^T for one x [t, in] (w1.in == w2.in; y1, y2
// packed): the bits of the two LinearW calls. Two 8-bit (W8A8) products share one quantization of
// x and one pass over the kernel pool (a decode step makes hundreds of small products, and each
// pass ends waiting for the slowest core).
void LinearW2(const float* x, int64_t t, const WeightRef& w1, float* y1, const WeightRef& w2,
              float* y2);
// Dense SwiGLU MLP over WeightRefs: y[t, d] = down(silu(gate(x)) * up(x)).
void SwiGluMlpW(const float* x, int64_t t, const WeightRef& gate, const WeightRef& up,
                const WeightRef& down, float* y, std::vector<float>* scratch);

// SwiGluMlpW's bits cut into pieces that other work can share a pass over the kernel pool with
// (a decode step's MoE layer: the router beside the shared experts' gate / up, the shared experts'
// down as the tail of the routed experts' pass, instead of the shared experts as one large task).
// For the kernels of few rows: int8 weights under W8A8 (not fp8, not W8A16), packed bf16 (A32 or
// A16), at up to kDirectRows rows or in the invariant mode; Prepare says whether they apply.
//   Prepare, then Front(i) for i < fronts() (any threads, any order), then Middle() (one thread),
//   then Back(i) for i < backs() (any threads, any order): y holds SwiGluMlpW's result. x must
//   stay valid until the last Front.
// Every piece is output rows of one product through the same kernel, so any cut gives the same
// bits. Reused from layer to layer, it allocates only when the shapes grow.
class SwiGluPieces {
 public:
  bool Prepare(const float* x, int64_t t, const WeightRef& gate, const WeightRef& up,
               const WeightRef& down, float* y);
  int fronts() const { return static_cast<int>(chunks_[0] + chunks_[1]); }
  int backs() const { return static_cast<int>(chunks_[2]); }
  void Front(int i);
  void Middle();
  void Back(int i);

 private:
  enum class Kind { kW8A8, kBf16, kBf16A16 };
  void Rows(int product, int64_t chunk);
  Kind kind_ = Kind::kW8A8;
  const float* x_ = nullptr;
  WeightRef w_[3];  // gate, up, down (copies: a ref() is often a temporary)
  const int32_t* sums_[3] = {nullptr, nullptr, nullptr};
  std::vector<int32_t> sums_here_[3];
  int64_t per_[3] = {0, 0, 0}, chunks_[3] = {0, 0, 0};
  int64_t t_ = 0, ldq_in_ = 0, ldq_mid_ = 0;
  float* y_ = nullptr;
  std::vector<int8_t> qx_, qh_;      // x and silu(g) * u, quantized per row
  std::vector<float> sx_, sh_, gu_;  // their scales; g and u [t, width] each
  std::vector<uint16_t> xb_, hb_;    // A16: x and silu(g) * u rounded to bf16
};

// Quantizers (for loading 16/32-bit checkpoints into 8 bits, and the tiny-model writer).
// int8: scale = max|w[o, :]| / 127, q = round(w / scale).
void QuantizeInt8PerChannel(const float* w, int64_t out, int64_t in, std::vector<uint8_t>* q,
                            std::vector<float>* scales);
// fp8: per 128x128 block, scale_inv = max|block| / 448, q = fp8(w / scale_inv).
void QuantizeFp8Blocks(const float* w, int64_t out, int64_t in, std::vector<uint8_t>* q,
                       std::vector<float>* scale_inv);
// Tests: run the portable (non-AVX2) paths even where the CPU has AVX2.
void ForcePortableKernelsForTesting(bool on);

// The fp32 matrix a WeightRef stands for, rows [o0, o1).
void Dequantize(const WeightRef& w, int64_t o0, int64_t o1, float* dst);

}  // namespace dmoe::cpu

#endif  // DMOE_KERNELS_CPU_QLINEAR_H_
