#include "transport/wire.h"

#include <cmath>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "common/dtype.h"

namespace dmoe::wire {
namespace {

// Little-endian field access at fixed offsets (the machines we target are little-endian; memcpy
// keeps unaligned access defined).
template <typename T>
T Load(const uint8_t* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}
template <typename T>
void Store(uint8_t* p, T v) {
  std::memcpy(p, &v, sizeof(T));
}

// Offsets inside the 64-byte header.
enum : size_t {
  kOffMagic = 0,
  kOffVersion = 4,
  kOffKind = 6,
  kOffSender = 8,
  kOffSeq = 12,
  kOffLayer = 20,
  kOffMicroBatch = 24,
  kOffTokens = 28,
  kOffHidden = 32,
  kOffDType = 36,
  kOffReserved16 = 38,
  kOffPairs = 40,
  kOffPayload = 44,
  // 52..63 reserved, must be zero
};

void WriteHeader(const Header& h, uint8_t* p) {
  std::memset(p, 0, kHeaderBytes);
  Store<uint32_t>(p + kOffMagic, kMagic);
  Store<uint16_t>(p + kOffVersion, kVersion);
  Store<uint16_t>(p + kOffKind, static_cast<uint16_t>(h.kind));
  Store<uint32_t>(p + kOffSender, h.sender_id);
  Store<uint64_t>(p + kOffSeq, h.step_seq);
  Store<uint32_t>(p + kOffLayer, h.layer);
  Store<uint32_t>(p + kOffMicroBatch, h.micro_batch);
  Store<uint32_t>(p + kOffTokens, h.token_count);
  Store<uint32_t>(p + kOffHidden, h.hidden_size);
  Store<uint16_t>(p + kOffDType, static_cast<uint16_t>(h.dtype));
  Store<uint32_t>(p + kOffPairs, h.pair_count);
  Store<uint64_t>(p + kOffPayload, h.payload_bytes);
}

void WriteRows(WireDType dtype, const float* rows, size_t n, uint8_t* p) {
  if (dtype == WireDType::kF32) {
    std::memcpy(p, rows, n * 4);
    return;
  }
  if (reinterpret_cast<uintptr_t>(p) % 2 == 0) {
    FloatToBf16N(rows, n, reinterpret_cast<uint16_t*>(p));
    return;
  }
  for (size_t i = 0; i < n; ++i) Store<uint16_t>(p + 2 * i, FloatToBf16(rows[i]));
}

absl::Status Bad(absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat("wire message: ", what));
}

}  // namespace

Pair MessageView::pair(uint32_t i) const {
  const uint8_t* p = pairs + static_cast<size_t>(i) * kPairBytes;
  return Pair{Load<uint32_t>(p), Load<uint32_t>(p + 4), Load<float>(p + 8)};
}

void MessageView::RowToFloat(uint32_t i, float* out) const {
  const size_t n = header.hidden_size;
  const uint8_t* p = rows + static_cast<size_t>(i) * n * WireDTypeSize(header.dtype);
  if (header.dtype == WireDType::kF32) {
    std::memcpy(out, p, n * 4);
  } else {
    if (reinterpret_cast<uintptr_t>(p) % 2 == 0) {
      Bf16ToFloatN(reinterpret_cast<const uint16_t*>(p), n, out);
      return;
    }
    for (size_t j = 0; j < n; ++j) out[j] = Bf16ToFloat(Load<uint16_t>(p + 2 * j));
  }
}

