// openai::ParseRequest on hostile bodies: no input may crash the gateway.
#include "gateway/openai.h"

#include <string>

#include "gtest/gtest.h"

namespace dmoe::gateway::openai {
namespace {

std::string Nested(int depth) { return std::string(depth, '[') + std::string(depth, ']'); }

// nlohmann parses any depth without recursion, but copying or printing a value recurses: a body
// nested a million levels deep (2 MB, under the 8 MiB body limit) overflowed the HTTP thread's
// stack (SIGSEGV) where a message's content was copied or the tools printed.
TEST(ParseRequest, DeeplyNestedBodiesAreRefusedNotCrashed) {
  const std::string deep = Nested(1000000);
  const std::string bodies[] = {
      R"({"messages":[{"role":"user","content":)" + deep + "}]}",
      R"({"messages":[{"role":"user","content":"hi"}],"tools":)" + deep + "}",
      R"({"messages":[{"role":"user","content":"hi"}],"extra":)" + deep + "}",
  };
  for (const std::string& body : bodies) {
    auto r = ParseRequest(Endpoint::kChat, body);
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << r.status();
    EXPECT_NE(r.status().message().find("nested deeper than"), std::string::npos) << r.status();
  }
  auto prompt = ParseRequest(Endpoint::kCompletions, R"({"prompt":)" + deep + "}");
  ASSERT_FALSE(prompt.ok());
  EXPECT_NE(prompt.status().message().find("nested deeper than"), std::string::npos)
      << prompt.status();
}

// Nesting up to the limit is parsed as before: tools 100 levels deep pass through.
TEST(ParseRequest, NestingUpToTheLimitIsKept) {
  const std::string tools = "[" + Nested(100) + "]";
  auto r = ParseRequest(Endpoint::kChat,
                        R"({"messages":[{"role":"user","content":"hi"}],"tools":)" + tools + "}");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->chat.tools_json(), tools);
}

}  // namespace
}  // namespace dmoe::gateway::openai
