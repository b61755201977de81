#include "gateway/gateway_service.h"

#include <string>
#include <utility>
#include <vector>

#include "gateway/text_stream.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

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

constexpr char kToolsTemplate[] = "deploy/chat_templates/deepseek_v3_tools.jinja";

v1::ChatRequest WithTools() {
  v1::ChatRequest r;
  auto* u = r.add_messages();
  u->set_role("user");
  u->set_content("Weather in Paris and Rome?");
  r.set_tools_json(
      R"([{"type":"function","function":{"name":"get_weather","description":"Current weather",)"
      R"("parameters":{"type":"object","properties":{"city":{"type":"string"}}}}}])");
  return r;
}

// Tools a template does not render are refused (the model would be asked to call functions it
// was never shown), naming the template file that renders them; ours does, with the format.
TEST(RenderChat, ToolsATemplateDropsAreRefused) {
  NodePool pool({});
  ApiKeys keys;
  absl::StatusOr<ChatTemplate> v2 = ChatTemplate::FromTokenizerConfig("{}");  // the built-in
  ASSERT_TRUE(v2.ok());
  GatewayOptions o;
  o.chat_template = &*v2;
  GatewayService builtin(&pool, &keys, o);
  absl::StatusOr<std::string> text = builtin.RenderChat(WithTools());
  EXPECT_EQ(text.status().code(), absl::StatusCode::kInvalidArgument) << text.status();
  EXPECT_EQ(text.status().message().rfind("tools: not rendered", 0), 0u) << text.status();
  EXPECT_NE(text.status().message().find(kToolsTemplate), std::string::npos) << text.status();

  absl::StatusOr<ChatTemplate> tools = v2->WithTemplateFile(kToolsTemplate);
  ASSERT_TRUE(tools.ok()) << tools.status();
  o.chat_template = &*tools;
  GatewayService rendering(&pool, &keys, o);
  text = rendering.RenderChat(WithTools());
  ASSERT_TRUE(text.ok()) << text.status();
  EXPECT_NE(text->find("### get_weather\nDescription: Current weather\nParameters: "
                       R"({"type": "object", "properties": {"city": {"type": "string"}}})"),
            std::string::npos)
      << *text;
  const std::string end = "<｜User｜>Weather in Paris and Rome?<｜Assistant｜>";
  ASSERT_GT(text->size(), end.size());
  EXPECT_EQ(text->substr(text->size() - end.size()), end) << *text;
  EXPECT_EQ(v2->WithTemplateFile("no/such.jinja").status().code(),
            absl::StatusCode::kInvalidArgument);
}

// A past turn's tool calls (content empty, as clients send null) are rendered by our template in
// the format the tool-call parser reads: parsing the rendered turn gives the calls back.
TEST(RenderChat, PastToolCallsRoundTripThroughTheParser) {
  absl::StatusOr<ChatTemplate> tools =
      ChatTemplate::BuiltinDefault().WithTemplateFile(kToolsTemplate);
  ASSERT_TRUE(tools.ok()) << tools.status();
  NodePool pool({});
  ApiKeys keys;
  GatewayOptions o;
  o.chat_template = &*tools;
  GatewayService service(&pool, &keys, o);
  v1::ChatRequest r = WithTools();
  auto* a = r.add_messages();
  a->set_role("assistant");
  const std::vector<std::pair<std::string, std::string>> calls = {
      {"get_weather", R"({"city": "Paris"})"}, {"get_weather", "{\n  \"city\": \"Rome\"\n}"}};
  for (size_t i = 0; i < calls.size(); ++i) {
    v1::ToolCall* c = a->add_tool_calls();
    c->set_id("call_" + std::to_string(i));
    c->set_function_name(calls[i].first);
    c->set_function_arguments(calls[i].second);
  }
  for (const char* result : {"18C", "21C"}) {
    auto* t = r.add_messages();
    t->set_role("tool");
    t->set_content(result);
  }
  absl::StatusOr<std::string> text = service.RenderChat(r);
  ASSERT_TRUE(text.ok()) << text.status();
  const std::string turn_start = "<｜Assistant｜>";
  const size_t from = text->find(turn_start) + turn_start.size();
  const size_t to = text->find("<｜end▁of▁sentence｜>", from);
  ASSERT_NE(to, std::string::npos) << *text;
  ToolCallParser p;
  ToolCallParser::Parts parts = p.Add(text->substr(from, to - from));
  ToolCallParser::Parts rest = p.Flush();
  EXPECT_EQ(parts.content + rest.content, "");
  std::vector<std::pair<std::string, std::string>> got;
  for (const auto& d : parts.calls) {
    if (d.started) got.emplace_back(d.name, "");
    got.back().second += d.arguments;
  }
  EXPECT_TRUE(rest.calls.empty());
  EXPECT_EQ(got, calls) << *text;
  EXPECT_NE(text->find("<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>18C<｜tool▁output▁end｜>\n"
                       "<｜tool▁output▁begin｜>21C<｜tool▁output▁end｜><｜tool▁outputs▁end｜>"),
            std::string::npos)
      << *text;
}

}  // namespace
}  // namespace dmoe::gateway
