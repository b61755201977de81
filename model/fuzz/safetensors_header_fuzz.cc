// libFuzzer target: the safetensors header parser on arbitrary file bytes.
//
// Checked for every accepted input (the contract in model/safetensors.h): each tensor's bytes lie
// in the data region (after the 8-byte length and the header), its byte count is its element
// count times its dtype's size, names are unique, and no two tensors' byte ranges overlap.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "model/safetensors.h"

#define FUZZ_CHECK(cond)           \
  do {                             \
    if (!(cond)) __builtin_trap(); \
  } while (0)

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto r = dmoe::ParseSafetensorsHeader(data, size);
  if (!r.ok()) return 0;
  FUZZ_CHECK(size >= 8);
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | data[i];
  const uint64_t data_start = 8 + header_len;
  FUZZ_CHECK(data_start <= size);

  std::set<std::string> names;
  std::vector<std::pair<uint64_t, uint64_t>> ranges;
  for (const dmoe::TensorInfo& t : *r) {
    FUZZ_CHECK(names.insert(t.name).second);
    FUZZ_CHECK(t.name != "__metadata__");
    FUZZ_CHECK(t.shape.size() <= 8);
    uint64_t numel = 1;
    for (int64_t d : t.shape) {
      FUZZ_CHECK(d >= 0);
      FUZZ_CHECK(!__builtin_mul_overflow(numel, static_cast<uint64_t>(d), &numel));
    }
    FUZZ_CHECK(static_cast<uint64_t>(t.numel()) == numel);
    FUZZ_CHECK(t.nbytes == numel * dmoe::DTypeSize(t.dtype));
    FUZZ_CHECK(t.offset >= data_start && t.offset <= size && t.nbytes <= size - t.offset);
    ranges.emplace_back(t.offset, t.nbytes);
  }
  std::sort(ranges.begin(), ranges.end());
  for (size_t i = 1; i < ranges.size(); ++i) {
    FUZZ_CHECK(ranges[i].first >= ranges[i - 1].first + ranges[i - 1].second);
  }
  return 0;
}
