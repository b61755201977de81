// The expert data-plane wire format (DESIGN.md §3): a fixed 64-byte little-endian header, then the
// payload. Every message is validated by DecodeMessage before any field is used.
//
//   dispatch: token rows [token_count, hidden_size] in `dtype`, then pair_count pairs
//             {u32 token_index, u32 expert, f32 weight} (12 bytes each)
//   combine:  rows [token_count, hidden_size] in `dtype`, token_count = the dispatch's pair_count:
//             row p is Expert_{pair p}(x_{token of pair p}), unweighted, in the dispatch's pair
//             order; pair_count = 0. The attention node sums them in top-k rank order
//             (CombineRanked): never a partial sum whose rounding would depend on the shard split.
//             (Version 2; version 1 sent per-token weighted partial sums.)
//   error:    a UTF-8 message of payload_bytes; token_count = pair_count = 0
#ifndef DMOE_TRANSPORT_WIRE_H_
#define DMOE_TRANSPORT_WIRE_H_

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace dmoe::wire {

inline constexpr uint32_t kMagic = 0x454f4d44;  // "DMOE"
inline constexpr uint16_t kVersion = 2;
inline constexpr size_t kHeaderBytes = 64;
inline constexpr size_t kPairBytes = 12;
// Limits a receiver enforces before allocating anything.
inline constexpr uint32_t kMaxTokens = 1 << 16;
inline constexpr uint32_t kMaxHidden = 1 << 16;
inline constexpr uint32_t kMaxPairs = 1 << 20;
inline constexpr uint64_t kMaxPayloadBytes = uint64_t{1} << 31;

enum class Kind : uint16_t { kDispatch = 1, kCombine = 2, kError = 3 };
enum class WireDType : uint16_t { kF32 = 0, kBF16 = 1 };

inline size_t WireDTypeSize(WireDType t) { return t == WireDType::kF32 ? 4 : 2; }

struct Header {
  Kind kind = Kind::kDispatch;
  uint32_t sender_id = 0;
  uint64_t step_seq = 0;  // matches a combine to its dispatch
  uint32_t layer = 0;
  uint32_t micro_batch = 0;
  uint32_t token_count = 0;
  uint32_t hidden_size = 0;
  WireDType dtype = WireDType::kBF16;
  uint32_t pair_count = 0;
  uint64_t payload_bytes = 0;
};

struct Pair {
  uint32_t token;
  uint32_t expert;
  float weight;
};

// A validated view into a received buffer (which must outlive it).
struct MessageView {
  Header header;
  const uint8_t* rows = nullptr;   // token_count * hidden_size elements of header.dtype
  const uint8_t* pairs = nullptr;  // pair_count * kPairBytes (dispatch)
  std::string error;               // kError only
  Pair pair(uint32_t i) const;
  // Row i converted to float (hidden_size values).
  void RowToFloat(uint32_t i, float* out) const;
};

// Validates everything (magic, version, kind, dtype, limits, sizes consistent with the buffer,
// pair token indices < token_count, finite weights) before returning a view. INVALID_ARGUMENT
// with the reason otherwise. Never reads outside [data, data + size).
absl::StatusOr<MessageView> DecodeMessage(const uint8_t* data, size_t size);

// Encoders write into `out` (resized; its capacity is reused across calls).
void EncodeDispatch(const Header& h, const float* rows, const std::vector<Pair>& pairs,
                    std::vector<uint8_t>* out);
void EncodeCombine(const Header& h, const float* rows, std::vector<uint8_t>* out);
void EncodeError(const Header& request, const std::string& message, std::vector<uint8_t>* out);

}  // namespace dmoe::wire

#endif  // DMOE_TRANSPORT_WIRE_H_
