// Lexer and parser of gateway/jinja.h: src/lexer.ts and src/parser.ts of @huggingface/jinja 0.5,
// function by function (see the comments there for where they differ from Python's Jinja), plus
// the JS string and number helpers both halves use.
#include <locale.h>
#include <wctype.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <optional>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "gateway/jinja.h"
#include "gateway/jinja_internal.h"

namespace dmoe::gateway::jinja {
namespace internal {

using absl::Status;
using absl::StatusOr;

// ---------------------------------------------------------------------------------------------
// Text: UTF-8 with WTF-8 lone surrogates, JS whitespace, UTF-16 lengths, JS numbers.

uint32_t DecodeAt(std::string_view s, size_t i, size_t* len) {
  const auto b = [&](size_t k) { return static_cast<uint32_t>(static_cast<uint8_t>(s[i + k])); };
  const uint32_t c = b(0);
  size_t n = c < 0x80 ? 1 : c < 0xe0 ? 2 : c < 0xf0 ? 3 : 4;
  if (i + n > s.size()) n = 1;
  *len = n;
  switch (n) {
    case 2:
      return ((c & 0x1f) << 6) | (b(1) & 0x3f);
    case 3:
      return ((c & 0x0f) << 12) | ((b(1) & 0x3f) << 6) | (b(2) & 0x3f);
    case 4:
      return ((c & 0x07) << 18) | ((b(1) & 0x3f) << 12) | ((b(2) & 0x3f) << 6) | (b(3) & 0x3f);
    default:
      return c;
  }
}

void AppendCp(uint32_t cp, std::string* out) {
  if (cp < 0x80) {
    out->push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out->push_back(static_cast<char>(0xc0 | (cp >> 6)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3f)));
  } else if (cp < 0x10000) {
    out->push_back(static_cast<char>(0xe0 | (cp >> 12)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3f)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3f)));
  } else {
    out->push_back(static_cast<char>(0xf0 | (cp >> 18)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3f)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3f)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3f)));
  }
}

bool ValidUtf8(std::string_view s) {
  for (size_t i = 0; i < s.size();) {
    const auto c = static_cast<uint8_t>(s[i]);
    size_t n = c < 0x80                  ? 1
               : (c >= 0xc2 && c < 0xe0) ? 2
               : (c >= 0xe0 && c < 0xf0) ? 3
               : (c >= 0xf0 && c < 0xf5) ? 4
                                         : 0;
    if (n == 0 || i + n > s.size()) return false;
    for (size_t k = 1; k < n; ++k) {
      if ((static_cast<uint8_t>(s[i + k]) & 0xc0) != 0x80) return false;
    }
    size_t len;
    const uint32_t cp = DecodeAt(s, i, &len);
    if ((n == 3 && (cp < 0x800 || (cp >= 0xd800 && cp < 0xe000))) ||
        (n == 4 && (cp < 0x10000 || cp > 0x10ffff))) {
      return false;
    }
    i += n;
  }
  return true;
}

// JS `\s` (WhiteSpace and LineTerminator).
bool IsJsSpace(uint32_t c) {
  return (c >= 0x09 && c <= 0x0d) || c == 0x20 || c == 0xa0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200a) || c == 0x2028 || c == 0x2029 || c == 0x202f || c == 0x205f ||
         c == 0x3000 || c == 0xfeff;
}

size_t SpaceLen(std::string_view s, size_t i) {
  if (i >= s.size()) return 0;
  size_t n;
  return IsJsSpace(DecodeAt(s, i, &n)) ? n : 0;
}

std::string_view TrimJs(std::string_view s, bool left, bool right) {
  size_t b = 0, e = s.size();
  while (left && b < e) {
    const size_t n = SpaceLen(s, b);
    if (n == 0) break;
    b += n;
  }
  while (right && e > b) {
    size_t st = e - 1, n;
    while (st > b && (static_cast<uint8_t>(s[st]) & 0xc0) == 0x80) --st;
    if (!IsJsSpace(DecodeAt(s, st, &n))) break;
    e = st;
  }
  return s.substr(b, e - b);
}

// JS string concatenation: a high surrogate ending dst and a low one starting src become one
// character.
void AppendJs(std::string* dst, std::string_view src) {
  const size_t d = dst->size();
  if (d >= 3 && src.size() >= 3 && static_cast<uint8_t>((*dst)[d - 3]) == 0xed &&
      (static_cast<uint8_t>((*dst)[d - 2]) & 0xf0) == 0xa0 &&
      static_cast<uint8_t>(src[0]) == 0xed && (static_cast<uint8_t>(src[1]) & 0xf0) == 0xb0) {
    size_t n;
    const uint32_t hi = DecodeAt(*dst, d - 3, &n), lo = DecodeAt(src, 0, &n);
    dst->resize(d - 3);
    AppendCp(0x10000 + ((hi - 0xd800) << 10) + (lo - 0xdc00), dst);
    dst->append(src.substr(3));
  } else {
    dst->append(src);
  }
}

std::vector<uint16_t> ToUtf16(std::string_view s) {
  std::vector<uint16_t> u;
  for (size_t i = 0, n; i < s.size(); i += n) {
    const uint32_t cp = DecodeAt(s, i, &n);
    if (cp >= 0x10000) {
      u.push_back(static_cast<uint16_t>(0xd800 + ((cp - 0x10000) >> 10)));
      u.push_back(static_cast<uint16_t>(0xdc00 + ((cp - 0x10000) & 0x3ff)));
    } else {
      u.push_back(static_cast<uint16_t>(cp));
    }
  }
  return u;
}

size_t Utf16Len(std::string_view s) {
  size_t units = 0;
  for (size_t i = 0, n; i < s.size(); i += n) units += DecodeAt(s, i, &n) >= 0x10000 ? 2 : 1;
  return units;
}

std::vector<std::string_view> CodePoints(std::string_view s) {
  std::vector<std::string_view> cps;
  for (size_t i = 0, n; i < s.size(); i += n) {
    DecodeAt(s, i, &n);
    cps.push_back(s.substr(i, n));
  }
  return cps;
}

// String.prototype.toUpperCase/toLowerCase: the simple Unicode mapping of glibc's C.UTF-8 plus
// the common one-to-many cases (ß -> SS, İ -> i̇).
std::string CaseMap(std::string_view s, bool upper) {
  static const locale_t loc = newlocale(LC_CTYPE_MASK, "C.UTF-8", static_cast<locale_t>(0));
  std::string out;
  out.reserve(s.size());
  for (size_t i = 0, n; i < s.size(); i += n) {
    uint32_t cp = DecodeAt(s, i, &n);
    if (cp < 0x80) {
      out.push_back(static_cast<char>(upper ? (cp >= 'a' && cp <= 'z' ? cp - 32 : cp)
                                            : (cp >= 'A' && cp <= 'Z' ? cp + 32 : cp)));
      continue;
    }
    if (upper && cp == 0xdf) {
      out += "SS";
      continue;
    }
    if (!upper && cp == 0x130) {
      out += "i\xcc\x87";
      continue;
    }
    if (loc != static_cast<locale_t>(0) && (cp < 0xd800 || cp > 0xdfff)) {
      cp = static_cast<uint32_t>(upper ? towupper_l(static_cast<wint_t>(cp), loc)
                                       : towlower_l(static_cast<wint_t>(cp), loc));
    }
    AppendCp(cp, &out);
  }
  return out;
}

