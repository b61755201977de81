// JsonState (JSON mode's automaton) under libFuzzer against nlohmann's parser as the oracle: the
// input is taken whole exactly when it is one JSON object starting at its first byte and ending
// at its last, with no run of blanks over kMaxBlankRun and no nesting past kMaxDepth; it is
// complete nowhere before its end. A disagreement aborts.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "attention_service/json_constraint.h"
#include "nlohmann/json.hpp"

namespace {

// The same text with every run of digits outside strings shortened to at most two ("0x" kept
// as "00", others as "11"): nlohmann refuses numbers a double cannot hold (out_of_range 406),
// which RFC 8259 allows. No text becomes valid or invalid by it (a leading zero stays one).
std::string ShortDigits(const std::string& s) {
  std::string out;
  bool in_string = false, escaped = false;
  for (size_t i = 0; i < s.size();) {
    const char c = s[i];
    if (in_string || c < '0' || c > '9') {
      if (in_string && !escaped && c == '"')
        in_string = false;
      else if (!in_string && c == '"')
        in_string = true;
      escaped = in_string && !escaped && c == '\\';
      out += s[i++];
      continue;
    }
    size_t j = i;
    while (j < s.size() && s[j] >= '0' && s[j] <= '9') ++j;
    out += j - i == 1 ? s.substr(i, 1) : c == '0' ? "00" : "11";
    i = j;
  }
  return out;
}

bool Oracle(const std::string& s) {
  if (s.empty() || s.front() != '{' || s.back() != '}') return false;
  // nlohmann's lexer reads a NUL byte as the end of the input; JSON has none outside strings,
  // and none unescaped inside.
  if (s.find('\0') != std::string::npos) return false;
  if (!nlohmann::json::accept(s) && !nlohmann::json::accept(ShortDigits(s))) return false;
  int run = 0, depth = 0, max_depth = 0;
  bool in_string = false, escaped = false;
  for (char c : s) {
    if (in_string) {
      if (escaped) {
        escaped = false;
      } else if (c == '\\') {
        escaped = true;
      } else if (c == '"') {
        in_string = false;
      }
      continue;
    }
    run = (c == ' ' || c == '\n' || c == '\t' || c == '\r') ? run + 1 : 0;
    if (run > dmoe::JsonState::kMaxBlankRun) return false;
    if (c == '"') in_string = true;
    if (c == '{' || c == '[') max_depth = std::max(max_depth, ++depth);
    if (c == '}' || c == ']') --depth;
  }
  return max_depth <= dmoe::JsonState::kMaxDepth;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string s(reinterpret_cast<const char*>(data), size);
  dmoe::JsonState st;
  bool taken = true;
  for (size_t i = 0; i < s.size() && taken; ++i) {
    if (st.complete()) {
      taken = false;  // something after the object
      break;
    }
    taken = st.Feed(static_cast<uint8_t>(s[i]));
  }
  taken = taken && st.complete();
  if (taken != Oracle(s)) std::abort();
  return 0;
}
