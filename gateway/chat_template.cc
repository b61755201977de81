#include "gateway/chat_template.h"

#include <sys/stat.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <optional>
#include <sstream>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/json_nesting.h"
#include "common/status_macros.h"

namespace dmoe::gateway {
namespace {

using OJson = nlohmann::ordered_json;

// DeepSeek-V2-Chat's (and V2-Lite-Chat's) published chat_template, byte for byte.
constexpr char kDeepseekV2ChatTemplate[] =
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}"
    "{% endif %}{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ 'User: ' + message['content'] + '\\n\\n' }}{% elif message['role'] == 'assistant' %}"
    "{{ 'Assistant: ' + message['content'] + eos_token }}{% elif message['role'] == 'system' %}"
    "{{ message['content'] + '\\n\\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "{{ 'Assistant:' }}{% endif %}";
constexpr char kDeepseekBos[] = "<｜begin▁of▁sentence｜>";
constexpr char kDeepseekEos[] = "<｜end▁of▁sentence｜>";

// A special token: a string, an AddedToken object {content: ...}, null or absent.
absl::Status ReadToken(const OJson& config, const char* field, std::string* out, bool* present) {
  const auto it = config.find(field);
  if (it == config.end() || it->is_null()) return absl::OkStatus();
  const OJson* v = &*it;
  if (v->is_object()) {
    const auto content = v->find("content");
    if (content == v->end()) {
      return absl::InvalidArgumentError(absl::StrCat(field, ": an object without \"content\""));
    }
    v = &*content;
  }
  if (!v->is_string()) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, ": expected a string or {\"content\": string}"));
  }
  *out = v->get<std::string>();
  *present = true;
  return absl::OkStatus();
}

// The template text of `chat_template`: a string, or the entry named "default" of a list of
// {name, template}. Empty optional when absent or null.
absl::StatusOr<std::optional<std::string>> ReadTemplate(const OJson& config) {
  const auto it = config.find("chat_template");
  if (it == config.end() || it->is_null()) return std::optional<std::string>();
  if (it->is_string()) return std::optional<std::string>(it->get<std::string>());
  if (!it->is_array()) {
    return absl::InvalidArgumentError("chat_template: expected a string or a list of templates");
  }
  std::string names;
  for (const OJson& entry : *it) {
    const auto name = entry.is_object() ? entry.find("name") : entry.end();
    const auto text = entry.is_object() ? entry.find("template") : entry.end();
    if (name == entry.end() || !name->is_string() || text == entry.end() || !text->is_string()) {
      return absl::InvalidArgumentError(
          "chat_template: list entries must be {\"name\": string, \"template\": string}");
    }
    if (name->get<std::string>() == "default") {
      return std::optional<std::string>(text->get<std::string>());
    }
    absl::StrAppend(&names, names.empty() ? "" : ", ", name->get<std::string>());
  }
  return absl::InvalidArgumentError(
      absl::StrCat("chat_template: no template named \"default\" (found: ", names, ")"));
}

absl::StatusOr<std::optional<std::string>> ReadFileIfExists(const std::string& path) {
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) return std::optional<std::string>();
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::InvalidArgumentError(absl::StrCat("cannot read ", path));
  std::stringstream ss;
  ss << in.rdbuf();
  return std::optional<std::string>(ss.str());
}

// Deeper messages/tools are rejected before they are copied into the template's context.
constexpr int kMaxInputNesting = 128;

template <typename J>
absl::Status CheckInput(const J& messages, const J& tools) {
  if (!messages.is_array()) return absl::InvalidArgumentError("messages: must be an array");
  if (!tools.is_null() && !tools.is_array()) {
    return absl::InvalidArgumentError("tools: must be null or an array");
  }
  if (NestsDeeperThan(messages, kMaxInputNesting) || NestsDeeperThan(tools, kMaxInputNesting)) {
    return absl::InvalidArgumentError(
        absl::StrCat("messages/tools: JSON nested deeper than ", kMaxInputNesting, " levels"));
  }
  return absl::OkStatus();
}

absl::Status Prefixed(const absl::Status& st, const std::string& prefix) {
  return absl::Status(st.code(), absl::StrCat(prefix, ": ", st.message()));
}

}  // namespace

ChatTemplate ChatTemplate::BuiltinDefault() {
  absl::StatusOr<jinja::Template> t = jinja::Template::Parse(kDeepseekV2ChatTemplate);
  if (!t.ok()) {  // a constant of this file: a broken invariant, not a user error
    std::fprintf(stderr, "the built-in chat template does not parse: %s\n",
                 t.status().ToString().c_str());
    std::abort();
  }
  ChatTemplate c(*std::move(t), kDeepseekV2ChatTemplate, /*builtin=*/true);
  c.bos_ = kDeepseekBos;
  c.eos_ = kDeepseekEos;
  c.has_bos_ = c.has_eos_ = true;
  return c;
}