bool IsWordByte(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_';
}
bool IsDigit(char c) { return c >= '0' && c <= '9'; }

// Number.prototype.toString().
std::string JsNumber(double x) {
  if (std::isnan(x)) return "NaN";
  if (x == 0) return "0";
  if (std::isinf(x)) return x < 0 ? "-Infinity" : "Infinity";
  std::string sign = x < 0 ? "-" : "";
  char buf[64];
  const auto r = std::to_chars(buf, buf + sizeof buf, std::fabs(x), std::chars_format::scientific);
  const std::string_view sv(buf, static_cast<size_t>(r.ptr - buf));
  const size_t e = sv.find('e');
  std::string digits(1, sv[0]);
  if (e > 1) digits.append(sv.substr(2, e - 2));
  int exp10 = 0;
  const char* ep = buf + e + 1 + (buf[e + 1] == '+' ? 1 : 0);
  std::from_chars(ep, r.ptr, exp10);
  const int k = static_cast<int>(digits.size()), n = exp10 + 1;
  if (k <= n && n <= 21) return sign + digits + std::string(static_cast<size_t>(n - k), '0');
  if (0 < n && n <= 21) return sign + digits.substr(0, n) + "." + digits.substr(n);
  if (-6 < n && n <= 0) return sign + "0." + std::string(static_cast<size_t>(-n), '0') + digits;
  std::string out = sign + digits.substr(0, 1);
  if (k > 1) out += "." + digits.substr(1);
  return absl::StrCat(out, "e", n - 1 >= 0 ? "+" : "-", std::abs(n - 1));
}

// FloatValue.toString(): integral values keep one decimal ("3.0"), -0 is "-0.0".
std::string FloatStr(double x) {
  if (x == 0 && std::signbit(x)) return "-0.0";
  if (std::isfinite(x) && std::fmod(x, 1.0) == 0 && std::fabs(x) < 1e21) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%.1f", x);
    return buf;
  }
  return JsNumber(x);
}

double ParseDigits(std::string_view digits) {
  double v = 0;
  const auto r = std::from_chars(digits.data(), digits.data() + digits.size(), v);
  if (r.ec == std::errc::result_out_of_range) v = std::strtod(std::string(digits).c_str(), nullptr);
  return v;
}

namespace {
// The longest StrDecimalLiteral prefix of s (parseFloat); NaN and *used = 0 when there is none.
double ParseDecimalPrefix(std::string_view s, size_t* used) {
  size_t i = 0;
  bool neg = false;
  if (i < s.size() && (s[i] == '+' || s[i] == '-')) neg = s[i++] == '-';
  if (s.substr(i, 8) == "Infinity") {
    *used = i + 8;
    return neg ? -HUGE_VAL : HUGE_VAL;
  }
  const size_t start = i;
  while (i < s.size() && IsDigit(s[i])) ++i;
  const size_t int_digits = i - start;
  if (i < s.size() && s[i] == '.') {
    size_t j = i + 1;
    while (j < s.size() && IsDigit(s[j])) ++j;
    if (int_digits > 0 || j > i + 1) i = j;
  }
  if (i == start || (i == start + 1 && s[start] == '.')) {
    *used = 0;
    return std::nan("");
  }
  if (i < s.size() && (s[i] == 'e' || s[i] == 'E')) {
    size_t j = i + 1;
    if (j < s.size() && (s[j] == '+' || s[j] == '-')) ++j;
    const size_t k0 = j;
    while (j < s.size() && IsDigit(s[j])) ++j;
    if (j > k0) i = j;
  }
  *used = i;
  const double v = ParseDigits(s.substr(start, i - start));
  return neg ? -v : v;
}

}  // namespace

// Number(string).
double JsToNumber(std::string_view s) {
  s = TrimJs(s, true, true);
  if (s.empty()) return 0;
  const char p = s.size() > 2 && s[0] == '0' ? static_cast<char>(s[1] | 0x20) : '\0';
  if (p == 'x' || p == 'o' || p == 'b') {
    const int radix = p == 'x' ? 16 : p == 'o' ? 8 : 2;
    double v = 0;
    for (size_t i = 2; i < s.size(); ++i) {
      const char c = static_cast<char>(std::tolower(static_cast<unsigned char>(s[i])));
      const int d = IsDigit(c) ? c - '0' : (c >= 'a' && c <= 'f') ? c - 'a' + 10 : 99;
      if (d >= radix) return std::nan("");
      v = v * radix + d;
    }
    return v;
  }
  size_t used;
  const double v = ParseDecimalPrefix(s, &used);
  return used == s.size() ? v : std::nan("");
}

double JsParseInt(std::string_view s) {  // parseInt(s, 10)
  s = TrimJs(s, true, false);
  size_t i = 0;
  bool neg = false;
  if (i < s.size() && (s[i] == '+' || s[i] == '-')) neg = s[i++] == '-';
  const size_t start = i;
  while (i < s.size() && IsDigit(s[i])) ++i;
  if (i == start) return std::nan("");
  const double v = ParseDigits(s.substr(start, i - start));
  return neg ? -v : v;
}

double JsParseFloat(std::string_view s) {
  size_t used;
  return ParseDecimalPrefix(TrimJs(s, true, false), &used);
}

// "line L:C" of an offset in the original template; C counts code points from 1.
std::string Where(std::string_view src, size_t off) {
  off = std::min(off, src.size());
  size_t line = 1, line_start = 0;
  for (size_t i = 0; i < off; ++i) {
    if (src[i] == '\n') {
      ++line;
      line_start = i + 1;
    }
  }
  size_t col = 1;
  for (size_t i = line_start, n; i < off; i += n, ++col) DecodeAt(src, i, &n);
  return absl::StrCat("line ", line, ":", col);
}

