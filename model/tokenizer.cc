#include "model/tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <fstream>
#include <queue>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "nlohmann/json.hpp"

namespace dmoe {
namespace {

using Json = nlohmann::json;

absl::Status Bad(absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat("tokenizer.json: ", what));
}

std::string CodePointToUtf8(uint32_t cp) {
  std::string s;
  if (cp < 0x80) {
    s.push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    s.push_back(static_cast<char>(0xc0 | (cp >> 6)));
    s.push_back(static_cast<char>(0x80 | (cp & 0x3f)));
  } else if (cp < 0x10000) {
    s.push_back(static_cast<char>(0xe0 | (cp >> 12)));
    s.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3f)));
    s.push_back(static_cast<char>(0x80 | (cp & 0x3f)));
  } else {
    s.push_back(static_cast<char>(0xf0 | (cp >> 18)));
    s.push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3f)));
    s.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3f)));
    s.push_back(static_cast<char>(0x80 | (cp & 0x3f)));
  }
  return s;
}

// Length of the valid UTF-8 character at s[i], or 0 when the bytes there are not one
// (overlong forms, surrogates and code points above U+10FFFF are invalid). `complete` tells
// whether a 0 is only because the input ends early.
size_t Utf8CharLen(const std::string& s, size_t i, bool* truncated = nullptr) {
  if (truncated) *truncated = false;
  const auto b = [&](size_t k) { return static_cast<uint8_t>(s[k]); };
  const uint8_t c = b(i);
  size_t n;
  uint32_t min;
  if (c < 0x80) return 1;
  if ((c & 0xe0) == 0xc0) {
    n = 2;
    min = 0x80;
  } else if ((c & 0xf0) == 0xe0) {
    n = 3;
    min = 0x800;
  } else if ((c & 0xf8) == 0xf0) {
    n = 4;
    min = 0x10000;
  } else {
    return 0;
  }
  uint32_t cp = c & (0x7f >> n);
  for (size_t k = 1; k < n; ++k) {
    if (i + k >= s.size()) {
      if (truncated) *truncated = true;
      return 0;
    }
    if ((b(i + k) & 0xc0) != 0x80) return 0;
    cp = (cp << 6) | (b(i + k) & 0x3f);
  }
  if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return 0;
  return n;
}

}  // namespace

struct Tokenizer::Regex {
  pcre2_code* code = nullptr;
  ~Regex() {
    if (code) pcre2_code_free(code);
  }
  // Splits `text` (valid UTF-8) into matches and the gaps between them ("Isolated").
  void Split(const std::string& text, std::vector<std::string>* out) const {
    pcre2_match_data* md = pcre2_match_data_create_from_pattern(code, nullptr);
    const auto* subject = reinterpret_cast<PCRE2_SPTR>(text.data());
    size_t prev = 0, offset = 0;
    while (offset <= text.size()) {
      const int rc =
          pcre2_match(code, subject, text.size(), offset, PCRE2_NO_UTF_CHECK, md, nullptr);
      if (rc < 0) break;
      const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
      const size_t start = ov[0], end = ov[1];
      if (end == start) {  // an empty match: move on by one character
        if (start >= text.size()) break;
        offset = start + std::max<size_t>(1, Utf8CharLen(text, start));
        continue;
      }
      if (start > prev) out->push_back(text.substr(prev, start - prev));
      out->push_back(text.substr(start, end - start));
      prev = offset = end;
    }
    if (prev < text.size()) out->push_back(text.substr(prev));
    pcre2_match_data_free(md);
  }
};

