// libFuzzer target: the wire decoder on arbitrary bytes. Accepted messages must only point inside
// the input, and re-encoding a dispatch must reproduce it.
#include <cstddef>
#include <cstdint>
#include <vector>

#include "transport/wire.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto v = dmoe::wire::DecodeMessage(data, size);
  if (!v.ok() || v->header.kind == dmoe::wire::Kind::kError) return 0;
  const auto& h = v->header;
  std::vector<float> rows(static_cast<size_t>(h.token_count) * h.hidden_size);
  for (uint32_t i = 0; i < h.token_count; ++i)
    v->RowToFloat(i, rows.data() + size_t{i} * h.hidden_size);
  if (h.kind == dmoe::wire::Kind::kDispatch) {
    std::vector<dmoe::wire::Pair> pairs;
    for (uint32_t i = 0; i < h.pair_count; ++i) pairs.push_back(v->pair(i));
    std::vector<uint8_t> again;
    dmoe::wire::EncodeDispatch(h, rows.data(), pairs, &again);
    if (again.size() != size) __builtin_trap();
  }
  return 0;
}