// ---------------------------------------------------------------------------------------------
// Source preprocessing and lexer (lexer.ts). Offsets map back to the original template.
namespace {

struct Mapped {
  std::string s;
  std::vector<size_t> at;  // at[i]: original offset of s[i]; one extra entry for the end
};

struct MappedBuilder {
  const Mapped& in;
  Mapped out;
  void Put(size_t i, size_t n = 1) {
    out.s.append(in.s, i, n);
    for (size_t k = 0; k < n; ++k) out.at.push_back(in.at[i + k]);
  }
  Mapped Done() {
    out.at.push_back(in.at[in.s.size()]);
    return std::move(out);
  }
};

bool OneOf(char c, const char* set) { return c != '\0' && std::strchr(set, c) != nullptr; }

bool HasAt(std::string_view s, size_t i, std::string_view p) {
  return i <= s.size() && s.size() - i >= p.size() && s.compare(i, p.size(), p) == 0;
}

// preprocess(): one trailing newline dropped, lstrip_blocks, trim_blocks, {% generation %} removed.
Mapped Preprocess(std::string_view src) {
  Mapped m{std::string(src), {}};
  for (size_t i = 0; i <= src.size(); ++i) m.at.push_back(i);
  if (!m.s.empty() && m.s.back() == '\n') {
    m.s.pop_back();
    m.at.pop_back();
  }
  {  // /^[ \t]*({[#%-])/gm -> "$1"
    MappedBuilder b{m, {}};
    const std::string& s = m.s;
    for (size_t i = 0; i < s.size();) {
      const bool line_start = i == 0 || s[i - 1] == '\n' || s[i - 1] == '\r' ||
                              (i >= 3 && (HasAt(s, i - 3, "\u2028") || HasAt(s, i - 3, "\u2029")));
      if (line_start) {
        size_t j = i;
        while (j < s.size() && (s[j] == ' ' || s[j] == '\t')) ++j;
        if (j + 1 < s.size() && s[j] == '{' && OneOf(s[j + 1], "#%-")) i = j;
      }
      b.Put(i++);
    }
    m = b.Done();
  }
  {  // /([#%-]})\n/g -> "$1"
    MappedBuilder b{m, {}};
    const std::string& s = m.s;
    for (size_t i = 0; i < s.size();) {
      if (i + 2 < s.size() && OneOf(s[i], "#%-") && s[i + 1] == '}' && s[i + 2] == '\n') {
        b.Put(i, 2);
        i += 3;
      } else {
        b.Put(i++);
      }
    }
    m = b.Done();
  }
  {  // /(\s*){%(-?)\s*(?:end)?generation\s*(-?)%}(\s*)/gs -> (lstrip ? "" : $1) + (rstrip ? "" :
     // $4)
    MappedBuilder b{m, {}};
    const std::string& s = m.s;
    const auto skip_ws = [&](size_t k) {
      while (size_t n = SpaceLen(s, k)) k += n;
      return k;
    };
    for (size_t i = 0; i < s.size();) {
      const size_t j = skip_ws(i);
      size_t k = j + 2;
      bool match = HasAt(s, j, "{%");
      const bool lstrip = match && HasAt(s, k, "-");
      if (lstrip) ++k;
      k = skip_ws(k);
      if (HasAt(s, k, "endgeneration")) {
        k += 13;
      } else if (HasAt(s, k, "generation")) {
        k += 10;
      } else {
        match = false;
      }
      k = skip_ws(k);
      const bool rstrip = match && HasAt(s, k, "-");
      if (rstrip) ++k;
      if (match && HasAt(s, k, "%}")) {
        const size_t after = k + 2, end = skip_ws(after);
        if (!lstrip) b.Put(i, j - i);
        if (!rstrip) b.Put(after, end - after);
        i = end;
      } else {
        size_t n;
        DecodeAt(s, i, &n);
        b.Put(i, n);
        i += n;
      }
    }
    m = b.Done();
  }
  return m;
}

enum class TT {
  kText,
  kNum,
  kStr,
  kIdent,
  kEquals,
  kLParen,
  kRParen,
  kOpenStmt,
  kCloseStmt,
  kOpenExpr,
  kCloseExpr,
  kLBracket,
  kRBracket,
  kLBrace,
  kRBrace,
  kComma,
  kDot,
  kColon,
  kPipe,
  kAdd,
  kMul,
  kPow,
  kCmp,
  kUnary,
  kComment
};

struct Token {
  TT type;
  std::string value;
  size_t pos;  // offset in the original template
};

Status SyntaxError(std::string_view src, size_t off, std::string_view msg) {
  return absl::InvalidArgumentError(
      absl::StrCat("jinja: ", Where(src, off), ": ", std::string(msg)));
}

class Lexer {
 public:
  Lexer(std::string_view original, const Mapped& m) : orig_(original), s_(m.s), at_(m.at) {}

  StatusOr<std::vector<Token>> Run() {
    while (i_ < s_.size()) {
      const std::optional<TT> last = Last();
      if (!last || *last == TT::kCloseStmt || *last == TT::kCloseExpr || *last == TT::kComment) {
        if (Text()) continue;
      }
      if (HasAt(s_, i_, "{#")) {
        RETURN_IF_ERROR(Comment());
        continue;
      }
      if (HasAt(s_, i_, "{%-") || HasAt(s_, i_, "{{-")) {
        StripTrailingWhitespace();
        const bool stmt = s_[i_ + 1] == '%';
        Push(stmt ? TT::kOpenStmt : TT::kOpenExpr, stmt ? "{%" : "{{", i_);
        if (!stmt) curly_ = 0;
        i_ += 3;
        continue;
      }
      while (size_t n = SpaceLen(s_, i_)) {
        i_ += n;
        if (i_ >= s_.size()) return Error(i_, "unexpected end of template");
      }
      if (HasAt(s_, i_, "-%}") || HasAt(s_, i_, "-}}")) {
        const bool stmt = s_[i_ + 1] == '%';
        Push(stmt ? TT::kCloseStmt : TT::kCloseExpr, stmt ? "%}" : "}}", i_);
        i_ += 3;
        while (size_t n = SpaceLen(s_, i_)) i_ += n;
        continue;
      }
      const char c = s_[i_];
      if (c == '-' || c == '+') {
        if (!last || *last == TT::kText)
          return Error(i_, absl::StrCat("unexpected character ", std::string(1, c)));
        if (*last != TT::kIdent && *last != TT::kNum && *last != TT::kStr && *last != TT::kRParen &&
            *last != TT::kRBracket) {
          RETURN_IF_ERROR(Signed(c));
          continue;
        }
      }
      if (MatchOperator()) continue;
      if (c == '\'' || c == '"') {
        RETURN_IF_ERROR(StringLiteral(c));
        continue;
      }
      if (IsDigit(c)) {
        RETURN_IF_ERROR(Number());
        continue;
      }
      if (IsWordByte(c)) {
        RETURN_IF_ERROR(Identifier());
        continue;
      }
      size_t n;
      DecodeAt(s_, i_, &n);
      return Error(i_, absl::StrCat("unexpected character '", s_.substr(i_, n), "'"));
    }
    return std::move(tokens_);
  }