// Added tokens by their bytes, for leftmost-longest matching.
struct Tokenizer::Trie {
  struct Node {
    std::map<uint8_t, int32_t> next;
    int32_t id = -1;
  };
  std::vector<Node> nodes{Node()};
  void Add(const std::string& s, int32_t id) {
    int32_t n = 0;
    for (unsigned char c : s) {
      auto it = nodes[static_cast<size_t>(n)].next.find(c);
      if (it == nodes[static_cast<size_t>(n)].next.end()) {
        nodes.push_back(Node());
        const int32_t child = static_cast<int32_t>(nodes.size() - 1);
        nodes[static_cast<size_t>(n)].next[c] = child;
        n = child;
      } else {
        n = it->second;
      }
    }
    nodes[static_cast<size_t>(n)].id = id;
  }
  // Longest token starting at text[i]: its length and id, or length 0.
  size_t Longest(const std::string& text, size_t i, int32_t* id) const {
    int32_t n = 0;
    size_t best = 0;
    for (size_t k = i; k < text.size(); ++k) {
      auto it = nodes[static_cast<size_t>(n)].next.find(static_cast<uint8_t>(text[k]));
      if (it == nodes[static_cast<size_t>(n)].next.end()) break;
      n = it->second;
      if (nodes[static_cast<size_t>(n)].id >= 0) {
        best = k - i + 1;
        *id = nodes[static_cast<size_t>(n)].id;
      }
    }
    return best;
  }
};

Tokenizer::~Tokenizer() = default;

absl::StatusOr<std::string> OnigurumaRegexToPcre2(const std::string& pattern) {
  std::string out;
  out.reserve(pattern.size() + 32);
  bool in_class = false;
  for (size_t i = 0; i < pattern.size(); ++i) {
    const char ch = pattern[i];
    if (ch == '\\' && i + 1 < pattern.size()) {
      const char e = pattern[++i];
      switch (e) {
        case 's':
          out += "\\p{White_Space}";
          break;
        case 'S':
          out += "\\P{White_Space}";
          break;
        case 'h':
          out += in_class ? "0-9a-fA-F" : "[0-9a-fA-F]";
          break;
        case 'H':
          if (in_class) {
            return absl::InvalidArgumentError("\\H inside a character class is not supported");
          }
          out += "[^0-9a-fA-F]";
          break;
        case 'v':
          out += "\\x{0B}";
          break;
        default:
          out += ch;
          out += e;
      }
      continue;
    }
    if (!in_class && ch == '[') {
      in_class = true;
      out += ch;
      // A ']' right after '[' or '[^' is a literal member, not the end of the class.
      if (i + 1 < pattern.size() && pattern[i + 1] == '^') out += pattern[++i];
      if (i + 1 < pattern.size() && pattern[i + 1] == ']') out += pattern[++i];
      continue;
    }
    if (in_class && ch == '[' && i + 1 < pattern.size() && pattern[i + 1] == ':') {
      const size_t end = pattern.find(":]", i + 2);  // a POSIX class such as [:alpha:]
      if (end != std::string::npos) {
        out.append(pattern, i, end + 2 - i);
        i = end + 1;
        continue;
      }
    }
    if (in_class && ch == ']') in_class = false;
    out += ch;
  }
  return out;
}

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  std::stringstream ss;
  ss << in.rdbuf();
  auto t = FromJson(ss.str());
  if (!t.ok())
    return absl::Status(t.status().code(), absl::StrCat(path, ": ", t.status().message()));
  return t;
}

struct Tokenizer::Loader {
  // ByteLevel's byte <-> character table (GPT-2's bytes_to_unicode).
  static void ByteTable(Tokenizer* t) {
    t->byte_char_.resize(256);
    std::vector<int> printable;
    for (int b = '!'; b <= '~'; ++b) printable.push_back(b);
    for (int b = 0xa1; b <= 0xac; ++b) printable.push_back(b);
    for (int b = 0xae; b <= 0xff; ++b) printable.push_back(b);
    std::vector<bool> is(256, false);
    for (int b : printable) is[static_cast<size_t>(b)] = true;
    int extra = 0;
    for (int b = 0; b < 256; ++b) {
      const uint32_t cp = is[static_cast<size_t>(b)] ? static_cast<uint32_t>(b) : 256u + extra++;
      t->byte_char_[static_cast<size_t>(b)] = CodePointToUtf8(cp);
      t->char_byte_[t->byte_char_[static_cast<size_t>(b)]] = b;
    }
  }