absl::StatusOr<ChatTemplate> ChatTemplate::WithTemplateFile(const std::string& path) const {
  ASSIGN_OR_RETURN(std::optional<std::string> text, ReadFileIfExists(path));
  if (!text) return absl::InvalidArgumentError(absl::StrCat(path, ": no such file"));
  absl::StatusOr<jinja::Template> t = jinja::Template::Parse(*text);
  if (!t.ok()) return Prefixed(t.status(), path);
  ChatTemplate c(*std::move(t), *std::move(text), /*builtin=*/false);
  c.bos_ = bos_;
  c.eos_ = eos_;
  c.has_bos_ = has_bos_;
  c.has_eos_ = has_eos_;
  return c;
}

absl::StatusOr<ChatTemplate> ChatTemplate::FromTokenizerConfig(const std::string& json_text) {
  const OJson config = OJson::parse(json_text, nullptr, /*allow_exceptions=*/false);
  if (config.is_discarded() || !config.is_object()) {
    return absl::InvalidArgumentError("tokenizer_config.json: not a JSON object");
  }
  return FromConfig(config);
}

absl::StatusOr<ChatTemplate> ChatTemplate::FromConfig(const nlohmann::ordered_json& config) {
  std::string bos, eos;
  bool has_bos = false, has_eos = false;
  RETURN_IF_ERROR(ReadToken(config, "bos_token", &bos, &has_bos));
  RETURN_IF_ERROR(ReadToken(config, "eos_token", &eos, &has_eos));
  ASSIGN_OR_RETURN(std::optional<std::string> source, ReadTemplate(config));
  if (!source) {
    ChatTemplate c = BuiltinDefault();
    if (has_bos) c.bos_ = bos;
    if (has_eos) c.eos_ = eos;
    return c;
  }
  absl::StatusOr<jinja::Template> t = jinja::Template::Parse(*source);
  if (!t.ok()) return Prefixed(t.status(), "chat_template");
  ChatTemplate c(*std::move(t), *std::move(source), /*builtin=*/false);
  c.bos_ = std::move(bos);
  c.eos_ = std::move(eos);
  c.has_bos_ = has_bos;
  c.has_eos_ = has_eos;
  return c;
}

absl::StatusOr<ChatTemplate> ChatTemplate::LoadFromModelDir(const std::string& dir) {
  struct stat st;
  if (::stat(dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) {
    return absl::NotFoundError(absl::StrCat(dir, ": no such directory"));
  }
  const std::string config_path = dir + "/tokenizer_config.json";
  const std::string jinja_path = dir + "/chat_template.jinja";
  ASSIGN_OR_RETURN(std::optional<std::string> config_text, ReadFileIfExists(config_path));
  ASSIGN_OR_RETURN(std::optional<std::string> jinja_text, ReadFileIfExists(jinja_path));
  OJson config = OJson::object();
  if (config_text) {
    config = OJson::parse(*config_text, nullptr, /*allow_exceptions=*/false);
    if (config.is_discarded() || !config.is_object()) {
      return absl::InvalidArgumentError(absl::StrCat(config_path, ": not a JSON object"));
    }
  }
  if (jinja_text) config["chat_template"] = *jinja_text;
  absl::StatusOr<ChatTemplate> c = FromConfig(config);
  if (!c.ok()) return Prefixed(c.status(), jinja_text ? jinja_path : config_path);
  return c;
}

absl::StatusOr<std::string> ChatTemplate::Render(const nlohmann::ordered_json& messages,
                                                 const nlohmann::ordered_json& tools,
                                                 bool add_generation_prompt,
                                                 const jinja::Limits& limits) const {
  RETURN_IF_ERROR(CheckInput(messages, tools));
  OJson context = OJson::object();
  context["messages"] = messages;
  context["tools"] = tools;  // null like transformers' tools=None: defined, `is none`
  if (has_bos_) context["bos_token"] = bos_;
  if (has_eos_) context["eos_token"] = eos_;
  context["add_generation_prompt"] = add_generation_prompt;
  return template_.Render(context, limits);
}

absl::StatusOr<std::string> ChatTemplate::Render(const nlohmann::json& messages,
                                                 const nlohmann::json& tools,
                                                 bool add_generation_prompt,
                                                 const jinja::Limits& limits) const {
  RETURN_IF_ERROR(CheckInput(messages, tools));
  return Render(nlohmann::ordered_json(messages), nlohmann::ordered_json(tools),
                add_generation_prompt, limits);
}

}  // namespace dmoe::gateway