 private:
  char At(size_t i) const { return i < s_.size() ? s_[i] : '\0'; }
  std::optional<TT> Last() const {
    if (tokens_.empty()) return std::nullopt;
    return tokens_.back().type;
  }
  void Push(TT t, std::string v, size_t start) {
    tokens_.push_back(Token{t, std::move(v), at_[std::min(start, s_.size())]});
  }
  Status Error(size_t i, std::string_view msg) const {
    return SyntaxError(orig_, at_[std::min(i, s_.size())], msg);
  }
  void StripTrailingWhitespace() {
    if (Last() != TT::kText) return;
    std::string& v = tokens_.back().value;
    v.resize(TrimJs(v, false, true).size());
    if (v.empty()) tokens_.pop_back();
  }
  // The text up to the next `{%`, `{{` or `{#`, if any (false: a tag starts here).
  bool Text() {
    const size_t start = i_;
    while (i_ < s_.size() && !(s_[i_] == '{' && OneOf(At(i_ + 1), "%{#"))) {
      ++i_;
    }
    if (i_ == start) return false;
    Push(TT::kText, s_.substr(start, i_ - start), start);
    return true;
  }
  // A `-` or `+` where an operand is expected: a signed number, or else a unary operator.
  Status Signed(char c) {
    const size_t start = i_++;
    std::string num;
    RETURN_IF_ERROR(Digits(&num));
    if (!num.empty() && At(i_) == '.' && IsDigit(At(i_ + 1))) {
      ++i_;
      num += '.';
      RETURN_IF_ERROR(Digits(&num));
    }
    Push(num.empty() ? TT::kUnary : TT::kNum, std::string(1, c) + num, start);
    return absl::OkStatus();
  }
  // An unsigned number; after a `.` only its integer part (`x.0.1` is two member accesses).
  Status Number() {
    const size_t start = i_;
    std::string num;
    RETURN_IF_ERROR(Digits(&num));
    if (Last() != TT::kDot && At(i_) == '.' && IsDigit(At(i_ + 1))) {
      ++i_;
      num += '.';
      RETURN_IF_ERROR(Digits(&num));
    }
    Push(TT::kNum, num, start);
    return absl::OkStatus();
  }
  Status Identifier() {
    const size_t start = i_;
    while (IsWordByte(At(i_))) {
      if (++i_ >= s_.size()) return Error(i_, "unexpected end of template");
    }
    Push(TT::kIdent, s_.substr(start, i_ - start), start);
    return absl::OkStatus();
  }
  // consumeWhile(isInteger): reaching the end of the template inside a token is an error there.
  Status Digits(std::string* out) {
    while (IsDigit(At(i_))) {
      out->push_back(s_[i_++]);
      if (i_ >= s_.size()) return Error(i_, "unexpected end of template");
    }
    return absl::OkStatus();
  }
  Status Comment() {
    const size_t start = i_;
    i_ += 2;
    const bool strip_before = At(i_) == '-';
    if (strip_before) ++i_;
    std::string text;
    while (!(At(i_) == '#' && At(i_ + 1) == '}')) {
      if (i_ + 2 >= s_.size()) return Error(start, "missing end of comment tag #}");
      text.push_back(s_[i_++]);
    }
    const bool strip_after = !text.empty() && text.back() == '-';
    if (strip_before) StripTrailingWhitespace();
    Push(TT::kComment, "", start);
    i_ += 2;
    if (strip_after) {
      while (size_t n = SpaceLen(s_, i_)) i_ += n;
    }
    return absl::OkStatus();
  }
  Status StringLiteral(char quote) {
    const size_t start = i_++;
    std::string str;
    std::optional<uint16_t> high;  // a \uD8xx escape waiting for its \uDCxx
    const auto flush_high = [&] {
      if (high) AppendCp(*high, &str);
      high.reset();
    };
    while (At(i_) != quote) {
      if (i_ >= s_.size()) return Error(start, "unterminated string literal");
      if (s_[i_] != '\\') {
        flush_high();
        str.push_back(s_[i_++]);
        if (i_ >= s_.size()) return Error(start, "unterminated string literal");
        continue;
      }
      if (++i_ >= s_.size()) return Error(start, "unterminated string literal");
      const char e = s_[i_++];
      if (e == 'x' || e == 'u') {
        const size_t len = e == 'x' ? 2 : 4;
        const std::string hex = s_.substr(i_, len);
        if (hex.size() != len || hex.find_first_not_of("0123456789abcdefABCDEF") != hex.npos) {
          return Error(i_ - 2, absl::StrCat("invalid escape \\", std::string(1, e), hex));
        }
        const auto unit = static_cast<uint16_t>(std::stoul(hex, nullptr, 16));
        i_ += len;
        if (high && unit >= 0xdc00 && unit < 0xe000) {
          AppendCp(0x10000 + ((*high - 0xd800u) << 10) + (unit - 0xdc00u), &str);
          high.reset();
        } else {
          flush_high();
          if (unit >= 0xd800 && unit < 0xdc00) {
            high = unit;
          } else {
            AppendCp(unit, &str);
          }
        }
        continue;
      }
      static constexpr std::pair<char, char> kEscapes[] = {{'n', '\n'},  {'t', '\t'}, {'r', '\r'},
                                                           {'b', '\b'},  {'f', '\f'}, {'v', '\v'},
                                                           {'\'', '\''}, {'"', '"'},  {'\\', '\\'}};
      const auto* it = std::find_if(std::begin(kEscapes), std::end(kEscapes),
                                    [&](const auto& p) { return p.first == e; });
      if (it == std::end(kEscapes)) {
        return Error(i_ - 2,
                     absl::StrCat("unexpected escaped character '", std::string(1, e), "'"));
      }
      flush_high();
      str.push_back(it->second);
    }
    flush_high();
    Push(TT::kStr, std::move(str), start);
    ++i_;
    return absl::OkStatus();
  }
  bool MatchOperator() {
    static constexpr std::pair<std::string_view, TT> kTable[] = {
        {"{%", TT::kOpenStmt},  {"%}", TT::kCloseStmt}, {"{{", TT::kOpenExpr},
        {"}}", TT::kCloseExpr}, {"(", TT::kLParen},     {")", TT::kRParen},
        {"{", TT::kLBrace},     {"}", TT::kRBrace},     {"[", TT::kLBracket},
        {"]", TT::kRBracket},   {",", TT::kComma},      {".", TT::kDot},
        {":", TT::kColon},      {"|", TT::kPipe},       {"<=", TT::kCmp},
        {">=", TT::kCmp},       {"==", TT::kCmp},       {"!=", TT::kCmp},
        {"<", TT::kCmp},        {">", TT::kCmp},        {"+", TT::kAdd},
        {"-", TT::kAdd},        {"~", TT::kAdd},        {"**", TT::kPow},
        {"*", TT::kMul},        {"//", TT::kMul},       {"/", TT::kMul},
        {"%", TT::kMul},        {"=", TT::kEquals}};
    for (const auto& [seq, type] : kTable) {
      if (seq == "}}" && curly_ > 0) continue;  // inside an object literal
      if (!HasAt(s_, i_, seq)) continue;
      Push(type, std::string(seq), i_);
      if (type == TT::kOpenExpr) curly_ = 0;
      if (type == TT::kLBrace) ++curly_;
      if (type == TT::kRBrace) --curly_;
      i_ += seq.size();
      return true;
    }
    return false;
  }

  std::string_view orig_;
  const std::string& s_;
  const std::vector<size_t>& at_;
  size_t i_ = 0;
  int curly_ = 0;
  std::vector<Token> tokens_;
};

}  // namespace

// ---------------------------------------------------------------------------------------------
// AST and parser (parser.ts).

namespace {

constexpr std::string_view kFilters[] = {
    "safe",       "tojson", "list",    "first", "last",  "length", "reverse",    "sort",
    "join",       "string", "unique",  "upper", "lower", "title",  "capitalize", "trim",
    "indent",     "int",    "float",   "abs",   "items", "bool",   "default",    "selectattr",
    "rejectattr", "map",    "replace", "get",   "keys",  "values", "dictsort"};
constexpr std::string_view kTests[] = {"boolean",  "callable",  "odd",      "even",   "false",
                                       "true",     "none",      "string",   "number", "integer",
                                       "iterable", "mapping",   "sequence", "lower",  "upper",
                                       "defined",  "undefined", "equalto",  "eq"};
constexpr std::string_view kBlockWords[] = {"elif",   "else",     "endif",   "endfor",
                                            "endset", "endmacro", "endcall", "endfilter"};
template <size_t N>
bool Contains(const std::string_view (&list)[N], std::string_view s) {
  return std::find(std::begin(list), std::end(list), s) != std::end(list);
}

// Nesting limits of the parser: levels of recursion, and the stack they may take (as
// Limits::max_stack_bytes does for rendering).
constexpr int kMaxParseDepth = 200;
constexpr size_t kMaxParseStack = size_t{256} << 10;

// The walk of SpecialArgs() below: names declared so far (parameters, loop and set targets) and
// the special ones read before their declaration, as bits (1 = varargs, 2 = kwargs).
class SpecialArgsFinder {
 public:
  int accessed() const { return accessed_; }