  // o[key] where o is an object that has it, else null (a const object's operator[] asserts).
  static const Json& Get(const Json& o, const std::string& key) {
    static const Json kNull;
    if (!o.is_object()) return kNull;
    auto it = o.find(key);
    return it == o.end() ? kNull : *it;
  }
  // A string field (`def` when absent or null); an error naming `field` when of another type.
  static absl::StatusOr<std::string> Str(const Json& o, const std::string& key,
                                         const std::string& field, const std::string& def = "") {
    const Json& v = Get(o, key);
    if (v.is_null()) return def;
    if (!v.is_string()) return Bad(absl::StrCat(field, ": must be a string"));
    return v.get<std::string>();
  }
  static absl::StatusOr<bool> Flag(const Json& o, const std::string& key, const std::string& field,
                                   bool def) {
    const Json& v = Get(o, key);
    if (v.is_null()) return def;
    if (!v.is_boolean()) return Bad(absl::StrCat(field, ": must be true or false"));
    return v.get<bool>();
  }
  // Token ids: integers in [0, kMaxId) (the vocabulary's table has one entry per id).
  static constexpr int64_t kMaxId = int64_t{1} << 24;
  static absl::StatusOr<int32_t> Id(const Json& v, const std::string& field) {
    if (!v.is_number_integer() || v.get<int64_t>() < 0 || v.get<int64_t>() >= kMaxId) {
      return Bad(absl::StrCat(field, ": ids must be integers in [0, ", kMaxId, ")"));
    }
    return static_cast<int32_t>(v.get<int64_t>());
  }

  // One added_tokens entry, into the tries.
  static absl::Status AddedToken(const Json& a, size_t i, Tokenizer* t) {
    const std::string field = absl::StrCat("added_tokens[", i, "]");
    ASSIGN_OR_RETURN(const int32_t id, Id(Get(a, "id"), field + ".id"));
    const Json& c = Get(a, "content");
    if (!c.is_string()) return Bad(field + ".content: must be a string");
    const std::string content = c.get<std::string>();
    for (const char* unsupported : {"lstrip", "rstrip", "single_word"}) {
      ASSIGN_OR_RETURN(const bool on, Flag(a, unsupported, field + "." + unsupported, false));
      if (on) {
        return Bad(absl::StrCat("added token ", content, " (", field,
                                "): lstrip/rstrip/single_word unsupported"));
      }
    }
    ASSIGN_OR_RETURN(const bool normalized, Flag(a, "normalized", field + ".normalized", false));
    ASSIGN_OR_RETURN(const bool special, Flag(a, "special", field + ".special", false));
    t->id_to_token_[static_cast<size_t>(id)] = content;
    t->special_[static_cast<size_t>(id)] = special;
    (normalized ? t->added_normalized_ : t->added_raw_)->Add(content, id);
    return absl::OkStatus();
  }

