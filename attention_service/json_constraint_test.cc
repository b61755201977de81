// JsonState against nlohmann::json's own parser (json::accept) as the oracle: random JSON objects
// (compact and indented, escapes and \u sequences, numbers of every shape) and mutations of them
// (a byte dropped, doubled, replaced or inserted). A text is taken whole exactly when the oracle
// accepts it, it starts with '{' and ends with '}', no run of blanks is longer than
// kMaxBlankRun and it nests no deeper than kMaxDepth; every prefix of a taken text is taken, and
// only the whole is complete.
#include "attention_service/json_constraint.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <regex>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace dmoe {
namespace {

using nlohmann::json;

json RandomValue(std::mt19937& rng, int depth) {
  std::uniform_int_distribution<int> kind(0, depth >= 4 ? 5 : 7);
  switch (kind(rng)) {
    case 0:
      return nullptr;
    case 1:
      return rng() % 2 == 0;
    case 2:
      return static_cast<int64_t>(rng() % 2000) - 1000;
    case 3:
      return std::uniform_real_distribution<double>(-1e6, 1e6)(rng) *
             std::pow(10.0, static_cast<int>(rng() % 40) - 20);
    case 4:
    case 5: {
      const char* pieces[] = {"a",  "b c",  "\"", "\\",   "/",  "\n",
                              "\t", "\x01", "é",  "日本", "{}", ""};
      std::string s;
      for (int i = static_cast<int>(rng() % 4); i > 0; --i) s += pieces[rng() % 12];
      return s;
    }
    case 6: {
      json a = json::array();
      for (int i = static_cast<int>(rng() % 4); i > 0; --i)
        a.push_back(RandomValue(rng, depth + 1));
      return a;
    }
    default: {
      json o = json::object();
      for (int i = static_cast<int>(rng() % 4); i > 0; --i) {
        o["k" + std::to_string(rng() % 10)] = RandomValue(rng, depth + 1);
      }
      return o;
    }
  }
}

// nlohmann's syntax check; a number too large for a double is still JSON (RFC 8259), which its
// parser reports as out_of_range 406 rather than a syntax error.
bool Syntax(const std::string& s) {
  try {
    const json parsed = json::parse(s);
    return !parsed.is_discarded();
  } catch (const json::out_of_range& e) {
    // Overflow: the same text with every exponent 1 (which changes no string's validity).
    return e.id == 406 &&
           json::accept(std::regex_replace(s, std::regex("([eE][+-]?)[0-9]+"), "$011"));
  } catch (const json::exception&) {
    return false;
  }
}

bool Oracle(const std::string& s) {
  if (s.empty() || s.front() != '{' || s.back() != '}' || !Syntax(s)) return false;
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
    const bool blank = c == ' ' || c == '\n' || c == '\t' || c == '\r';
    run = blank ? run + 1 : 0;
    if (run > JsonState::kMaxBlankRun) return false;
    if (c == '"') in_string = true;
    if (c == '{' || c == '[') max_depth = std::max(max_depth, ++depth);
    if (c == '}' || c == ']') --depth;
  }
  return max_depth <= JsonState::kMaxDepth;
}

// Whether JsonState takes `s` whole (every byte, and the object closed at the end), checking on
// the way that it is complete nowhere before the end.
bool TakesWhole(const std::string& s) {
  JsonState st;
  for (size_t i = 0; i < s.size(); ++i) {
    if (st.complete()) return false;
    if (!st.Feed(static_cast<uint8_t>(s[i]))) return false;
  }
  return st.complete();
}

TEST(JsonState, AgreesWithNlohmannOnRandomObjectsAndTheirMutations) {
  std::mt19937 rng(20261205);
  int taken = 0, refused = 0;
  for (int n = 0; n < 3000; ++n) {
    json o = json::object();
    for (int i = static_cast<int>(rng() % 5); i > 0; --i) {
      o["key" + std::to_string(i)] = RandomValue(rng, 1);
    }
    const int indent = static_cast<int>(rng() % 3) - 1;  // -1: compact
    const std::string text = o.dump(indent, ' ', /*ensure_ascii=*/rng() % 2 == 0);
    std::vector<std::string> texts = {text};
    for (int m = 0; m < 6 && !text.empty(); ++m) {
      std::string t = text;
      const size_t at = rng() % t.size();
      const char alphabet[] = "{}[]\",:0123456789-+.eEtrufalsn \n\\u/";
      const char c = alphabet[rng() % (sizeof(alphabet) - 1)];
      switch (rng() % 4) {
        case 0:
          t.erase(at, 1);
          break;
        case 1:
          t.insert(at, 1, t[at]);
          break;
        case 2:
          t[at] = c;
          break;
        default:
          t.insert(at, 1, c);
      }
      texts.push_back(t);
    }
    for (const std::string& t : texts) {
      const bool want = Oracle(t);
      ASSERT_EQ(TakesWhole(t), want) << t;
      (want ? taken : refused)++;
    }
  }
  std::printf("%d texts taken, %d refused, as the oracle says\n", taken, refused);
  EXPECT_GT(taken, 3000);
  EXPECT_GT(refused, 3000);
}