  void Declare(const Node* t) {
    if (!t) return;
    if (t->kind == NK::kIdent || t->kind == NK::kKwarg) declared_ |= Bit(t->str);
    if (t->kind == NK::kTuple) {
      for (const NodeP& e : t->a) Declare(e.get());
    }
  }

  void VisitAll(const std::vector<NodeP>& v, size_t from = 0) {
    for (size_t i = from; i < v.size(); ++i) Visit(v[i].get());
  }

  void Visit(const Node* n) {
    if (!n) return;
    switch (n->kind) {
      case NK::kFor:
        Declare(n->a[0].get());
        if (n->a[1]->kind == NK::kSelect) {
          Visit(n->a[1]->a[0].get());
          VisitAll(n->body);
          VisitAll(n->alt);
          Visit(n->a[1]->a[1].get());
        } else {
          Visit(n->a[1].get());
          VisitAll(n->body);
          VisitAll(n->alt);
        }
        return;
      case NK::kSet:
        Declare(n->a[0].get());
        Visit(n->a[1].get());
        VisitAll(n->body);
        return;
      case NK::kMacro:
        for (const NodeP& p : n->a) Declare(p.get());
        Defaults(n->a, 0);
        VisitAll(n->body);
        return;
      case NK::kCallBlock:
        Visit(n->a[0].get());
        for (size_t i = 1; i < n->a.size(); ++i) Declare(n->a[i].get());
        Defaults(n->a, 1);
        VisitAll(n->body);
        return;
      case NK::kFilterBlock:
        VisitAll(n->body);
        VisitFilter(n->a[0].get());
        return;
      case NK::kIdent:
        accessed_ |= Bit(n->str) & ~declared_;
        return;
      case NK::kMember:
        Visit(n->a[0].get());
        if (n->flag) Visit(n->a[1].get());
        return;
      case NK::kFilter:
        Visit(n->a[0].get());
        VisitFilter(n->a[1].get());
        return;
      case NK::kTest:
        Visit(n->a[0].get());
        return;
      case NK::kSelect:
        Visit(n->a[1].get());
        Visit(n->a[0].get());
        return;
      default:
        VisitAll(n->a);
        VisitAll(n->body);
        VisitAll(n->alt);
    }
  }

 private:
  static int Bit(const std::string& s) { return s == "varargs" ? 1 : s == "kwargs" ? 2 : 0; }
  // The default values of keyword parameters.
  void Defaults(const std::vector<NodeP>& ps, size_t from) {
    for (size_t i = from; i < ps.size(); ++i) {
      if (ps[i]->kind == NK::kKwarg) Visit(ps[i]->a[0].get());
    }
  }
  // A filter's arguments (an Ident filter has none).
  void VisitFilter(const Node* f) {
    if (f->kind == NK::kCall) VisitAll(f->a, 1);
  }

  int declared_ = 0;
  int accessed_ = 0;
};

class Parser {
 public:
  Parser(std::string_view src, std::vector<Token> tokens)
      : src_(src), t_(std::move(tokens)), stack_base_(StackPosition()) {}

  StatusOr<std::vector<NodeP>> Run() {
    std::vector<NodeP> body;
    while (cur_ < t_.size()) {
      ASSIGN_OR_RETURN(NodeP n, Any());
      body.push_back(std::move(n));
    }
    return body;
  }

 private:
  struct Depth {
    explicit Depth(int* d) : d_(d) { ++*d_; }
    ~Depth() { --*d_; }
    int* d_;
  };
#define PARSE_DEPTH_GUARD()                                                 \
  Depth depth_guard_(&depth_);                                              \
  if (depth_ > kMaxParseDepth || StackUsed(stack_base_) > kMaxParseStack) { \
    return Err("the template nests too deeply");                            \
  }

  const Token* Peek(size_t k = 0) const { return cur_ + k < t_.size() ? &t_[cur_ + k] : nullptr; }
  bool Is(TT type) const { return Peek() && Peek()->type == type; }
  bool IsIdent(std::string_view name, size_t k = 0) const {
    return Peek(k) && Peek(k)->type == TT::kIdent && Peek(k)->value == name;
  }
  bool IsStatement(std::initializer_list<std::string_view> names) const {
    if (!Peek(1) || Peek()->type != TT::kOpenStmt || Peek(1)->type != TT::kIdent) return false;
    return std::find(names.begin(), names.end(), Peek(1)->value) != names.end();
  }
  size_t Pos() const { return cur_ < t_.size() ? t_[cur_].pos : src_.size(); }
  Status Err(std::string_view msg) const { return SyntaxError(src_, Pos(), msg); }
  Status Expect(TT type, std::string_view what) {
    if (!Is(type)) return Err(absl::StrCat("expected ", std::string(what)));
    ++cur_;
    return absl::OkStatus();
  }
  Status ExpectEnd(std::string_view word) {
    RETURN_IF_ERROR(Expect(TT::kOpenStmt, absl::StrCat("{% ", std::string(word), " %}")));
    if (!IsIdent(word)) return Err(absl::StrCat("expected {% ", std::string(word), " %}"));
    ++cur_;
    return Expect(TT::kCloseStmt, "%}");
  }
  static NodeP Make(NK kind, size_t pos, std::string str = "") {
    auto n = std::make_unique<Node>();
    n->kind = kind;
    n->pos = pos;
    n->str = std::move(str);
    return n;
  }
  // Statements until one of `ends` (which stays unconsumed).
  Status Body(std::initializer_list<std::string_view> ends, size_t open_pos,
              std::vector<NodeP>* out) {
    while (!IsStatement(ends)) {
      if (cur_ >= t_.size()) {
        return SyntaxError(src_, open_pos,
                           absl::StrCat("unclosed tag: no {% ", std::string(*ends.begin()), " %}"));
      }
      ASSIGN_OR_RETURN(NodeP n, Any());
      out->push_back(std::move(n));
    }
    return absl::OkStatus();
  }

  StatusOr<NodeP> Any() {
    PARSE_DEPTH_GUARD();
    const Token& t = t_[cur_];
    switch (t.type) {
      case TT::kComment:
        ++cur_;
        return Make(NK::kComment, t.pos);
      case TT::kText:
        ++cur_;
        return Make(NK::kStr, t.pos, t.value);
      case TT::kOpenStmt:
        return Statement();
      case TT::kOpenExpr: {
        ++cur_;
        ASSIGN_OR_RETURN(NodeP e, Expression());
        RETURN_IF_ERROR(Expect(TT::kCloseExpr, "}}"));
        return e;
      }
      default:
        return Err(absl::StrCat("unexpected '", t.value, "'"));
    }
  }