  // model.vocab and added_tokens.
  static absl::Status Vocab(const Json& model, const Json& added, Tokenizer* t) {
    const Json& vocab = Get(model, "vocab");
    if (!vocab.is_object()) return Bad("missing model.vocab");
    if (!added.is_array()) return Bad("added_tokens: must be an array");
    int32_t max_id = -1;
    for (auto it = vocab.begin(); it != vocab.end(); ++it) {
      ASSIGN_OR_RETURN(const int32_t id, Id(*it, "model.vocab"));
      t->vocab_[it.key()] = id;
      max_id = std::max(max_id, id);
    }
    for (size_t i = 0; i < added.size(); ++i) {
      const Json& a = added[i];
      const std::string field = absl::StrCat("added_tokens[", i, "]");
      if (!a.is_object()) return Bad(field + ": entries need id and content");
      ASSIGN_OR_RETURN(const int32_t id, Id(Get(a, "id"), field + ".id"));
      max_id = std::max(max_id, id);
    }
    t->id_to_token_.resize(static_cast<size_t>(max_id + 1));
    t->special_.assign(static_cast<size_t>(max_id + 1), false);
    for (const auto& [tok, id] : t->vocab_) t->id_to_token_[static_cast<size_t>(id)] = tok;
    t->added_raw_ = std::make_unique<Trie>();
    t->added_normalized_ = std::make_unique<Trie>();
    for (size_t i = 0; i < added.size(); ++i) RETURN_IF_ERROR(AddedToken(added[i], i, t));
    return absl::OkStatus();
  }

