// Element types of checkpoint tensors and exact conversions to float.
#ifndef DMOE_COMMON_DTYPE_H_
#define DMOE_COMMON_DTYPE_H_

#include <cstdint>
#include <cstring>
#include <string>

#include "absl/strings/string_view.h"

namespace dmoe {

// kF8E4M3: OCP fp8 e4m3 ("e4m3fn": no infinities, max 448), as DeepSeek-V3 checkpoints ship it,
// with a "<name>_scale_inv" tensor of 128x128 block scales beside each such weight.
enum class DType { kF32, kBF16, kF16, kF8E4M3 };

// Bytes per element.
inline size_t DTypeSize(DType t) { return t == DType::kF32 ? 4 : t == DType::kF8E4M3 ? 1 : 2; }

// Safetensors spelling ("F32", "BF16", "F16", "F8_E4M3").
const char* DTypeName(DType t);
// Returns false for a name this build does not read.
bool ParseDTypeName(absl::string_view name, DType* out);

inline float Bf16ToFloat(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Round to nearest even; NaN stays NaN.
inline uint16_t FloatToBf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);
  uint32_t rounding = 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>((bits + rounding) >> 16);
}

// fp8 e4m3: exact decode; encode rounds to nearest even and saturates to +-448 (NaN -> NaN).
float Fp8E4M3ToFloat(uint8_t v);
uint8_t FloatToFp8E4M3(float f);

float F16ToFloat(uint16_t v);
uint16_t FloatToF16(float f);

// Bulk conversions (AVX512_BF16, AVX-512F or AVX2 when the CPU has them; same results as the
// scalar forms above for every input).
void FloatToBf16N(const float* src, size_t n, uint16_t* dst);
void Bf16ToFloatN(const uint16_t* src, size_t n, float* dst);
// Tests: use at most `level` (3 AVX512_BF16, 2 AVX-512F, 1 AVX2, 0 portable; -1 = the best
// again). Returns the level the bulk conversions now use (capped by what the CPU has).
int SetBf16SimdForTesting(int level);

// Converts `n` elements of type `t` at `src` (any alignment) to float (fp8 without its scales).
void ConvertToFloat(DType t, const void* src, size_t n, float* dst);

}  // namespace dmoe

#endif  // DMOE_COMMON_DTYPE_H_
