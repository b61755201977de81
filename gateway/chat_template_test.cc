#include "gateway/chat_template.h"

#include <stdlib.h>
#include <unistd.h>

#include <fstream>
#include <string>

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace dmoe::gateway {
namespace {

using OJson = nlohmann::ordered_json;

constexpr char kBos[] = "<｜begin▁of▁sentence｜>";
constexpr char kEos[] = "<｜end▁of▁sentence｜>";

// DeepSeek-V2-Chat's published template, with AddedToken-shaped special tokens.
std::string V2Config() {
  OJson c;
  c["bos_token"] = {{"__type", "AddedToken"}, {"content", kBos}};
  c["eos_token"] = {{"__type", "AddedToken"}, {"content", kEos}};
  c["chat_template"] =
      "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}"
      "{% endif %}{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
      "{{ 'User: ' + message['content'] + '\\n\\n' }}{% elif message['role'] == 'assistant' %}"
      "{{ 'Assistant: ' + message['content'] + eos_token }}{% elif message['role'] == 'system' %}"
      "{{ message['content'] + '\\n\\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}"
      "{{ 'Assistant:' }}{% endif %}";
  return c.dump();
}

OJson Conversation() {
  return OJson::parse(R"([{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": "Hello!"},
                          {"role": "user", "content": "你好"}])");
}

// Written out from the template by hand.
const std::string kV2Rendered = std::string(kBos) + "Be brief.\n\nUser: Hi\n\nAssistant: Hello!" +
                                kEos + "User: 你好\n\nAssistant:";

std::string TempDir() {
  const char* base = getenv("TEST_TMPDIR");
  std::string tmpl = std::string(base ? base : "/tmp") + "/chat_template_XXXXXX";
  EXPECT_NE(mkdtemp(tmpl.data()), nullptr);
  return tmpl;
}

void WriteFile(const std::string& path, const std::string& text) {
  std::ofstream(path, std::ios::binary) << text;
}

TEST(ChatTemplate, RendersTheCheckpointTemplateWithAddedTokenSpecialTokens) {
  absl::StatusOr<ChatTemplate> t = ChatTemplate::FromTokenizerConfig(V2Config());
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_FALSE(t->is_builtin_default());
  EXPECT_EQ(t->bos_token(), kBos);
  EXPECT_EQ(t->eos_token(), kEos);
  absl::StatusOr<std::string> text = t->Render(Conversation(), nullptr, true);
  ASSERT_TRUE(text.ok()) << text.status();
  EXPECT_EQ(*text, kV2Rendered);
  text = t->Render(Conversation(), nullptr, false);
  ASSERT_TRUE(text.ok()) << text.status();
  EXPECT_EQ(*text, kV2Rendered.substr(0, kV2Rendered.size() - std::string("Assistant:").size()));
}

TEST(ChatTemplate, WithoutAChatTemplateUsesTheBuiltinDeepseekV2Default) {
  absl::StatusOr<ChatTemplate> t = ChatTemplate::FromTokenizerConfig(R"({"model_max_length": 9})");
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_TRUE(t->is_builtin_default());
  EXPECT_EQ(t->bos_token(), kBos);
  absl::StatusOr<std::string> text = t->Render(Conversation(), nullptr, true);
  ASSERT_TRUE(text.ok()) << text.status();
  EXPECT_EQ(*text, kV2Rendered);
  EXPECT_EQ(ChatTemplate::BuiltinDefault().source(), t->source());
}

TEST(ChatTemplate, PlainStringTokensAndTheDefaultOfATemplateList) {
  const std::string config = R"({
    "bos_token": "<s>", "eos_token": "</s>",
    "chat_template": [
      {"name": "tool_use", "template": "TOOLS"},
      {"name": "default", "template": "{{ bos_token }}{% for m in messages %}[{{ m.role }}]{{ m.content }}{{ eos_token }}{% endfor %}"}
    ]})";
  absl::StatusOr<ChatTemplate> t = ChatTemplate::FromTokenizerConfig(config);
  ASSERT_TRUE(t.ok()) << t.status();
  absl::StatusOr<std::string> text = t->Render(
      OJson::parse(R"([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}])"),
      nullptr, false);
  ASSERT_TRUE(text.ok()) << text.status();
  EXPECT_EQ(*text, "<s>[user]q</s>[assistant]a</s>");
}

