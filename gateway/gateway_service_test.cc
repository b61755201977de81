#include "gateway/gateway_service.h"

#include <string>

#include "gtest/gtest.h"

namespace dmoe::gateway {
namespace {

v1::ChatRequest WithToolResult(const std::string& result) {
  v1::ChatRequest r;
  auto* u = r.add_messages();
  u->set_role("user");
  u->set_content("What is 6 x 7?");
  auto* a = r.add_messages();
  a->set_role("assistant");
  a->set_content("Let me compute it.");
  auto* t = r.add_messages();
  t->set_role("tool");
  t->set_tool_call_id("call_1");
  t->set_content(result);
  return r;
}

// DeepSeek-V2-Chat's template (the built-in one) renders no tool messages: a tool result would
// never reach the model, which would answer as if the tool had not run. Such a request is refused,
// naming the message; a template that renders tool messages takes the same request.
TEST(RenderChat, ToolResultsATemplateDropsAreRefused) {
  NodePool pool({});
  ApiKeys keys;
  GatewayService builtin(&pool, &keys, GatewayOptions());  // no template: the built-in one
  absl::StatusOr<std::string> text = builtin.RenderChat(WithToolResult("42"));
  EXPECT_EQ(text.status().code(), absl::StatusCode::kInvalidArgument) << text.status();
  EXPECT_NE(text.status().message().find("messages[2].role: \"tool\""), absl::string_view::npos)
      << text.status();
  // Without the tool message the same conversation renders.
  v1::ChatRequest plain = WithToolResult("42");
  plain.mutable_messages()->RemoveLast();
  EXPECT_TRUE(builtin.RenderChat(plain).ok());

  absl::StatusOr<ChatTemplate> t = ChatTemplate::FromTokenizerConfig(
      R"({"chat_template": "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"})");
  ASSERT_TRUE(t.ok()) << t.status();
  GatewayOptions o;
  o.chat_template = &*t;
  GatewayService rendering(&pool, &keys, o);
  text = rendering.RenderChat(WithToolResult("42"));
  ASSERT_TRUE(text.ok()) << text.status();
  EXPECT_EQ(*text, "user: What is 6 x 7?\nassistant: Let me compute it.\ntool: 42\n");
}

}  // namespace
}  // namespace dmoe::gateway
