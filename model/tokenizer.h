// A Hugging Face `tokenizer.json` tokenizer for byte-level BPE models (the DeepSeek family): added
// and special tokens, a Sequence of `Split` regex pre-tokenizers (through PCRE2 with Unicode
// properties) plus ByteLevel, the BPE model with ranked merges, and the ByteLevel decoder.
// Ground truth is Hugging Face's own `tokenizers` library (BUILD_NOTES.md).
#ifndef DMOE_MODEL_TOKENIZER_H_
#define DMOE_MODEL_TOKENIZER_H_

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "absl/status/statusor.h"

namespace dmoe {

class Tokenizer {
 public:
  // INVALID_ARGUMENT naming what is unsupported or malformed (model type, pre-tokenizer, regex).
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromJson(const std::string& json_text);
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromFile(const std::string& path);
  ~Tokenizer();

  // Token ids of `text` (bytes; invalid UTF-8 is tokenized byte by byte), without adding special
  // tokens; added/special tokens written in the text are recognized. Thread-safe.
  std::vector<int32_t> Encode(const std::string& text) const;
  // The exact bytes of the tokens (decode(encode(s)) == s). Unknown ids are skipped.
  std::string Decode(const std::vector<int32_t>& ids) const;
  // The bytes of one token.
  std::string TokenBytes(int32_t id) const;
  int64_t vocab_size() const { return static_cast<int64_t>(id_to_token_.size()); }
  // The id of an added or model token, or -1.
  int32_t TokenId(const std::string& token) const;
  // Whether `id` is an added token marked "special" (BOS, EOS, ...: what Hugging Face's
  // skip_special_tokens leaves out of decoded text).
  bool IsSpecial(int32_t id) const {
    return id >= 0 && static_cast<size_t>(id) < special_.size() &&
           special_[static_cast<size_t>(id)];
  }

 private:
  struct Regex;
  struct Trie;
  struct Loader;  // FromJson's parts (tokenizer.cc)
  friend struct Loader;
  Tokenizer() = default;
  void EncodePiece(const std::string& piece, std::vector<int32_t>* out) const;
  void EncodeText(const std::string& text, std::vector<int32_t>* out) const;
  void SplitAdded(const std::string& text, const Trie& trie, std::vector<std::string>* pieces,
                  std::vector<int32_t>* ids) const;

  std::unordered_map<std::string, int32_t> vocab_;                    // byte-level strings
  std::vector<std::string> id_to_token_;                              // as in tokenizer.json
  std::vector<bool> special_;                                         // by id
  std::unordered_map<uint64_t, std::pair<int32_t, int32_t>> merges_;  // (a, b) -> (rank, id)
  std::vector<std::unique_ptr<Regex>> splits_;
  std::unique_ptr<Trie> added_raw_, added_normalized_;
  std::vector<std::string> byte_char_;  // byte -> its ByteLevel character (UTF-8)
  std::unordered_map<std::string, int32_t> char_byte_;
};

// Rewrites a tokenizer.json regex (Oniguruma syntax, as Hugging Face's `tokenizers` compiles it)
// for PCRE2 with PCRE2_UTF | PCRE2_UCP, where the two disagree on a character class:
// - `\s` / `\S`: Oniguruma's is Unicode's White_Space property (25 code points); PCRE2's also
//   holds U+180E MONGOLIAN VOWEL SEPARATOR (White_Space until Unicode 6.3) -> \p{White_Space}.
// - `\h` / `\H`: Oniguruma's is a hexadecimal digit [0-9a-fA-F]; PCRE2's horizontal space.
// - `\v`: Oniguruma's is the character U+000B; PCRE2's vertical space (7 code points).
// INVALID_ARGUMENT for `\H` inside a character class (no PCRE2 equivalent without nesting).
absl::StatusOr<std::string> OnigurumaRegexToPcre2(const std::string& pattern);

// Turns a stream of token ids into text that never ends in the middle of a UTF-8 sequence:
// bytes of an incomplete character are held back until it completes (invalid bytes come out as
// U+FFFD once they cannot start or continue a character).
class IncrementalDetokenizer {
 public:
  // `skip_special`: special tokens (Tokenizer::IsSpecial) add no text.
  explicit IncrementalDetokenizer(const Tokenizer* t, bool skip_special = false)
      : t_(t), skip_special_(skip_special) {}
  // The text that became complete with this token (possibly empty).
  std::string Add(int32_t id);
  // Whatever is held back, with incomplete sequences as U+FFFD.
  std::string Flush();

 private:
  const Tokenizer* t_;
  const bool skip_special_;
  std::string pending_;
};

}  // namespace dmoe

#endif  // DMOE_MODEL_TOKENIZER_H_
