// StopStrings against a direct computation: for random texts (ASCII and multi-byte characters),
// random splits into deltas and random stop sets, the streamed output is exactly the text before
// the earliest stop occurrence in the text received up to the first delta after which any stop
// string occurs (generation ends there, so later text never comes: with stops "aé " and "é", deltas
// "ca" + "é" end at "ca", deltas "caé " at "c"); no chunk splits a character; nothing is held back
// longer than a stop string could need.
#include "gateway/text_stream.h"

#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace dmoe::gateway {
namespace {

bool ValidUtf8(const std::string& s) {
  size_t i = 0;
  while (i < s.size()) {
    const uint8_t c = static_cast<uint8_t>(s[i]);
    const size_t n = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
    if (n == 0 || i + n > s.size()) return false;
    for (size_t k = 1; k < n; ++k) {
      if ((static_cast<uint8_t>(s[i + k]) & 0xc0) != 0x80) return false;
    }
    i += n;
  }
  return true;
}

TEST(StopStrings, StreamedTextIsTheTextBeforeTheFirstStop) {
  const std::vector<std::string> alphabet = {"a", "b", "c", " ", "\n", "é", "你", "🚀"};
  std::mt19937 rng(11);
  auto pick = [&](size_t n) { return std::uniform_int_distribution<size_t>(0, n - 1)(rng); };
  int stopped_cases = 0;
  for (int iter = 0; iter < 5000; ++iter) {
    std::vector<std::string> chars;
    const size_t len = 1 + pick(40);
    for (size_t i = 0; i < len; ++i) chars.push_back(alphabet[pick(alphabet.size())]);
    std::string text;
    for (const auto& c : chars) text += c;
    std::vector<std::string> stops;
    const size_t nstops = pick(3);
    for (size_t s = 0; s < nstops; ++s) {
      std::string stop;
      if (pick(2) == 0 && len > 1) {  // a piece of the text, so that it occurs
        const size_t a = pick(len), b = a + 1 + pick(std::min<size_t>(4, len - a));
        for (size_t i = a; i < b && i < len; ++i) stop += chars[i];
      } else {
        for (size_t i = 0, n = 1 + pick(3); i < n; ++i) stop += alphabet[pick(alphabet.size())];
      }
      stops.push_back(stop);
    }
    size_t max_len = 0;
    for (const auto& s : stops) max_len = std::max(max_len, s.size());
    // Random whole-character deltas, and the expected output computed directly from them.
    std::vector<std::string> deltas;
    for (size_t i = 0; i < len;) {
      std::string delta;
      for (size_t n = pick(4); n > 0 && i < len; --n) delta += chars[i++];
      deltas.push_back(delta);
    }
    size_t cut = std::string::npos;
    std::string want;
    for (const std::string& d : deltas) {
      want += d;
      for (const auto& s : stops) {
        if (!s.empty()) cut = std::min(cut, want.find(s));
      }
      if (cut != std::string::npos) break;
    }
    if (cut != std::string::npos) want.resize(cut);
    StopStrings ss(stops);
    std::string got, fed;
    for (const std::string& delta : deltas) {
      if (ss.stopped()) break;
      fed += delta;
      const std::string out = ss.Add(delta);
      ASSERT_TRUE(ValidUtf8(out)) << "iteration " << iter;
      got += out;
      if (!ss.stopped()) {
        // Held back: at most what could still become a stop string, rounded to a character.
        ASSERT_LE(fed.size() - got.size(), max_len == 0 ? 0 : max_len - 1 + 3) << iter;
      }
    }
    const std::string rest = ss.Flush();
    ASSERT_TRUE(ValidUtf8(rest));
    got += rest;
    std::string all_stops;
    for (const auto& s : stops) all_stops += "[" + s + "]";
    ASSERT_EQ(got, want) << "iteration " << iter << " text \"" << text << "\" stops " << all_stops;
    ASSERT_EQ(ss.stopped(), cut != std::string::npos) << iter;
    stopped_cases += ss.stopped();
  }
  EXPECT_GT(stopped_cases, 1000);  // both outcomes were exercised
}

TEST(StopStrings, EmptyStopStringsAreIgnored) {
  StopStrings ss({"", ""});
  EXPECT_EQ(ss.Add("abc"), "abc");
  EXPECT_FALSE(ss.stopped());
  EXPECT_EQ(ss.Flush(), "");
}

// `text` whole, in every two-piece cut, and one byte at a time.
std::vector<std::vector<std::string>> Feeds(const std::string& text) {
  std::vector<std::vector<std::string>> feeds = {{text}};
  for (size_t cut = 0; cut <= text.size(); ++cut) {
    feeds.push_back({text.substr(0, cut), text.substr(cut)});
  }
  std::vector<std::string> bytes;
  for (char ch : text) bytes.emplace_back(1, ch);
  feeds.push_back(bytes);
  return feeds;
}

// DeepSeek-R1's split, fed whole and in every two-piece and one-byte-at-a-time cut: the same
// reasoning and content, computed independently here by finding the tags.
TEST(ReasoningSplitter, SplitsAtTheClosingTagHoweverTheTextArrives) {
  struct Case {
    std::string text, reasoning, content;
  };
  const Case cases[] = {
      {"<think>\nplan it</think>\n\nThe answer.", "\nplan it", "\n\nThe answer."},
      {"plan it</think>answer", "plan it", "answer"},  // the template opened the thinking
      {"  \n<think>x</think>y", "x", "y"},
      {"no closing tag at all", "no closing tag at all", ""},  // all reasoning, as vLLM's
      {"ends inside a tag </thi", "ends inside a tag </thi", ""},
      {"<thinking is not the tag</think>a", "<thinking is not the tag", "a"},
      {"</think></think>", "", "</think>"},
      {"<think>", "", ""},
      {"", "", ""},
  };
  for (const Case& c : cases) {
    for (const auto& feed : Feeds(c.text)) {
      ReasoningSplitter rs;
      std::string reasoning, content;
      for (const std::string& piece : feed) {
        ReasoningSplitter::Parts p = rs.Add(piece);
        reasoning += p.reasoning;
        content += p.content;
      }
      ReasoningSplitter::Parts p = rs.Flush();
      reasoning += p.reasoning;
      content += p.content;
      ASSERT_EQ(reasoning, c.reasoning) << "\"" << c.text << "\" in " << feed.size() << " pieces";
      ASSERT_EQ(content, c.content) << "\"" << c.text << "\" in " << feed.size() << " pieces";
    }
  }
}

// DeepSeek-V3's tool-call markup, spelled out here (not taken from the parser).
constexpr char kBegin[] = "<｜tool▁calls▁begin｜>";
constexpr char kEnd[] = "<｜tool▁calls▁end｜>";
std::string Call(const std::string& name, const std::string& args) {
  return "<｜tool▁call▁begin｜>function<｜tool▁sep｜>" + name + "\n```json\n" + args +
         "\n```<｜tool▁call▁end｜>";
}

struct ParsedCalls {
  std::string content;
  std::vector<std::pair<std::string, std::string>> calls;  // name, arguments
};

// Feeds `pieces` and joins what comes out as a client joins streamed deltas, checking the order
// the stream promises: a call starts (with its name) before any of its arguments, and calls
// start in index order.
ParsedCalls Feed(const std::vector<std::string>& pieces) {
  ToolCallParser p;
  ParsedCalls out;
  auto take = [&](ToolCallParser::Parts parts) {
    out.content += parts.content;
    for (const ToolCallParser::CallDelta& d : parts.calls) {
      if (d.started) {
        EXPECT_EQ(d.index, static_cast<int>(out.calls.size()));
        out.calls.emplace_back(d.name, "");
      }
      EXPECT_LT(d.index, static_cast<int>(out.calls.size())) << "arguments before the call";
      if (d.index < static_cast<int>(out.calls.size())) out.calls[d.index].second += d.arguments;
    }
  };
  for (const std::string& piece : pieces) take(p.Add(piece));
  take(p.Flush());
  EXPECT_EQ(p.calls(), static_cast<int>(out.calls.size()));
  return out;
}

// The calls and the text around them, whole and in every two-piece and byte-by-byte cut; the
// expected values are written out by hand.
TEST(ToolCallParser, ReadsDeepSeekV3CallsHoweverTheTextArrives) {
  struct Case {
    std::string text;
    ParsedCalls want;
  };
  const std::string nested = "{\n  \"q\": \"a `b` c\",\n  \"n\": [1, 2]\n}";
  const Case cases[] = {
      {"Let me check." + std::string(kBegin) + Call("get_weather", R"({"city": "Paris"})") + kEnd,
       {"Let me check.", {{"get_weather", R"({"city": "Paris"})"}}}},
      {std::string(kBegin) + Call("a", "{}") + "\n" + Call("计算", nested) + kEnd,
       {"", {{"a", "{}"}, {"计算", nested}}}},
      {"no calls, just < and ``` and <｜tool", {"no calls, just < and ``` and <｜tool", {}}},
      // Broken markup comes back as text, from where it broke.
      {"x" + std::string(kBegin) + "oops", {"x" + std::string(kBegin) + "oops", {}}},
      {std::string(kBegin) + "<｜tool▁call▁begin｜>function<｜tool▁sep｜>f\nnot a fence",
       {std::string(kBegin) + "<｜tool▁call▁begin｜>function<｜tool▁sep｜>f\nnot a fence", {}}},
      {std::string(kBegin) + Call("f", "{}") + "junk", {"junk", {{"f", "{}"}}}},
      // Cut short by max_tokens: the arguments so far; a call without its name yet is text.
      {std::string(kBegin) + "<｜tool▁call▁begin｜>function<｜tool▁sep｜>f\n```json\n{\"a\": 1",
       {"", {{"f", "{\"a\": 1"}}}},
      // Cut inside the closing fence or end marker: those are not arguments.
      {std::string(kBegin) + "<｜tool▁call▁begin｜>function<｜tool▁sep｜>f\n```json\n{}\n``",
       {"", {{"f", "{}"}}}},
      {std::string(kBegin) +
           "<｜tool▁call▁begin｜>function<｜tool▁sep｜> f \n```json\n{}\n```<｜tool▁ca",
       {"", {{"f", "{}"}}}},
      {std::string(kBegin) + "<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_wea",
       {std::string(kBegin) + "<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_wea", {}}},
      // Text after the calls' end is kept; blanks around the calls are not.
      {std::string(kBegin) + "\n" + Call("f", "{\"a\":2}") + " \n" + kEnd + "after",
       {"after", {{"f", "{\"a\":2}"}}}},
      {"", {"", {}}},
  };
  for (const Case& c : cases) {
    for (const auto& feed : Feeds(c.text)) {
      const ParsedCalls got = Feed(feed);
      ASSERT_EQ(got.content, c.want.content) << "\"" << c.text << "\" in " << feed.size();
      ASSERT_EQ(got.calls, c.want.calls) << "\"" << c.text << "\" in " << feed.size();
    }
  }
}

// Streamed arguments come out as they arrive, not all at the call's end: only what could be the
// closing fence is held back.
TEST(ToolCallParser, StreamsArgumentsAsTheyArrive) {
  ToolCallParser p;
  ToolCallParser::Parts a = p.Add(std::string(kBegin) + "<｜tool▁call▁begin｜>function");
  EXPECT_TRUE(a.calls.empty());
  ToolCallParser::Parts b = p.Add("<｜tool▁sep｜>f\n```json\n{\"city\": ");
  ASSERT_EQ(b.calls.size(), 1u);
  EXPECT_TRUE(b.calls[0].started);
  EXPECT_EQ(b.calls[0].name, "f");
  EXPECT_EQ(b.calls[0].arguments, "{\"city\":");  // the blank could precede the fence
  ToolCallParser::Parts c = p.Add("\"Paris\"}\n``");
  ASSERT_EQ(c.calls.size(), 1u);
  EXPECT_FALSE(c.calls[0].started);
  EXPECT_EQ(c.calls[0].arguments, " \"Paris\"}");
  ToolCallParser::Parts d = p.Add("`<｜tool▁call▁end｜>");
  EXPECT_TRUE(d.calls.empty());
  EXPECT_TRUE(d.content.empty());
}

}  // namespace
}  // namespace dmoe::gateway
