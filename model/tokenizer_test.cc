#include "model/tokenizer.h"

#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace dmoe {
namespace {

// GPT-2's byte -> character table, written out here independently of the tokenizer.
std::string ByteChar(int b) {
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

// Byte b has id b; then "ab" = 256, "abc" = 257, "bc" = 258, "aa" = 259; "<s>" = 300 (special).
std::unique_ptr<Tokenizer> Make(const std::string& split_regex = "") {
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
  auto t = Tokenizer::FromJson(j.dump());
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

TEST(Tokenizer, UnsupportedFilesAreClearErrors) {
  EXPECT_FALSE(Tokenizer::FromJson("{").ok());
  auto wp = Tokenizer::FromJson(R"({"model": {"type": "WordPiece", "vocab": {}}})");
  ASSERT_FALSE(wp.ok());
  EXPECT_NE(wp.status().message().find("only BPE"), absl::string_view::npos);
  EXPECT_FALSE(Tokenizer::FromFile("/nonexistent/tokenizer.json").ok());
}

}  // namespace
}  // namespace dmoe