TEST(ChatTemplate, ConfigErrorsNameTheField) {
  absl::StatusOr<ChatTemplate> t = ChatTemplate::FromTokenizerConfig("not json");
  EXPECT_EQ(t.status().code(), absl::StatusCode::kInvalidArgument);
  t = ChatTemplate::FromTokenizerConfig(R"({"chat_template": [{"name": "rag", "template": "x"}]})");
  EXPECT_EQ(t.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(t.status().message().find("default"), absl::string_view::npos) << t.status();
  t = ChatTemplate::FromTokenizerConfig(R"({"chat_template": "x", "bos_token": 5})");
  EXPECT_NE(t.status().message().find("bos_token"), absl::string_view::npos) << t.status();
  t = ChatTemplate::FromTokenizerConfig(
      R"({"chat_template": "{% if x %}\n{% include 'a' %}{% endif %}"})");
  EXPECT_EQ(t.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(t.status().message(), "chat_template: jinja: line 2:4: unsupported tag 'include'");
}

TEST(ChatTemplate, TemplateExceptionsAreInvalidArgument) {
  const std::string config =
      R"({"chat_template": "{% for m in messages %}{% if m.role not in ['user', 'assistant'] %}{{ raise_exception('Conversation roles must be user or assistant') }}{% endif %}{{ m.content }}{% endfor %}"})";
  absl::StatusOr<ChatTemplate> t = ChatTemplate::FromTokenizerConfig(config);
  ASSERT_TRUE(t.ok()) << t.status();
  absl::StatusOr<std::string> text =
      t->Render(OJson::parse(R"([{"role": "tool", "content": "x"}])"), nullptr, true);
  EXPECT_EQ(text.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(text.status().message(), "Conversation roles must be user or assistant");
  // A message without content where the template concatenates it.
  absl::StatusOr<ChatTemplate> v2 = ChatTemplate::FromTokenizerConfig(V2Config());
  ASSERT_TRUE(v2.ok());
  text = v2->Render(OJson::parse(R"([{"role": "user"}])"), nullptr, true);
  EXPECT_EQ(text.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(v2->Render(OJson::object(), nullptr, true).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(v2->Render(Conversation(), OJson::object(), true).status().code(),
            absl::StatusCode::kInvalidArgument);
  // Absurdly nested input is refused before it is copied (no stack overflow).
  OJson deep = "x";
  for (int i = 0; i < 100000; ++i) deep = OJson::array({std::move(deep)});
  OJson messages = OJson::array({{{"role", "user"}, {"content", std::move(deep)}}});
  EXPECT_EQ(v2->Render(messages, nullptr, true).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(ChatTemplate, ToolsReachTheTemplateWithTheirMemberOrder) {
  const std::string config =
      R"({"chat_template": "{% if tools is not none %}{{ tools|tojson }}{% else %}no tools{% endif %}"})";
  absl::StatusOr<ChatTemplate> t = ChatTemplate::FromTokenizerConfig(config);
  ASSERT_TRUE(t.ok()) << t.status();
  const OJson tools = OJson::parse(
      R"([{"type": "function", "function": {"name": "f", "parameters": {"z": 1, "a": 2}}}])");
  absl::StatusOr<std::string> text = t->Render(OJson::array(), tools, false);
  ASSERT_TRUE(text.ok()) << text.status();
  EXPECT_EQ(*text,
            "[{\"type\": \"function\", \"function\": {\"name\": \"f\", \"parameters\": "
            "{\"z\": 1, \"a\": 2}}}]");
  text = t->Render(OJson::array(), nullptr, false);
  ASSERT_TRUE(text.ok()) << text.status();
  EXPECT_EQ(*text, "no tools");
  // The nlohmann::json overload (std::map: members come out sorted).
  text = t->Render(nlohmann::json::array(), nlohmann::json::parse(tools.dump()), false);
  ASSERT_TRUE(text.ok()) << text.status();
  EXPECT_EQ(*text,
            "[{\"function\": {\"name\": \"f\", \"parameters\": {\"a\": 2, \"z\": 1}}, "
            "\"type\": \"function\"}]");
}

TEST(ChatTemplate, LoadFromModelDir) {
  const std::string dir = TempDir();
  absl::StatusOr<ChatTemplate> t = ChatTemplate::LoadFromModelDir(dir);  // no files at all
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_TRUE(t->is_builtin_default());

  WriteFile(dir + "/tokenizer_config.json", V2Config());
  t = ChatTemplate::LoadFromModelDir(dir);
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_FALSE(t->is_builtin_default());
  absl::StatusOr<std::string> text = t->Render(Conversation(), nullptr, true);
  ASSERT_TRUE(text.ok()) << text.status();
  EXPECT_EQ(*text, kV2Rendered);

  WriteFile(dir + "/chat_template.jinja", "{{ bos_token }}{{ messages|length }}\n");
  t = ChatTemplate::LoadFromModelDir(dir);
  ASSERT_TRUE(t.ok()) << t.status();
  text = t->Render(Conversation(), nullptr, true);
  ASSERT_TRUE(text.ok()) << text.status();
  EXPECT_EQ(*text, std::string(kBos) + "4");

  WriteFile(dir + "/chat_template.jinja", "{% extends 'base' %}");
  t = ChatTemplate::LoadFromModelDir(dir);
  EXPECT_EQ(t.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(t.status().message().find("chat_template.jinja"), absl::string_view::npos);
  EXPECT_NE(t.status().message().find("unsupported tag 'extends'"), absl::string_view::npos);

  EXPECT_EQ(ChatTemplate::LoadFromModelDir(dir + "/missing").status().code(),
            absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace dmoe::gateway