TEST(JsonState, LimitsBlankRunsAndDepthAndTakesNothingAfterTheObject) {
  EXPECT_TRUE(TakesWhole("{" + std::string(JsonState::kMaxBlankRun, ' ') + "}"));
  EXPECT_FALSE(TakesWhole("{" + std::string(JsonState::kMaxBlankRun + 1, ' ') + "}"));
  const int d = JsonState::kMaxDepth;
  EXPECT_TRUE(TakesWhole("{\"a\":" + std::string(d - 1, '[') + std::string(d - 1, ']') + "}"));
  EXPECT_FALSE(TakesWhole("{\"a\":" + std::string(d, '[') + std::string(d, ']') + "}"));
  EXPECT_FALSE(TakesWhole(" {}"));  // the answer starts with the object
  // Surrogates only in pairs, as the oracle says.
  for (const std::string t : {"{\"a\":\"\\ud83d\\ude00\"}", "{\"a\":\"\\ud83d\"}",
                              "{\"a\":\"\\ude00\"}", "{\"a\":\"\\ud83dx\"}",
                              "{\"a\":\"\\ud83d\\u0041\"}", "{\"a\":\"\\uD83D\\uDE00\\u00e9\"}"}) {
    EXPECT_EQ(TakesWhole(t), Oracle(t)) << t;
  }
  EXPECT_TRUE(TakesWhole("{\"a\":\"\\ud83d\\ude00\"}"));
  JsonState s;
  ASSERT_TRUE(s.Feed("{}"));
  EXPECT_TRUE(s.complete());
  JsonState after = s;
  EXPECT_FALSE(after.Feed(" "));
}

// The mask: tokens whose whole text may come next; special tokens ("") and stop ids never.
TEST(JsonMask, AllowsTheTokensThatKeepAnObjectPrefix) {
  const std::vector<std::string> texts = {"{", "}", "\"a\"", ":", " 1", "1}", "x", "", "\"", "{\""};
  const JsonVocab vocab(&texts);
  std::vector<uint8_t> allowed;
  JsonState s;
  JsonMask(s, vocab, {}, &allowed);
  EXPECT_EQ(allowed, (std::vector<uint8_t>{1, 0, 0, 0, 0, 0, 0, 0, 0, 1}));
  ASSERT_TRUE(s.Feed("{\"a\":"));
  JsonMask(s, vocab, {}, &allowed);
  EXPECT_EQ(allowed, (std::vector<uint8_t>{1, 0, 1, 0, 1, 1, 0, 0, 1, 1}));
  JsonMask(s, vocab, {4, 5}, &allowed);  // stop ids
  EXPECT_EQ(allowed, (std::vector<uint8_t>{1, 0, 1, 0, 0, 0, 0, 0, 1, 1}));
  ASSERT_TRUE(s.Feed("\"x"));  // in a string: all but the empty one
  JsonMask(s, vocab, {}, &allowed);
  EXPECT_EQ(allowed, (std::vector<uint8_t>{1, 1, 0, 1, 1, 1, 1, 0, 1, 1}));
}

// Inside a string the mask takes plain tokens without reading them: the same mask as reading
// every token, for texts with quotes, backslashes, control bytes and characters split across
// tokens (a lone lead byte, a lone continuation byte) beside plain ones.
TEST(JsonMask, ThePlainStringShortcutGivesTheSameMask) {
  const std::vector<std::string> texts = {"abc", "a\"",  "\\n",  "\\",     "\x01",
                                          "é",   "\xc3", "\xa9", "日本",   "\xe6\x97",
                                          " ",   "}",    "\"}",  "x\":1}", ""};
  const JsonVocab vocab(&texts);
  for (const char* prefix : {"{\"", "{\"k\":\"ab", "{\"k\":\"\xc3", "{\"k\":\"\\"}) {
    JsonState s;
    ASSERT_TRUE(s.Feed(prefix)) << prefix;
    std::vector<uint8_t> fast, slow(texts.size(), 0);
    JsonMask(s, vocab, {}, &fast);
    for (size_t id = 0; id < texts.size(); ++id) {
      JsonState t = s;
      slow[id] = !texts[id].empty() && t.Feed(texts[id]) ? 1 : 0;
    }
    EXPECT_EQ(fast, slow) << prefix;
    EXPECT_EQ(vocab.plain(0), true);
    EXPECT_EQ(vocab.plain(6), false) << "a lone lead byte is not plain";
  }
}

}  // namespace
}  // namespace dmoe
