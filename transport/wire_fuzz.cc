// libFuzzer target: the wire decoder on arbitrary bytes.
//
// What is exactly true of the format (transport/wire.*), and is checked here for every accepted
// input:
//   - Accepted views point only inside the input: rows at byte 64, pairs right after the rows, and
//     the pairs end exactly at the end of the input.
//   - Every header byte is either a field or reserved-and-checked-zero, payload_bytes must equal
//   the
//     rest of the buffer, f32 rows and pairs are copied bit for bit (pair weights are finite), and
//     an error's text is copied verbatim. So decoding and re-encoding with the encoder of the
//     message's kind reproduces the input byte for byte, with one exception: a bf16 row element
//     that is a signalling NaN (exponent all ones, mantissa non-zero, quiet bit 0x0040 clear) goes
//     through float and comes back quiet (FloatToBf16 sets 0x0040). Canonical(x) is x with that bit
//     set in such elements; EncodeX(DecodeMessage(x)) must equal Canonical(x), and the re-encoded
//     bytes must decode and re-encode to themselves.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

#include "transport/wire.h"

namespace {

using dmoe::wire::Header;
using dmoe::wire::Kind;
using dmoe::wire::MessageView;
using dmoe::wire::WireDType;

// A property of the format was violated: crash so libFuzzer keeps the input.
#define FUZZ_CHECK(cond)           \
  do {                             \
    if (!(cond)) __builtin_trap(); \
  } while (0)

// Re-encodes a decoded message with the encoder of its kind.
void Reencode(const MessageView& v, std::vector<uint8_t>* out) {
  const Header& h = v.header;
  if (h.kind == Kind::kError) {
    dmoe::wire::EncodeError(h, v.error, out);
    return;
  }
  // One spare element so that data() is never null, even for zero tokens.
  std::vector<float> rows(static_cast<size_t>(h.token_count) * h.hidden_size + 1);
  for (uint32_t i = 0; i < h.token_count; ++i) {
    v.RowToFloat(i, rows.data() + size_t{i} * h.hidden_size);
  }
  if (h.kind == Kind::kDispatch) {
    std::vector<dmoe::wire::Pair> pairs;
    for (uint32_t i = 0; i < h.pair_count; ++i) pairs.push_back(v.pair(i));
    dmoe::wire::EncodeDispatch(h, rows.data(), pairs, out);
  } else {
    dmoe::wire::EncodeCombine(h, rows.data(), out);
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto v = dmoe::wire::DecodeMessage(data, size);
  if (!v.ok()) return 0;
  const Header& h = v->header;
  FUZZ_CHECK(size >= dmoe::wire::kHeaderBytes &&
             h.payload_bytes == size - dmoe::wire::kHeaderBytes);

  std::vector<uint8_t> canonical(data, data + size);
  if (h.kind == Kind::kError) {
    FUZZ_CHECK(h.token_count == 0 && h.pair_count == 0 && v->error.size() == h.payload_bytes);
  } else {
    const size_t row_bytes =
        size_t{h.token_count} * h.hidden_size * dmoe::wire::WireDTypeSize(h.dtype);
    FUZZ_CHECK(v->rows == data + dmoe::wire::kHeaderBytes);
    FUZZ_CHECK(v->pairs == v->rows + row_bytes);
    FUZZ_CHECK(v->pairs + size_t{h.pair_count} * dmoe::wire::kPairBytes == data + size);
    if (h.kind == Kind::kCombine) FUZZ_CHECK(h.pair_count == 0);
    for (uint32_t i = 0; i < h.pair_count; ++i) FUZZ_CHECK(v->pair(i).token < h.token_count);
    if (h.dtype == WireDType::kBF16) {
      for (size_t off = dmoe::wire::kHeaderBytes; off < dmoe::wire::kHeaderBytes + row_bytes;
           off += 2) {
        uint16_t e;
        std::memcpy(&e, &canonical[off], 2);
        if ((e & 0x7f80) == 0x7f80 && (e & 0x7f) != 0) e |= 0x40;  // signalling NaN -> quiet
        std::memcpy(&canonical[off], &e, 2);
      }
    }
  }

  std::vector<uint8_t> again;
  Reencode(*v, &again);
  FUZZ_CHECK(again == canonical);

  // The canonical form is a fixed point.
  auto w = dmoe::wire::DecodeMessage(again.data(), again.size());
  FUZZ_CHECK(w.ok());
  std::vector<uint8_t> third;
  Reencode(*w, &third);
  FUZZ_CHECK(third == again);
  return 0;
}