  // Merges: "a b" strings (or [a, b] pairs in newer files), ranked by position.
  static absl::Status Merges(const Json& model, Tokenizer* t) {
    const Json& merges = Get(model, "merges");
    if (!merges.is_array()) return Bad("missing model.merges");
    for (size_t rank = 0; rank < merges.size(); ++rank) {
      std::string a, b;
      const Json& m = merges[rank];
      if (m.is_string()) {
        const std::string text = m.get<std::string>();
        const size_t sp = text.find(' ');
        if (sp == std::string::npos) {
          return Bad(absl::StrCat("model.merges[", rank, "] has no space"));
        }
        a = text.substr(0, sp);
        b = text.substr(sp + 1);
      } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
        a = m[0].get<std::string>();
        b = m[1].get<std::string>();
      } else {
        return Bad(absl::StrCat("model.merges[", rank, "] is malformed"));
      }
      auto ia = t->vocab_.find(a), ib = t->vocab_.find(b), ic = t->vocab_.find(a + b);
      if (ia == t->vocab_.end() || ib == t->vocab_.end() || ic == t->vocab_.end()) {
        return Bad(absl::StrCat("model.merges[", rank, "] names a token not in the vocab"));
      }
      const uint64_t key =
          (static_cast<uint64_t>(ia->second) << 32) | static_cast<uint32_t>(ib->second);
      t->merges_.emplace(key, std::make_pair(static_cast<int32_t>(rank), ic->second));
    }
    return absl::OkStatus();
  }

  // One Split step's regex, translated to PCRE2 and compiled.
  static absl::StatusOr<std::unique_ptr<Regex>> SplitRegex(const Json& p) {
    ASSIGN_OR_RETURN(const std::string behavior,
                     Str(p, "behavior", "pre_tokenizer Split behavior"));
    ASSIGN_OR_RETURN(const bool invert, Flag(p, "invert", "pre_tokenizer Split invert", false));
    if (behavior != "Isolated" || invert) {
      return Bad("pre_tokenizer Split: only behavior Isolated without invert");
    }
    const Json& regex = Get(Get(p, "pattern"), "Regex");
    if (!regex.is_string()) return Bad("pre_tokenizer Split: only Regex patterns (strings)");
    const std::string onig = regex.get<std::string>();
    auto translated = OnigurumaRegexToPcre2(onig);
    if (!translated.ok()) {
      return Bad(
          absl::StrCat("pre_tokenizer regex \"", onig, "\": ", translated.status().message()));
    }
    const std::string& pattern = *translated;
    auto re = std::make_unique<Regex>();
    int err = 0;
    PCRE2_SIZE at = 0;
    re->code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                             PCRE2_UTF | PCRE2_UCP, &err, &at, nullptr);
    if (re->code == nullptr) {
      PCRE2_UCHAR msg[256];
      pcre2_get_error_message(err, msg, sizeof(msg));
      return Bad(absl::StrCat("pre_tokenizer regex \"", pattern, "\" at ", at, ": ",
                              reinterpret_cast<const char*>(msg)));
    }
    pcre2_jit_compile(re->code, PCRE2_JIT_COMPLETE);  // optional speed-up
    return re;
  }

  // Pre-tokenizer: Sequence of Split (Isolated, not inverted) regexes, then ByteLevel without
  // its own regex.
  static absl::Status PreTokenizer(const Json& pre, Tokenizer* t) {
    if (pre.is_null()) return absl::OkStatus();  // none: the text is one piece
    if (!pre.is_object()) return Bad("pre_tokenizer: must be an object (or null)");
    std::vector<const Json*> steps;
    ASSIGN_OR_RETURN(const std::string kind, Str(pre, "type", "pre_tokenizer.type"));
    if (kind == "Sequence") {
      const Json& list = Get(pre, "pretokenizers");
      if (!list.is_array()) return Bad("pre_tokenizer.pretokenizers: must be an array");
      for (const Json& p : list) steps.push_back(&p);
    } else {
      steps.push_back(&pre);
    }
    for (const Json* p : steps) {
      if (!p->is_object()) return Bad("pre_tokenizer.pretokenizers: steps must be objects");
      ASSIGN_OR_RETURN(const std::string type, Str(*p, "type", "pre_tokenizer step type"));
      if (type.empty()) return Bad("pre_tokenizer step type: missing");
      if (type == "ByteLevel") {
        ASSIGN_OR_RETURN(const bool prefix,
                         Flag(*p, "add_prefix_space", "pre_tokenizer ByteLevel", false));
        ASSIGN_OR_RETURN(const bool regex, Flag(*p, "use_regex", "pre_tokenizer ByteLevel", true));
        if (prefix || regex) {
          return Bad("pre_tokenizer ByteLevel: only add_prefix_space=false, use_regex=false");
        }
        continue;
      }
      if (type != "Split") return Bad(absl::StrCat("pre_tokenizer ", type, " is not supported"));
      ASSIGN_OR_RETURN(std::unique_ptr<Regex> re, SplitRegex(*p));
      t->splits_.push_back(std::move(re));
    }
    return absl::OkStatus();
  }

  static absl::StatusOr<std::unique_ptr<Tokenizer>> Load(const Json& j) {
    if (!j.is_object()) return Bad("not a JSON object");
    auto t = std::unique_ptr<Tokenizer>(new Tokenizer());
    ByteTable(t.get());
    const Json& model = Get(j, "model");
    if (!model.is_object()) return Bad("missing model");
    ASSIGN_OR_RETURN(const std::string type, Str(model, "type", "model.type"));
    if (type != "BPE") return Bad("model.type: only BPE is supported");
    ASSIGN_OR_RETURN(const bool fallback,
                     Flag(model, "byte_fallback", "model.byte_fallback", false));
    if (fallback) return Bad("model.byte_fallback is not supported");
    const Json& added = Get(j, "added_tokens");
    static const Json kNone = Json::array();
    RETURN_IF_ERROR(Vocab(model, added.is_null() ? kNone : added, t.get()));
    RETURN_IF_ERROR(Merges(model, t.get()));
    for (int b = 0; b < 256; ++b) {
      if (!t->vocab_.count(t->byte_char_[static_cast<size_t>(b)])) {
        return Bad(absl::StrCat("model.vocab lacks the ByteLevel character of byte ", b));
      }
    }
    RETURN_IF_ERROR(PreTokenizer(Get(j, "pre_tokenizer"), t.get()));
    const Json& norm = Get(j, "normalizer");
    if (!norm.is_null()) {
      ASSIGN_OR_RETURN(const std::string ntype, Str(norm, "type", "normalizer.type"));
      const Json& list = Get(norm, "normalizers");
      if (ntype != "Sequence" || !list.is_array() || !list.empty()) {
        return Bad("normalizer: only none or an empty Sequence is supported");
      }
    }
    return t;
  }
};

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromJson(const std::string& json_text) {
  const Json j = Json::parse(json_text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return Bad("not a JSON object");
  try {  // every field is checked before use; this is the net for what a check missed
    return Loader::Load(j);
  } catch (const Json::exception& e) {
    return Bad(absl::StrCat("malformed: ", e.what()));
  }
}

int32_t Tokenizer::TokenId(const std::string& token) const {
  for (size_t i = 0; i < id_to_token_.size(); ++i) {
    if (id_to_token_[i] == token) return static_cast<int32_t>(i);
  }
  return -1;
}

void Tokenizer::EncodePiece(const std::string& piece, std::vector<int32_t>* out) const {
  // One symbol per byte, then merges by rank (ties: leftmost), as Hugging Face's Word::merge_all.
  struct Symbol {
    int32_t id;
    int32_t prev, next;
    bool alive;
  };
  std::vector<Symbol> sym;
  sym.reserve(piece.size());
  for (size_t i = 0; i < piece.size(); ++i) {
    sym.push_back(Symbol{vocab_.at(byte_char_[static_cast<uint8_t>(piece[i])]),
                         static_cast<int32_t>(i) - 1,
                         i + 1 < piece.size() ? static_cast<int32_t>(i + 1) : -1, true});
  }
  struct Merge {
    int32_t rank, pos, new_id;
    bool operator<(const Merge& o) const {  // max-heap: the smallest rank, then position, on top
      return rank != o.rank ? rank > o.rank : pos > o.pos;
    }
  };
  std::priority_queue<Merge> queue;
  auto pair_of = [&](int32_t a, int32_t b) -> const std::pair<int32_t, int32_t>* {
    auto it = merges_.find((static_cast<uint64_t>(a) << 32) | static_cast<uint32_t>(b));
    return it == merges_.end() ? nullptr : &it->second;
  };
  for (size_t i = 0; i + 1 < sym.size(); ++i) {
    if (const auto* m = pair_of(sym[i].id, sym[i + 1].id)) {
      queue.push(Merge{m->first, static_cast<int32_t>(i), m->second});
    }
  }
  while (!queue.empty()) {
    const Merge top = queue.top();
    queue.pop();
    Symbol& left = sym[static_cast<size_t>(top.pos)];
    if (!left.alive || left.next < 0) continue;
    const Symbol right = sym[static_cast<size_t>(left.next)];
    const auto* m = pair_of(left.id, right.id);
    if (m == nullptr || m->second != top.new_id) continue;  // an expired entry
    left.id = top.new_id;
    sym[static_cast<size_t>(left.next)].alive = false;
    left.next = right.next;
    if (right.next >= 0) sym[static_cast<size_t>(right.next)].prev = top.pos;
    if (left.prev >= 0) {
      if (const auto* p = pair_of(sym[static_cast<size_t>(left.prev)].id, left.id)) {
        queue.push(Merge{p->first, left.prev, p->second});
      }
    }
    if (left.next >= 0) {
      if (const auto* n = pair_of(left.id, sym[static_cast<size_t>(left.next)].id)) {
        queue.push(Merge{n->first, top.pos, n->second});
      }
    }
  }
  for (int32_t i = sym.empty() ? -1 : 0; i >= 0; i = sym[static_cast<size_t>(i)].next) {
    out->push_back(sym[static_cast<size_t>(i)].id);
  }
}

void Tokenizer::EncodeText(const std::string& text, std::vector<int32_t>* out) const {
  // Valid UTF-8 runs go through the regex pre-tokenizers; invalid bytes are pieces of their own.
  size_t i = 0;
  while (i < text.size()) {
    size_t j = i;
    while (j < text.size()) {
      const size_t n = Utf8CharLen(text, j);
      if (n == 0) break;
      j += n;
    }
    if (j > i) {
      std::vector<std::string> pieces = {text.substr(i, j - i)}, next;
      for (const auto& re : splits_) {
        next.clear();
        for (const std::string& p : pieces) re->Split(p, &next);
        pieces.swap(next);
      }
      for (const std::string& p : pieces) EncodePiece(p, out);
      i = j;
    }
    size_t k = i;
    while (k < text.size() && Utf8CharLen(text, k) == 0) ++k;
    if (k > i) {
      EncodePiece(text.substr(i, k - i), out);
      i = k;
    }
  }
}

void Tokenizer::SplitAdded(const std::string& text, const Trie& trie,
                           std::vector<std::string>* pieces, std::vector<int32_t>* ids) const {
  // Leftmost-longest matches of added tokens; pieces[i] is text when ids[i] < 0.
  size_t start = 0, i = 0;
  while (i < text.size()) {
    int32_t id = -1;
    const size_t n = trie.Longest(text, i, &id);
    if (n == 0) {
      ++i;
      continue;
    }
    if (i > start) {
      pieces->push_back(text.substr(start, i - start));
      ids->push_back(-1);
    }
    pieces->push_back(std::string());
    ids->push_back(id);
    i += n;
    start = i;
  }
  if (start < text.size()) {
    pieces->push_back(text.substr(start));
    ids->push_back(-1);
  }
}

std::vector<int32_t> Tokenizer::Encode(const std::string& text) const {
  std::vector<int32_t> out;
  std::vector<std::string> raw_pieces;
  std::vector<int32_t> raw_ids;
  SplitAdded(text, *added_raw_, &raw_pieces, &raw_ids);
  for (size_t i = 0; i < raw_pieces.size(); ++i) {
    if (raw_ids[i] >= 0) {
      out.push_back(raw_ids[i]);
      continue;
    }
    std::vector<std::string> pieces;
    std::vector<int32_t> ids;
    SplitAdded(raw_pieces[i], *added_normalized_, &pieces, &ids);
    for (size_t k = 0; k < pieces.size(); ++k) {
      if (ids[k] >= 0) {
        out.push_back(ids[k]);
      } else {
        EncodeText(pieces[k], &out);
      }
    }
  }
  return out;
}

std::string Tokenizer::TokenBytes(int32_t id) const {
  if (id < 0 || static_cast<size_t>(id) >= id_to_token_.size()) return std::string();
  const std::string& tok = id_to_token_[static_cast<size_t>(id)];
  // ByteLevel decoder: every character maps back to a byte, or the token is kept as it is.
  std::string bytes;
  for (size_t i = 0; i < tok.size();) {
    const size_t n = std::max<size_t>(1, Utf8CharLen(tok, i));
    auto it = char_byte_.find(tok.substr(i, n));
    if (it == char_byte_.end()) return tok;
    bytes.push_back(static_cast<char>(it->second));
    i += n;
  }
  return bytes;
}

std::string Tokenizer::Decode(const std::vector<int32_t>& ids) const {
  std::string out;
  for (int32_t id : ids) out += TokenBytes(id);
  return out;
}

std::string IncrementalDetokenizer::Add(int32_t id) {
  if (skip_special_ && t_->IsSpecial(id)) return std::string();
  pending_ += t_->TokenBytes(id);
  std::string out;
  size_t i = 0;
  while (i < pending_.size()) {
    bool truncated = false;
    const size_t n = Utf8CharLen(pending_, i, &truncated);
    if (n > 0) {
      out.append(pending_, i, n);
      i += n;
    } else if (truncated) {
      break;  // an incomplete character: wait for the next token
    } else {
      out += "\xef\xbf\xbd";  // U+FFFD for a byte that cannot be part of a character
      ++i;
    }
  }
  pending_.erase(0, i);
  return out;
}

std::string IncrementalDetokenizer::Flush() {
  std::string out;
  for (size_t i = 0; i < pending_.size(); ++i) out += "\xef\xbf\xbd";
  pending_.clear();
  return out;
}

}  // namespace dmoe