  StatusOr<NodeP> Statement() {
    const size_t open_pos = Pos();
    ++cur_;
    if (!Is(TT::kIdent)) return Err("expected a tag name after {%");
    const std::string name = Peek()->value;
    const size_t pos = Pos();
    ++cur_;
    NodeP n;
    if (name == "set") {
      n = Make(NK::kSet, pos);
      ASSIGN_OR_RETURN(NodeP target, Sequence(false));
      n->a.push_back(std::move(target));
      if (Is(TT::kEquals)) {
        ++cur_;
        ASSIGN_OR_RETURN(NodeP value, Sequence(false));
        n->a.push_back(std::move(value));
      } else {
        n->a.push_back(nullptr);
        RETURN_IF_ERROR(Expect(TT::kCloseStmt, "%} or = after {% set"));
        RETURN_IF_ERROR(Body({"endset"}, open_pos, &n->body));
        cur_ += 2;
      }
      RETURN_IF_ERROR(Expect(TT::kCloseStmt, "%}"));
    } else if (name == "if") {
      ASSIGN_OR_RETURN(n, If(pos, open_pos));
      RETURN_IF_ERROR(ExpectEnd("endif"));
    } else if (name == "macro") {
      n = Make(NK::kMacro, pos);
      ASSIGN_OR_RETURN(NodeP id, Primary());
      if (id->kind != NK::kIdent) return SyntaxError(src_, id->pos, "expected a macro name");
      n->str = id->str;
      RETURN_IF_ERROR(Args(/*params=*/true, &n->a));
      RETURN_IF_ERROR(Expect(TT::kCloseStmt, "%}"));
      RETURN_IF_ERROR(Body({"endmacro"}, open_pos, &n->body));
      RETURN_IF_ERROR(ExpectEnd("endmacro"));
      n->special = SpecialArgs(n->a, n->body);
    } else if (name == "for") {
      ASSIGN_OR_RETURN(n, For(pos, open_pos));
      RETURN_IF_ERROR(ExpectEnd("endfor"));
    } else if (name == "call") {
      n = Make(NK::kCallBlock, pos);
      std::vector<NodeP> caller_params;
      if (Is(TT::kLParen)) RETURN_IF_ERROR(Args(/*params=*/true, &caller_params));
      ASSIGN_OR_RETURN(NodeP callee, Primary());
      if (callee->kind != NK::kIdent)
        return SyntaxError(src_, callee->pos, "expected a macro name");
      NodeP call = Make(NK::kCall, callee->pos);
      call->a.push_back(std::move(callee));
      RETURN_IF_ERROR(Args(/*params=*/false, &call->a));
      RETURN_IF_ERROR(Expect(TT::kCloseStmt, "%}"));
      RETURN_IF_ERROR(Body({"endcall"}, open_pos, &n->body));
      RETURN_IF_ERROR(ExpectEnd("endcall"));
      n->a.push_back(std::move(call));
      for (NodeP& p : caller_params) n->a.push_back(std::move(p));
      n->special = SpecialArgs(caller_params, n->body);
    } else if (name == "break" || name == "continue") {
      n = Make(name == "break" ? NK::kBreak : NK::kContinue, pos);
      RETURN_IF_ERROR(Expect(TT::kCloseStmt, "%}"));
    } else if (name == "filter") {
      n = Make(NK::kFilterBlock, pos);
      ASSIGN_OR_RETURN(NodeP f, Primary());
      if (f->kind == NK::kIdent && Is(TT::kLParen)) {
        ASSIGN_OR_RETURN(f, CallExpr(std::move(f)));
      }
      RETURN_IF_ERROR(CheckFilter(*f));
      n->a.push_back(std::move(f));
      RETURN_IF_ERROR(Expect(TT::kCloseStmt, "%}"));
      RETURN_IF_ERROR(Body({"endfilter"}, open_pos, &n->body));
      RETURN_IF_ERROR(ExpectEnd("endfilter"));
    } else if (Contains(kBlockWords, name)) {
      return SyntaxError(src_, pos, absl::StrCat("unexpected tag '", name, "'"));
    } else {
      return SyntaxError(src_, pos, absl::StrCat("unsupported tag '", name, "'"));
    }
    return n;
  }

  StatusOr<NodeP> If(size_t pos, size_t open_pos) {
    PARSE_DEPTH_GUARD();
    NodeP n = Make(NK::kIf, pos);
    ASSIGN_OR_RETURN(NodeP test, Expression());
    n->a.push_back(std::move(test));
    RETURN_IF_ERROR(Expect(TT::kCloseStmt, "%}"));
    RETURN_IF_ERROR(Body({"endif", "elif", "else"}, open_pos, &n->body));
    if (IsStatement({"elif"})) {
      const size_t elif_pos = Peek(1)->pos;
      cur_ += 2;
      ASSIGN_OR_RETURN(NodeP elif, If(elif_pos, open_pos));
      n->alt.push_back(std::move(elif));
    } else if (IsStatement({"else"})) {
      cur_ += 2;
      RETURN_IF_ERROR(Expect(TT::kCloseStmt, "%}"));
      RETURN_IF_ERROR(Body({"endif"}, open_pos, &n->alt));
    }
    return n;
  }

  StatusOr<NodeP> For(size_t pos, size_t open_pos) {
    NodeP n = Make(NK::kFor, pos);
    ASSIGN_OR_RETURN(NodeP target, Sequence(true));
    if (target->kind != NK::kIdent && target->kind != NK::kTuple) {
      return SyntaxError(src_, target->pos, "expected a name or names as the loop variable");
    }
    if (!IsIdent("in")) return Err("expected 'in' after the loop variable");
    ++cur_;
    ASSIGN_OR_RETURN(NodeP iterable, Expression());
    n->a.push_back(std::move(target));
    n->a.push_back(std::move(iterable));
    RETURN_IF_ERROR(Expect(TT::kCloseStmt, "%}"));
    RETURN_IF_ERROR(Body({"endfor", "else"}, open_pos, &n->body));
    if (IsStatement({"else"})) {
      cur_ += 2;
      RETURN_IF_ERROR(Expect(TT::kCloseStmt, "%}"));
      RETURN_IF_ERROR(Body({"endfor"}, open_pos, &n->alt));
    }
    return n;
  }

  // parseExpressionSequence: `a` or the tuple `a, b, ...`.
  StatusOr<NodeP> Sequence(bool primary) {
    const size_t pos = Pos();
    std::vector<NodeP> items;
    ASSIGN_OR_RETURN(NodeP first, primary ? Primary() : Expression());
    items.push_back(std::move(first));
    const bool tuple = Is(TT::kComma);
    while (tuple) {
      ++cur_;
      ASSIGN_OR_RETURN(NodeP next, primary ? Primary() : Expression());
      items.push_back(std::move(next));
      if (!Is(TT::kComma)) break;
    }
    if (!tuple) return std::move(items[0]);
    NodeP t = Make(NK::kTuple, pos);
    t->a = std::move(items);
    return t;
  }

