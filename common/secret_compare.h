// Comparing secrets (tokens, keys) without a timing side channel.
#ifndef DMOE_COMMON_SECRET_COMPARE_H_
#define DMOE_COMMON_SECRET_COMPARE_H_

#include <algorithm>
#include <string_view>

namespace dmoe {

// a == b, looking at every byte of the longer one whatever differs where.
inline bool ConstantTimeEquals(std::string_view a, std::string_view b) {
  const size_t n = std::max(a.size(), b.size());
  unsigned char diff = a.size() == b.size() ? 0 : 1;
  for (size_t i = 0; i < n; ++i) {
    const unsigned char x = i < a.size() ? static_cast<unsigned char>(a[i]) : 0;
    const unsigned char y = i < b.size() ? static_cast<unsigned char>(b[i]) : 0;
    diff |= static_cast<unsigned char>(x ^ y);
  }
  return diff == 0;
}

}  // namespace dmoe

#endif  // DMOE_COMMON_SECRET_COMPARE_H_
