// JSON mode (the OpenAI API's response_format {"type": "json_object"}): the answer is kept, byte
// by byte, a prefix of one JSON object (RFC 8259), and ends where the object closes. JsonState
// reads bytes; JsonMask says which tokens of the vocabulary may come next.
#ifndef DMOE_ATTENTION_SERVICE_JSON_CONSTRAINT_H_
#define DMOE_ATTENTION_SERVICE_JSON_CONSTRAINT_H_

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace dmoe {

// Where a JSON text stands. Trivially copyable (a token is tried on a copy). Strings take valid
// UTF-8 but control characters, '"' and '\' (escapes are checked, \uXXXX included, surrogates
// only in pairs; a character's bytes may come in different tokens). Outside strings at most
// kMaxBlankRun whitespace bytes in a row (a model cannot loop on blanks); nesting at most kMaxDepth
// levels.
class JsonState {
 public:
  static constexpr int kMaxDepth = 48;
  static constexpr int kMaxBlankRun = 16;
  // False (and the state unchanged in meaning: do not use it further) when `c` cannot follow.
  bool Feed(uint8_t c);
  bool Feed(std::string_view bytes) {
    for (char c : bytes) {
      if (!Feed(static_cast<uint8_t>(c))) return false;
    }
    return true;
  }
  // The object is closed: nothing may follow.
  bool complete() const { return mode_ == kDone; }
  // Inside a string between characters: any JsonVocab-plain text may follow and stays inside.
  bool in_plain_string() const { return mode_ == kString && utf8_need_ == 0; }

 private:
  enum Mode : uint8_t {
    kBegin,       // before the top-level '{'
    kValue,       // a value must start (after ':' or ',' in an array)
    kValueOrEnd,  // after '[': a value or ']'
    kKeyOrEnd,    // after '{': a key or '}'
    kKey,         // after ',' in an object: a key
    kColon,       // after a key
    kAfter,       // after a value: ',' or the container's closer
    kString,
    kEscape,
    kUnicode,       // \u and `count_` hex digits so far (their value in `code_`)
    kLowBackslash,  // after a high surrogate's \uD8xx-\uDBxx: its low one's '\' must follow
    kLowU,          // ... and its 'u'
    kNumber,        // `num_` says where in it
    kLiteral,       // true / false / null: `literal_` and `count_` bytes matched
    kDone,
  };
  enum Num : uint8_t { kMinus, kZero, kInt, kDot, kFrac, kExp, kExpSign, kExpDigits };
  bool Blank(uint8_t c);
  bool StartValue(uint8_t c);
  bool Close(bool object);
  bool NumberByte(uint8_t c, bool* consumed);
  bool Utf8Byte(uint8_t c);
  bool Unicode();
  bool Structural(uint8_t c);
  bool in_object() const { return depth_ > 0 && ((stack_ >> (depth_ - 1)) & 1) != 0; }

  Mode mode_ = kBegin;
  Num num_ = kMinus;
  uint8_t count_ = 0;
  uint8_t literal_ = 0;  // index into the literals
  uint8_t blanks_ = 0;   // whitespace bytes in a row
  bool key_ = false;     // the string being read is a key
  bool high_ = false;    // the \u escape being read must be a low surrogate
  uint16_t code_ = 0;
  uint8_t utf8_need_ = 0;  // continuation bytes still due in a string, the next in [lo, hi]
  uint8_t utf8_lo_ = 0x80, utf8_hi_ = 0xbf;
  uint8_t depth_ = 0;
  uint64_t stack_ = 0;  // bit i: level i is an object (else an array)
};

// A vocabulary's token texts ("" for special tokens, which never may come) with, for each, whether
// it is plain string text: whole UTF-8 characters without '"', '\' or control characters (inside
// a string such a token is taken as it is, without reading it byte by byte). Not owning `texts`.
class JsonVocab {
 public:
  explicit JsonVocab(const std::vector<std::string>* texts);
  const std::vector<std::string>& texts() const { return *texts_; }
  bool plain(size_t id) const { return plain_[id] != 0; }

 private:
  const std::vector<std::string>* texts_;
  std::vector<uint8_t> plain_;
};

// Which token ids may come next in JSON mode; `stop_ids` (eos, stop_token_ids) never may: the
// answer ends when the object closes.
void JsonMask(const JsonState& s, const JsonVocab& vocab, const std::vector<int32_t>& stop_ids,
              std::vector<uint8_t>* allowed);

// The token texts JSON mode checks (SchedulerOptions::token_bytes), from DIR/tokenizer.json: the
// bytes of each of the model's `vocab_size` ids, "" for special tokens and ids the tokenizer
// lacks. NOT_FOUND without tokenizer.json; its own errors otherwise.
absl::StatusOr<std::vector<std::string>> TokenTextsFromDir(const std::string& dir,
                                                           int64_t vocab_size);

}  // namespace dmoe

#endif  // DMOE_ATTENTION_SERVICE_JSON_CONSTRAINT_H_