  StatusOr<NodeP> Expression() {
    PARSE_DEPTH_GUARD();
    ASSIGN_OR_RETURN(NodeP a, Binary(0));
    if (!IsIdent("if")) return a;
    const size_t pos = Pos();
    ++cur_;
    ASSIGN_OR_RETURN(NodeP test, Binary(0));
    NodeP n;
    if (IsIdent("else")) {
      ++cur_;
      ASSIGN_OR_RETURN(NodeP no, Expression());
      n = Make(NK::kTernary, pos);
      n->a.push_back(std::move(test));
      n->a.push_back(std::move(a));
      n->a.push_back(std::move(no));
    } else {
      n = Make(NK::kSelect, pos);
      n->a.push_back(std::move(a));
      n->a.push_back(std::move(test));
    }
    return n;
  }

  // The left-associative binary levels: 0 or, 1 and, (not), 2 comparison/in, 3 + - ~, 4 * / // %,
  // 5 **, then tests.
  StatusOr<NodeP> Binary(int level) {
    if (level == 2 && IsIdent("not")) return Not();
    if (level == 6) return TestExpr();
    ASSIGN_OR_RETURN(NodeP left, Binary(level + 1));
    for (;;) {
      std::string op;
      const size_t pos = Pos();
      if (level == 0 && IsIdent("or")) {
        op = "or";
      } else if (level == 1 && IsIdent("and")) {
        op = "and";
      } else if (level == 2 && IsIdent("not") && IsIdent("in", 1)) {
        op = "not in";
        ++cur_;
      } else if (level == 2 && (IsIdent("in") || Is(TT::kCmp))) {
        op = Peek()->value;
      } else if ((level == 3 && Is(TT::kAdd)) || (level == 4 && Is(TT::kMul)) ||
                 (level == 5 && Is(TT::kPow))) {
        op = Peek()->value;
      } else {
        return left;
      }
      ++cur_;
      ASSIGN_OR_RETURN(NodeP right, Binary(level + 1));
      NodeP n = Make(NK::kBinary, pos, op);
      n->a.push_back(std::move(left));
      n->a.push_back(std::move(right));
      left = std::move(n);
    }
  }

  // parseLogicalNegationExpression, including its loop (`not a not b` keeps the last operand).
  StatusOr<NodeP> Not() {
    PARSE_DEPTH_GUARD();
    NodeP result;
    while (IsIdent("not")) {
      const size_t pos = Pos();
      ++cur_;
      ASSIGN_OR_RETURN(NodeP arg, IsIdent("not") ? Not() : Binary(2));
      result = Make(NK::kUnary, pos, "not");
      result->a.push_back(std::move(arg));
    }
    return result;
  }

  StatusOr<NodeP> TestExpr() {
    ASSIGN_OR_RETURN(NodeP operand, FilterExpr());
    while (IsIdent("is")) {
      const size_t pos = Pos();
      ++cur_;
      const bool negate = IsIdent("not");
      if (negate) ++cur_;
      ASSIGN_OR_RETURN(NodeP test, Primary());
      if (test->kind != NK::kIdent) return SyntaxError(src_, test->pos, "expected a test name");
      if (!Contains(kTests, test->str)) {
        return SyntaxError(src_, test->pos, absl::StrCat("unsupported test '", test->str, "'"));
      }
      NodeP n = Make(NK::kTest, pos, test->str);
      n->flag = negate;
      n->a.push_back(std::move(operand));
      operand = std::move(n);
    }
    return operand;
  }

  Status CheckFilter(const Node& f) const {
    const Node* id = f.kind == NK::kCall ? f.a[0].get() : &f;
    if (id->kind != NK::kIdent) return SyntaxError(src_, f.pos, "expected a filter name");
    if (!Contains(kFilters, id->str)) {
      return SyntaxError(src_, id->pos, absl::StrCat("unsupported filter '", id->str, "'"));
    }
    // selectattr('attr', 'test', ...): the test is named by a string literal.
    if ((id->str == "selectattr" || id->str == "rejectattr") && f.a.size() > 2 &&
        f.a[2]->kind == NK::kStr && !Contains(kTests, f.a[2]->str)) {
      return SyntaxError(src_, f.a[2]->pos, absl::StrCat("unsupported test '", f.a[2]->str, "'"));
    }
    return absl::OkStatus();
  }

  StatusOr<NodeP> FilterExpr() {
    ASSIGN_OR_RETURN(NodeP operand, UnarySign());
    while (Is(TT::kPipe)) {
      const size_t pos = Pos();
      ++cur_;
      ASSIGN_OR_RETURN(NodeP f, Primary());
      if (f->kind != NK::kIdent) return SyntaxError(src_, f->pos, "expected a filter name");
      if (Is(TT::kLParen)) {
        ASSIGN_OR_RETURN(f, CallExpr(std::move(f)));
      }
      RETURN_IF_ERROR(CheckFilter(*f));
      NodeP n = Make(NK::kFilter, pos);
      n->a.push_back(std::move(operand));
      n->a.push_back(std::move(f));
      operand = std::move(n);
    }
    return operand;
  }

  StatusOr<NodeP> UnarySign() {
    PARSE_DEPTH_GUARD();
    if ((Is(TT::kUnary) || Is(TT::kAdd)) && (Peek()->value == "-" || Peek()->value == "+")) {
      NodeP n = Make(NK::kUnary, Pos(), Peek()->value);
      ++cur_;
      ASSIGN_OR_RETURN(NodeP arg, UnarySign());
      n->a.push_back(std::move(arg));
      return n;
    }
    ASSIGN_OR_RETURN(NodeP p, Primary());
    ASSIGN_OR_RETURN(NodeP member, Member(std::move(p)));
    if (Is(TT::kLParen)) return CallExpr(std::move(member));
    return member;
  }

  StatusOr<NodeP> CallExpr(NodeP callee) {
    PARSE_DEPTH_GUARD();
    NodeP call = Make(NK::kCall, callee->pos);
    call->a.push_back(std::move(callee));
    RETURN_IF_ERROR(Args(/*params=*/false, &call->a));
    ASSIGN_OR_RETURN(NodeP expr, Member(std::move(call)));
    if (Is(TT::kLParen)) return CallExpr(std::move(expr));
    return expr;
  }