absl::StatusOr<MessageView> DecodeMessage(const uint8_t* data, size_t size) {
  if (size < kHeaderBytes) {
    return Bad(absl::StrCat(size, " bytes is shorter than the ", kHeaderBytes, "-byte header"));
  }
  if (Load<uint32_t>(data + kOffMagic) != kMagic) return Bad("bad magic");
  const uint16_t version = Load<uint16_t>(data + kOffVersion);
  if (version != kVersion) return Bad(absl::StrCat("unsupported version ", version));
  if (Load<uint16_t>(data + kOffReserved16) != 0) return Bad("reserved bytes are not zero");
  for (size_t i = 52; i < kHeaderBytes; ++i) {
    if (data[i] != 0) return Bad("reserved bytes are not zero");
  }
  MessageView v;
  Header& h = v.header;
  const uint16_t kind = Load<uint16_t>(data + kOffKind);
  if (kind < 1 || kind > 3) return Bad(absl::StrCat("unknown kind ", kind));
  h.kind = static_cast<Kind>(kind);
  h.sender_id = Load<uint32_t>(data + kOffSender);
  h.step_seq = Load<uint64_t>(data + kOffSeq);
  h.layer = Load<uint32_t>(data + kOffLayer);
  h.micro_batch = Load<uint32_t>(data + kOffMicroBatch);
  h.token_count = Load<uint32_t>(data + kOffTokens);
  h.hidden_size = Load<uint32_t>(data + kOffHidden);
  const uint16_t dtype = Load<uint16_t>(data + kOffDType);
  if (dtype > 1) return Bad(absl::StrCat("unknown dtype ", dtype));
  h.dtype = static_cast<WireDType>(dtype);
  h.pair_count = Load<uint32_t>(data + kOffPairs);
  h.payload_bytes = Load<uint64_t>(data + kOffPayload);
  if (h.payload_bytes > kMaxPayloadBytes) {
    return Bad(absl::StrCat("payload of ", h.payload_bytes, " bytes exceeds the limit"));
  }
  if (h.payload_bytes != size - kHeaderBytes) {
    return Bad(absl::StrCat("header says ", h.payload_bytes, " payload bytes, message has ",
                            size - kHeaderBytes));
  }
  const uint8_t* payload = data + kHeaderBytes;
  if (h.kind == Kind::kError) {
    if (h.token_count != 0 || h.pair_count != 0) return Bad("error message with tokens or pairs");
    v.error.assign(reinterpret_cast<const char*>(payload), h.payload_bytes);
    return v;
  }
  if (h.token_count > kMaxTokens)
    return Bad(absl::StrCat("token_count ", h.token_count, " too large"));
  if (h.hidden_size == 0 || h.hidden_size > kMaxHidden) {
    return Bad(absl::StrCat("hidden_size ", h.hidden_size, " out of range"));
  }
  if (h.pair_count > kMaxPairs) return Bad(absl::StrCat("pair_count ", h.pair_count, " too large"));
  if (h.kind == Kind::kCombine && h.pair_count != 0) return Bad("combine message with pairs");
  const uint64_t row_bytes = static_cast<uint64_t>(h.token_count) * h.hidden_size *
                             WireDTypeSize(h.dtype);  // < 2^33, no overflow
  const uint64_t expect = row_bytes + static_cast<uint64_t>(h.pair_count) * kPairBytes;
  if (expect != h.payload_bytes) {
    return Bad(
        absl::StrCat("sizes give ", expect, " payload bytes, header says ", h.payload_bytes));
  }
  v.rows = payload;
  v.pairs = payload + row_bytes;
  for (uint32_t i = 0; i < h.pair_count; ++i) {
    const Pair p = v.pair(i);
    if (p.token >= h.token_count) {
      return Bad(absl::StrCat("pair ", i, " names token ", p.token, " of ", h.token_count));
    }
    if (!std::isfinite(p.weight)) return Bad(absl::StrCat("pair ", i, " has a non-finite weight"));
  }
  return v;
}

void EncodeDispatch(const Header& h, const float* rows, const std::vector<Pair>& pairs,
                    std::vector<uint8_t>* out) {
  Header hh = h;
  hh.kind = Kind::kDispatch;
  hh.pair_count = static_cast<uint32_t>(pairs.size());
  const size_t nrow = static_cast<size_t>(h.token_count) * h.hidden_size;
  const size_t row_bytes = nrow * WireDTypeSize(h.dtype);
  hh.payload_bytes = row_bytes + pairs.size() * kPairBytes;
  out->resize(kHeaderBytes + hh.payload_bytes);
  uint8_t* p = out->data();
  WriteHeader(hh, p);
  WriteRows(h.dtype, rows, nrow, p + kHeaderBytes);
  uint8_t* q = p + kHeaderBytes + row_bytes;
  for (const Pair& pr : pairs) {
    Store<uint32_t>(q, pr.token);
    Store<uint32_t>(q + 4, pr.expert);
    Store<float>(q + 8, pr.weight);
    q += kPairBytes;
  }
}

void EncodeCombine(const Header& h, const float* rows, std::vector<uint8_t>* out) {
  Header hh = h;
  hh.kind = Kind::kCombine;
  hh.pair_count = 0;
  const size_t nrow = static_cast<size_t>(h.token_count) * h.hidden_size;
  hh.payload_bytes = nrow * WireDTypeSize(h.dtype);
  out->resize(kHeaderBytes + hh.payload_bytes);
  WriteHeader(hh, out->data());
  WriteRows(h.dtype, rows, nrow, out->data() + kHeaderBytes);
}

void EncodeError(const Header& request, const std::string& message, std::vector<uint8_t>* out) {
  Header hh = request;
  hh.kind = Kind::kError;
  hh.token_count = 0;
  hh.pair_count = 0;
  hh.payload_bytes = message.size();
  out->resize(kHeaderBytes + message.size());
  WriteHeader(hh, out->data());
  std::memcpy(out->data() + kHeaderBytes, message.data(), message.size());
}

}  // namespace dmoe::wire
