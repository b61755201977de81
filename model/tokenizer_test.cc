#include "model/tokenizer.h"

#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "gtest/gtest.h"
#include "model/tokenizer_testing.h"
#include "nlohmann/json.hpp"

namespace dmoe {
namespace {

using testing::ByteChar;

nlohmann::json MakeJson(const std::string& split_regex = "") {
  nlohmann::json vocab = nlohmann::json::object();
  for (int b = 0; b < 256; ++b) vocab[ByteChar(b)] = b;
  vocab["ab"] = 256;
  vocab["abc"] = 257;
  vocab["bc"] = 258;
  vocab["aa"] = 259;
  nlohmann::json j = {
      {"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", {"a b", "ab c", "b c", "a a"}}}},
      {"added_tokens",
       {{{"id", 300}, {"content", "<s>"}, {"special", true}, {"normalized", false}}}},
      {"normalizer", nullptr},
      {"decoder", {{"type", "ByteLevel"}}}};
  nlohmann::json steps = nlohmann::json::array();
  if (!split_regex.empty()) {
    steps.push_back({{"type", "Split"},
                     {"pattern", {{"Regex", split_regex}}},
                     {"behavior", "Isolated"},
                     {"invert", false}});
  }
  steps.push_back({{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", false}});
  j["pre_tokenizer"] = {{"type", "Sequence"}, {"pretokenizers", steps}};
  return j;
}

std::unique_ptr<Tokenizer> Make(const std::string& split_regex = "") {
  auto t = Tokenizer::FromJson(MakeJson(split_regex).dump());
  EXPECT_TRUE(t.ok()) << t.status();
  return std::move(t).value();
}

using Ids = std::vector<int32_t>;

TEST(Tokenizer, MergesApplyByRankThenLeftmost) {
  auto t = Make();
  EXPECT_EQ(t->Encode("abc"), (Ids{257}));        // a+b (rank 0), then ab+c (rank 1)
  EXPECT_EQ(t->Encode("bcab"), (Ids{258, 256}));  // a+b first, then b+c
  EXPECT_EQ(t->Encode("aaa"), (Ids{259, 'a'}));   // leftmost pair among equal ranks
  EXPECT_EQ(t->Encode("xyz"), (Ids{'x', 'y', 'z'}));
  EXPECT_EQ(t->Encode(""), Ids{});
}

TEST(Tokenizer, AddedTokensAreFoundInTheText) {
  auto t = Make();
  EXPECT_EQ(t->Encode("ab<s>c"), (Ids{256, 300, 'c'}));
  EXPECT_EQ(t->Decode({256, 300, 'c'}), "ab<s>c");
  EXPECT_EQ(t->TokenId("<s>"), 300);
}

TEST(Tokenizer, SplitRegexIsolatesMatches) {
  auto t = Make("\\p{N}{1,3}");
  // "ab" + "12345": digits in runs of at most three, each piece encoded on its own.
  EXPECT_EQ(t->Encode("ab12345c"), (Ids{256, '1', '2', '3', '4', '5', 'c'}));
  auto no_split = Make();
  EXPECT_EQ(no_split->Encode("abc"), t->Encode("abc"));
}

TEST(Tokenizer, BytesRoundTripIncludingInvalidUtf8) {
  auto t = Make("\\s+");
  for (const std::string& s :
       {std::string("héllo wörld"), std::string("\xff\xfe ab \xc3"), std::string("\xe4\xbd"),
        std::string("日本 語\n\t"), std::string("\x00\x01", 2)}) {
    EXPECT_EQ(t->Decode(t->Encode(s)), s);
  }
}

TEST(IncrementalDetokenizer, NeverEmitsHalfACharacter) {
  auto t = Make();
  // "é" is C3 A9: two byte tokens.
  IncrementalDetokenizer d(t.get());
  EXPECT_EQ(d.Add(0xc3), "");
  EXPECT_EQ(d.Add(0xa9), "\xc3\xa9");
  EXPECT_EQ(d.Add('a'), "a");
  EXPECT_EQ(d.Add(0xff), "\xef\xbf\xbd");  // can never start a character
  EXPECT_EQ(d.Add(0xe4), "");
  EXPECT_EQ(d.Flush(), "\xef\xbf\xbd");  // incomplete at the end
}

// Added tokens marked "special" in tokenizer.json (and only those) add no text when skipped; the
// others, and every token without skipping, decode to their content.
TEST(IncrementalDetokenizer, SkipsSpecialTokensOnlyWhenAsked) {
  auto t = Tokenizer::FromJson(testing::ByteLevelTokenizerJson(/*with_added=*/true));
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_TRUE((*t)->IsSpecial(256));   // <eos>
  EXPECT_FALSE((*t)->IsSpecial(257));  // <tool>
  EXPECT_FALSE((*t)->IsSpecial('a'));
  EXPECT_FALSE((*t)->IsSpecial(-1));
  EXPECT_FALSE((*t)->IsSpecial(1 << 20));
  for (const bool skip : {false, true}) {
    IncrementalDetokenizer d(t->get(), skip);
    std::string text;
    for (int32_t id : std::vector<int32_t>{'a', 0xc3, 256, 0xa9, 257, 'b'}) text += d.Add(id);
    text += d.Flush();
    // A skipped token between a character's bytes does not break it; one kept does.
    EXPECT_EQ(text, skip ? "a\xc3\xa9<tool>b" : "a\xef\xbf\xbd<eos>\xef\xbf\xbd<tool>b")
        << (skip ? "skipping" : "keeping");
  }
}

TEST(Tokenizer, UnsupportedFilesAreClearErrors) {
  EXPECT_FALSE(Tokenizer::FromJson("{").ok());
  auto wp = Tokenizer::FromJson(R"({"model": {"type": "WordPiece", "vocab": {}}})");
  ASSERT_FALSE(wp.ok());
  EXPECT_NE(wp.status().message().find("only BPE"), absl::string_view::npos);
  EXPECT_FALSE(Tokenizer::FromFile("/nonexistent/tokenizer.json").ok());
}

// A tokenizer.json with a field missing or of the wrong type is an error naming the file's
// field, never an abort (nlohmann asserts on a missing key of a const object) or an exception.
TEST(Tokenizer, MalformedFieldsAreErrorsNotCrashes) {
  using J = nlohmann::json;
  const std::vector<std::pair<const char*, std::function<void(J&)>>> cases = {
      {"merges", [](J& j) { j["model"].erase("merges"); }},
      {"merges",
       [](J& j) {
         j["model"]["merges"] = J::array({J::array({1, 2})});
       }},
      {"added_tokens", [](J& j) { j["added_tokens"][0]["id"] = "300"; }},
      {"added_tokens", [](J& j) { j["added_tokens"][0]["content"] = 5; }},
      {"added_tokens", [](J& j) { j["added_tokens"][0]["lstrip"] = "no"; }},
      {"added_tokens", [](J& j) { j["added_tokens"][0]["id"] = -7; }},
      {"added_tokens", [](J& j) { j["added_tokens"] = "none"; }},
      {"vocab", [](J& j) { j["model"]["vocab"]["zz"] = 1e12; }},
      {"type", [](J& j) { j["model"]["type"] = 3; }},
      {"pre_tokenizer", [](J& j) { j["pre_tokenizer"].erase("pretokenizers"); }},
      {"pre_tokenizer", [](J& j) { j["pre_tokenizer"]["pretokenizers"][0]["type"] = 1; }},
      {"pre_tokenizer", [](J& j) { j["pre_tokenizer"] = "ByteLevel"; }},
      {"pre_tokenizer", [](J& j) { j["pre_tokenizer"] = J::array(); }},
      {"pre_tokenizer", [](J& j) { j["pre_tokenizer"]["pretokenizers"][0] = 3; }},
      {"pre_tokenizer", [](J& j) { j["pre_tokenizer"]["pretokenizers"][0].erase("type"); }},
      {"pre_tokenizer", [](J& j) { j["pre_tokenizer"] = J::object(); }},
      {"pre_tokenizer",
       [](J& j) {
         j["pre_tokenizer"]["pretokenizers"][0] = {
             {"type", "Split"}, {"pattern", {{"Regex", 7}}}, {"behavior", "Isolated"}};
       }},
      {"normalizer",
       [](J& j) {
         j["normalizer"] = {{"type", "Sequence"}};
       }},
  };
  for (const auto& [field, mutate] : cases) {
    J j = MakeJson("a+");
    mutate(j);
    auto t = Tokenizer::FromJson(j.dump());
    ASSERT_FALSE(t.ok()) << field << ": " << j.dump().substr(0, 0);
    EXPECT_NE(t.status().message().find(field), absl::string_view::npos)
        << field << ": " << t.status();
  }
}

}  // namespace
TEST(OnigurumaRegexToPcre2, RewritesTheClassesWherePcre2Differs) {
  EXPECT_EQ(*OnigurumaRegexToPcre2(R"(\s+(?!\S)|\s+)"),
            R"(\p{White_Space}+(?!\P{White_Space})|\p{White_Space}+)");
  EXPECT_EQ(*OnigurumaRegexToPcre2(R"([^\s\p{L}]\h\v[\h])"),
            R"([^\p{White_Space}\p{L}][0-9a-fA-F]\x{0B}[0-9a-fA-F])");
  // Escaped backslashes and brackets, literal ']' first in a class, POSIX classes are kept.
  EXPECT_EQ(*OnigurumaRegexToPcre2(R"(\\s[]s][[:alpha:]\s]\[\s)"),
            R"(\\s[]s][[:alpha:]\p{White_Space}]\[\p{White_Space})");
  EXPECT_FALSE(OnigurumaRegexToPcre2(R"([\H])").ok());
}

// Unicode's White_Space property (PropList.txt, unchanged since Unicode 6.3), which Hugging Face's
// Oniguruma uses for \s: a space-split pre-tokenizer must cut at these and only these.
TEST(Tokenizer, WhitespaceIsUnicodesWhiteSpaceProperty) {
  const std::vector<uint32_t> white_space = {0x9,    0xA,    0xB,    0xC,    0xD,    0x20,   0x85,
                                             0xA0,   0x1680, 0x2000, 0x2001, 0x2002, 0x2003, 0x2004,
                                             0x2005, 0x2006, 0x2007, 0x2008, 0x2009, 0x200A, 0x2028,
                                             0x2029, 0x202F, 0x205F, 0x3000};
  // With the split regex \s\S|\S+, X + "ab" is one piece (ending in the merged "ab" = 256) when X
  // is not white space, and "Xa" + "b" (ending in 'b' = 98) when it is.
  auto tok = Make(R"(\s\S|\S+)");
  auto is_space = [&](uint32_t cp) {
    std::string text;
    if (cp < 0x80) {
      text.push_back(static_cast<char>(cp));
    } else if (cp < 0x800) {
      text += {static_cast<char>(0xC0 | (cp >> 6)), static_cast<char>(0x80 | (cp & 0x3F))};
    } else {
      text += {static_cast<char>(0xE0 | (cp >> 12)), static_cast<char>(0x80 | ((cp >> 6) & 0x3F)),
               static_cast<char>(0x80 | (cp & 0x3F))};
    }
    const Ids ids = tok->Encode(text + "ab");
    EXPECT_TRUE(ids.back() == 98 || ids.back() == 256) << std::hex << cp;
    return ids.back() == 98;
  };
  // Every code point where PCRE2's \s, \h or \v disagree with White_Space (PCRE2 10.42: \s and
  // \h hold U+180E; \h lacks the vertical ones, \v the horizontal ones), and a few others.
  for (uint32_t cp : {0x180Eu, 0xFEFFu, 0x200Bu, 0x1Fu, 0x41u}) {
    EXPECT_FALSE(is_space(cp)) << std::hex << cp;
  }
  for (uint32_t cp : white_space) EXPECT_TRUE(is_space(cp)) << std::hex << cp;
}

}  // namespace dmoe
