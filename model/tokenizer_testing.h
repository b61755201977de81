// Test only: tokenizer.json pieces written out independently of the tokenizer.
#ifndef DMOE_MODEL_TOKENIZER_TESTING_H_
#define DMOE_MODEL_TOKENIZER_TESTING_H_

#include <string>

namespace dmoe::testing {

// GPT-2's byte -> character table, written out here independently of the tokenizer.
inline std::string ByteChar(int b) {
  const bool printable = (b >= '!' && b <= '~') || (b >= 0xa1 && b <= 0xac) || (b >= 0xae);
  int cp = b;
  if (!printable) {
    int n = 0;
    for (int x = 0; x < b; ++x) {
      if (!((x >= '!' && x <= '~') || (x >= 0xa1 && x <= 0xac) || (x >= 0xae))) ++n;
    }
    cp = 256 + n;
  }
  std::string s;
  if (cp < 0x80) {
    s.push_back(static_cast<char>(cp));
  } else {
    s.push_back(static_cast<char>(0xc0 | (cp >> 6)));
    s.push_back(static_cast<char>(0x80 | (cp & 0x3f)));
  }
  return s;
}

// A byte-level BPE tokenizer.json with no merges: byte b is token b (ByteLevel pre-tokenizer and
// decoder), so token ids are bytes. `with_added`: also the added tokens "<eos>" = 256 (special)
// and "<tool>" = 257 (not special).
std::string ByteLevelTokenizerJson(bool with_added = false);

}  // namespace dmoe::testing

#endif  // DMOE_MODEL_TOKENIZER_TESTING_H_