  // parseArgs: `(a, b=1, *c, **d)` appended to *out (macro parameters when `params`).
  Status Args(bool params, std::vector<NodeP>* out) {
    RETURN_IF_ERROR(Expect(TT::kLParen, "("));
    std::vector<std::string> names;
    bool saw_keyword = false, saw_spread = false;
    while (!Is(TT::kRParen)) {
      if (cur_ >= t_.size()) return Err("expected )");
      const size_t pos = Pos();
      const bool kw_spread = Is(TT::kPow);
      const bool spread = Is(TT::kMul) && Peek()->value == "*";
      if (params && (kw_spread || spread)) return Err("argument unpacking in a parameter list");
      if (kw_spread) {
        ++cur_;
        NodeP n = Make(NK::kKwSpread, pos);
        ASSIGN_OR_RETURN(NodeP v, Expression());
        n->a.push_back(std::move(v));
        out->push_back(std::move(n));
        if (Is(TT::kComma)) ++cur_;
        if (!Is(TT::kRParen)) return Err("`**` must be applied to the final argument");
        break;
      }
      NodeP arg;
      if (spread) {
        if (saw_spread) return Err("only one `*` argument unpacking is allowed");
        saw_spread = true;
        ++cur_;
        arg = Make(NK::kSpread, pos);
        ASSIGN_OR_RETURN(NodeP v, Expression());
        arg->a.push_back(std::move(v));
      } else {
        ASSIGN_OR_RETURN(arg, Expression());
        if (Is(TT::kEquals)) {
          ++cur_;
          if (arg->kind != NK::kIdent)
            return SyntaxError(src_, arg->pos, "expected a name before =");
          NodeP kw = Make(NK::kKwarg, arg->pos, arg->str);
          ASSIGN_OR_RETURN(NodeP v, Expression());
          kw->a.push_back(std::move(v));
          arg = std::move(kw);
        }
        if (params) {
          if (arg->kind != NK::kIdent && arg->kind != NK::kKwarg) {
            return SyntaxError(src_, arg->pos, "expected a parameter name");
          }
          if (std::find(names.begin(), names.end(), arg->str) != names.end()) {
            return SyntaxError(src_, arg->pos, absl::StrCat("duplicate parameter ", arg->str));
          }
          names.push_back(arg->str);
        }
        if (arg->kind == NK::kKwarg) {
          saw_keyword = true;
        } else if (saw_keyword) {
          return SyntaxError(src_, arg->pos,
                             params ? "non-default parameter after a default one"
                                    : "positional argument after a keyword argument");
        } else if (saw_spread) {
          return SyntaxError(src_, arg->pos, "positional argument after `*` unpacking");
        }
      }
      out->push_back(std::move(arg));
      if (Is(TT::kComma)) ++cur_;
    }
    ++cur_;
    return absl::OkStatus();
  }

  StatusOr<NodeP> Member(NodeP object) {
    while (Is(TT::kDot) || Is(TT::kLBracket)) {
      const bool computed = Is(TT::kLBracket);
      NodeP n = Make(NK::kMember, Pos());
      ++cur_;
      NodeP property;
      if (computed) {
        ASSIGN_OR_RETURN(property, Subscript());
        RETURN_IF_ERROR(Expect(TT::kRBracket, "]"));
      } else {
        ASSIGN_OR_RETURN(property, Primary());
        if (property->kind != NK::kIdent && property->kind != NK::kInt) {
          return SyntaxError(src_, property->pos, "expected a name or an integer after '.'");
        }
      }
      n->flag = computed;
      n->a.push_back(std::move(object));
      n->a.push_back(std::move(property));
      object = std::move(n);
    }
    return object;
  }

  // parseMemberExpressionArgumentsList: `[expr]` or a slice `[a:b:c]`.
  StatusOr<NodeP> Subscript() {
    const size_t pos = Pos();
    std::vector<NodeP> parts;
    bool slice = false;
    while (!Is(TT::kRBracket)) {
      if (cur_ >= t_.size()) return Err("expected ]");
      if (Is(TT::kColon)) {
        parts.push_back(nullptr);
        ++cur_;
        slice = true;
      } else {
        ASSIGN_OR_RETURN(NodeP e, Expression());
        parts.push_back(std::move(e));
        if (Is(TT::kColon)) {
          ++cur_;
          slice = true;
        }
      }
    }
    if (parts.empty()) return Err("expected an index or a slice");
    if (!slice) return std::move(parts[0]);
    if (parts.size() > 3) return SyntaxError(src_, pos, "a slice takes at most 3 parts");
    NodeP n = Make(NK::kSlice, pos);
    parts.resize(3);
    n->a = std::move(parts);
    return n;
  }

  StatusOr<NodeP> Primary() {
    PARSE_DEPTH_GUARD();
    if (cur_ >= t_.size()) return Err("unexpected end of template");
    const Token& t = t_[cur_++];
    switch (t.type) {
      case TT::kNum: {
        const bool is_float = t.value.find('.') != std::string::npos;
        NodeP n = Make(is_float ? NK::kFloat : NK::kInt, t.pos);
        const std::string_view v =
            t.value[0] == '+' ? std::string_view(t.value).substr(1) : std::string_view(t.value);
        n->num = v[0] == '-' ? -ParseDigits(v.substr(1)) : ParseDigits(v);
        return n;
      }
      case TT::kStr: {
        NodeP n = Make(NK::kStr, t.pos, t.value);
        while (Is(TT::kStr)) n->str += t_[cur_++].value;
        return n;
      }
      case TT::kIdent:
        return Make(NK::kIdent, t.pos, t.value);
      case TT::kLParen: {
        ASSIGN_OR_RETURN(NodeP e, Sequence(false));
        RETURN_IF_ERROR(Expect(TT::kRParen, ")"));
        return e;
      }
      case TT::kLBracket:
      case TT::kLBrace: {
        const bool dict = t.type == TT::kLBrace;
        NodeP n = Make(dict ? NK::kObject : NK::kArray, t.pos);
        while (!Is(dict ? TT::kRBrace : TT::kRBracket)) {
          if (cur_ >= t_.size()) return Err(dict ? "expected }" : "expected ]");
          ASSIGN_OR_RETURN(NodeP e, Expression());
          n->a.push_back(std::move(e));
          if (dict) {
            RETURN_IF_ERROR(Expect(TT::kColon, "':' between a key and its value"));
            ASSIGN_OR_RETURN(NodeP v, Expression());
            n->a.push_back(std::move(v));
          }
          if (Is(TT::kComma)) ++cur_;
        }
        ++cur_;
        return n;
      }
      default:
        --cur_;
        return Err(absl::StrCat("unexpected '", t.value, "'"));
    }
  }

  // findAccessedSpecialMacroArguments: whether the body reads `varargs` / `kwargs` before
  // declaring them, in Jinja's visiting order.
  static int SpecialArgs(const std::vector<NodeP>& params, const std::vector<NodeP>& body) {
    SpecialArgsFinder finder;
    for (const NodeP& p : params) finder.Declare(p.get());
    finder.VisitAll(body);
    return finder.accessed();
  }
#undef PARSE_DEPTH_GUARD

  std::string_view src_;
  std::vector<Token> t_;
  const char* stack_base_;
  size_t cur_ = 0;
  int depth_ = 0;
};

}  // namespace

StatusOr<std::vector<NodeP>> ParseTemplate(std::string_view source) {
  const Mapped m = Preprocess(source);
  ASSIGN_OR_RETURN(std::vector<Token> tokens, Lexer(source, m).Run());
  return Parser(source, std::move(tokens)).Run();
}

}  // namespace internal

using internal::DecodeAt;

std::string JsonQuote(std::string_view s) {
  std::string out = "\"";
  for (size_t i = 0, n; i < s.size(); i += n) {
    const uint32_t cp = DecodeAt(s, i, &n);
    switch (cp) {
      case '"':
        out += "\\\"";
        continue;
      case '\\':
        out += "\\\\";
        continue;
      case '\b':
        out += "\\b";
        continue;
      case '\f':
        out += "\\f";
        continue;
      case '\n':
        out += "\\n";
        continue;
      case '\r':
        out += "\\r";
        continue;
      case '\t':
        out += "\\t";
        continue;
      default:
        break;
    }
    if (cp < 0x20 || (cp >= 0xd800 && cp < 0xe000)) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\u%04x", cp);
      out += buf;
    } else {
      out.append(s.substr(i, n));
    }
  }
  return out + "\"";
}

}  // namespace dmoe::gateway::jinja
