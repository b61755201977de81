#include "attention_service/json_constraint.h"

#include <fstream>

#include "absl/strings/str_cat.h"
#include "model/tokenizer.h"

namespace dmoe {
namespace {

constexpr const char* kLiterals[] = {"true", "false", "null"};
constexpr uint8_t kLiteralLen[] = {4, 5, 4};

bool IsDigit(uint8_t c) { return c >= '0' && c <= '9'; }
bool IsHex(uint8_t c) { return IsDigit(c) || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F'); }
bool IsBlank(uint8_t c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

}  // namespace

bool JsonState::Blank(uint8_t c) {
  if (!IsBlank(c)) {
    blanks_ = 0;
    return false;
  }
  return true;
}

bool JsonState::StartValue(uint8_t c) {
  switch (c) {
    case '{':
    case '[':
      if (depth_ >= kMaxDepth) return false;
      if (c == '{') {
        stack_ |= uint64_t{1} << depth_;
      } else {
        stack_ &= ~(uint64_t{1} << depth_);
      }
      ++depth_;
      mode_ = c == '{' ? kKeyOrEnd : kValueOrEnd;
      return true;
    case '"':
      mode_ = kString;
      key_ = false;
      return true;
    case 't':
    case 'f':
    case 'n':
      mode_ = kLiteral;
      literal_ = c == 't' ? 0 : c == 'f' ? 1 : 2;
      count_ = 1;
      return true;
    case '-':
      mode_ = kNumber;
      num_ = kMinus;
      return true;
    default:
      if (!IsDigit(c)) return false;
      mode_ = kNumber;
      num_ = c == '0' ? kZero : kInt;
      return true;
  }
}

// A byte of a UTF-8 character inside a string (RFC 3629: no overlong forms, surrogates or code
// points past U+10FFFF), which may span tokens.
bool JsonState::Utf8Byte(uint8_t c) {
  if (utf8_need_ > 0) {
    if (c < utf8_lo_ || c > utf8_hi_) return false;
    --utf8_need_;
    utf8_lo_ = 0x80;
    utf8_hi_ = 0xbf;
    return true;
  }
  utf8_lo_ = 0x80;
  utf8_hi_ = 0xbf;
  if (c >= 0xc2 && c <= 0xdf) {
    utf8_need_ = 1;
  } else if (c >= 0xe0 && c <= 0xef) {
    utf8_need_ = 2;
    if (c == 0xe0) utf8_lo_ = 0xa0;
    if (c == 0xed) utf8_hi_ = 0x9f;
  } else if (c >= 0xf0 && c <= 0xf4) {
    utf8_need_ = 3;
    if (c == 0xf0) utf8_lo_ = 0x90;
    if (c == 0xf4) utf8_hi_ = 0x8f;
  } else {
    return false;
  }
  return true;
}

// A whole \uXXXX: surrogates only as a high one followed by a low one (as nlohmann, and
// Unicode, require: a lone one is no character).
bool JsonState::Unicode() {
  const bool high = code_ >= 0xd800 && code_ <= 0xdbff, low = code_ >= 0xdc00 && code_ <= 0xdfff;
  if (high_ != low || (high_ && high)) return false;
  high_ = high;
  mode_ = high ? kLowBackslash : kString;
  return true;
}

bool JsonState::Close(bool object) {
  if (depth_ == 0 || in_object() != object) return false;
  --depth_;
  mode_ = depth_ == 0 ? kDone : kAfter;
  return true;
}

// One byte of a number. *consumed false: the number ended before `c` (which the caller reads
// as what follows it).
bool JsonState::NumberByte(uint8_t c, bool* consumed) {
  *consumed = true;
  const bool digit = IsDigit(c);
  switch (num_) {
    case kMinus:
      if (!digit) return false;
      num_ = c == '0' ? kZero : kInt;
      return true;
    case kZero:
    case kInt:
      if (digit && num_ == kInt) return true;
      if (c == '.') {
        num_ = kDot;
        return true;
      }
      if (c == 'e' || c == 'E') {
        num_ = kExp;
        return true;
      }
      if (digit) return false;  // a leading zero
      break;
    case kDot:
      if (!digit) return false;
      num_ = kFrac;
      return true;
    case kFrac:
      if (digit) return true;
      if (c == 'e' || c == 'E') {
        num_ = kExp;
        return true;
      }
      break;
    case kExp:
      if (c == '+' || c == '-') {
        num_ = kExpSign;
        return true;
      }
      if (!digit) return false;
      num_ = kExpDigits;
      return true;
    case kExpSign:
      if (!digit) return false;
      num_ = kExpDigits;
      return true;
    case kExpDigits:
      if (digit) return true;
      break;
  }
  *consumed = false;  // a complete number ends here
  mode_ = kAfter;
  return true;
}

bool JsonState::Feed(uint8_t c) {
  switch (mode_) {
    case kString:
      if (utf8_need_ > 0 || c >= 0x80) return Utf8Byte(c);
      if (c == '"') {
        mode_ = key_ ? kColon : kAfter;
        return true;
      }
      if (c == '\\') mode_ = kEscape;
      return c >= 0x20;
    case kEscape:
      if (c == 'u') {
        mode_ = kUnicode;
        count_ = 0;
        code_ = 0;
        return true;
      }
      mode_ = kString;
      return c == '"' || c == '\\' || c == '/' || c == 'b' || c == 'f' || c == 'n' || c == 'r' ||
             c == 't';
    case kUnicode:
      if (!IsHex(c)) return false;
      code_ = static_cast<uint16_t>(code_ * 16 + (IsDigit(c) ? c - '0' : (c | 0x20) - 'a' + 10));
      if (++count_ == 4) return Unicode();
      return true;
    case kLowBackslash:
      mode_ = kLowU;
      return c == '\\';
    case kLowU:
      mode_ = kUnicode;
      count_ = 0;
      code_ = 0;
      return c == 'u';
    case kLiteral:
      if (c != static_cast<uint8_t>(kLiterals[literal_][count_])) return false;
      if (++count_ == kLiteralLen[literal_]) mode_ = kAfter;
      return true;
    case kNumber: {
      bool consumed = false;
      if (!NumberByte(c, &consumed)) return false;
      if (consumed) return true;
      return Feed(c);  // the number ended: `c` follows it
    }
    case kDone:
      return false;
    default:
      break;
  }
  // Between tokens of the grammar: blanks (a bounded run), then the mode's own bytes.
  if (Blank(c)) {
    if (mode_ == kBegin || ++blanks_ > kMaxBlankRun) return false;
    return true;
  }
  return Structural(c);
}

// A byte between the grammar's tokens (not a blank): what the mode lets start or close.
bool JsonState::Structural(uint8_t c) {
  switch (mode_) {
    case kBegin:
      return c == '{' && StartValue(c);
    case kValue:
      return StartValue(c);
    case kValueOrEnd:
      return c == ']' ? Close(false) : StartValue(c);
    case kKeyOrEnd:
    case kKey:
      if (c == '}' && mode_ == kKeyOrEnd) return Close(true);
      if (c != '"') return false;
      mode_ = kString;
      key_ = true;
      return true;
    case kColon:
      if (c != ':') return false;
      mode_ = kValue;
      return true;
    case kAfter:
      if (c == ',') {
        mode_ = in_object() ? kKey : kValue;
        return true;
      }
      return (c == '}' || c == ']') && Close(c == '}');
    default:
      return false;
  }
}

JsonVocab::JsonVocab(const std::vector<std::string>* texts)
    : texts_(texts), plain_(texts->size(), 0) {
  for (size_t id = 0; id < texts->size(); ++id) {
    const std::string& b = (*texts)[id];
    if (b.empty() || b.find_first_of("\"\\") != std::string::npos) continue;
    // Inside a string, a text of whole characters without quotes or backslashes is taken whole
    // exactly when it reads as plain string bytes from the start of a character.
    JsonState t;
    const bool whole = t.Feed("{\"") && t.Feed(b) && t.in_plain_string();
    plain_[id] = whole ? 1 : 0;
  }
}

void JsonMask(const JsonState& s, const JsonVocab& vocab, const std::vector<int32_t>& stop_ids,
              std::vector<uint8_t>* allowed) {
  const std::vector<std::string>& texts = vocab.texts();
  allowed->assign(texts.size(), 0);
  const bool in_string = s.in_plain_string();
  for (size_t id = 0; id < texts.size(); ++id) {
    const std::string& b = texts[id];
    if (b.empty()) continue;
    if (in_string && vocab.plain(id)) {
      (*allowed)[id] = 1;
      continue;
    }
    JsonState t = s;
    (*allowed)[id] = t.Feed(b) ? 1 : 0;
  }
  for (int32_t id : stop_ids) {
    if (id >= 0 && static_cast<size_t>(id) < allowed->size())
      (*allowed)[static_cast<size_t>(id)] = 0;
  }
}

absl::StatusOr<std::vector<std::string>> TokenTextsFromDir(const std::string& dir,
                                                           int64_t vocab_size) {
  const std::string path = dir + "/tokenizer.json";
  if (!std::ifstream(path)) return absl::NotFoundError(absl::StrCat(path, ": no such file"));
  absl::StatusOr<std::unique_ptr<Tokenizer>> tok = Tokenizer::FromFile(path);
  if (!tok.ok()) return tok.status();
  std::vector<std::string> texts(static_cast<size_t>(vocab_size));
  for (int64_t id = 0; id < vocab_size && id < (*tok)->vocab_size(); ++id) {
    const int32_t i = static_cast<int32_t>(id);
    if (!(*tok)->IsSpecial(i)) texts[static_cast<size_t>(id)] = (*tok)->TokenBytes(i);
  }
  return texts;
}

}  // namespace dmoe
