// A checkpoint's own chat template: tokenizer_config.json's `chat_template` (Jinja), rendered as
// Hugging Face's @huggingface/jinja renders it (gateway/jinja.h), with the checkpoint's bos/eos.
#ifndef DMOE_GATEWAY_CHAT_TEMPLATE_H_
#define DMOE_GATEWAY_CHAT_TEMPLATE_H_

#include <string>

#include "absl/status/statusor.h"
#include "gateway/jinja.h"
#include "nlohmann/json.hpp"

namespace dmoe::gateway {

// Immutable after loading; Render is thread-safe.
class ChatTemplate {
 public:
  // From the text of a tokenizer_config.json. `chat_template` may be a string or a list of
  // {name, template} (the one named "default" is used); `bos_token` / `eos_token` may be strings
  // or AddedToken objects ({content: ...}). Without `chat_template` (or when it is null) the
  // built-in DeepSeek-V2-Chat template is used (is_builtin_default()), with DeepSeek's bos/eos
  // unless the config names its own. INVALID_ARGUMENT naming the field for malformed JSON, a
  // field of the wrong type, or a template that does not parse (the message names the unsupported
  // construct and its line:column).
  static absl::StatusOr<ChatTemplate> FromTokenizerConfig(const std::string& json_text);

  // From a checkpoint directory: `dir/tokenizer_config.json` as above; a `dir/chat_template.jinja`
  // (how newer transformers versions save it) takes precedence over the config's `chat_template`.
  // With neither file: the built-in default. INVALID_ARGUMENT as above (naming the file), NOT_FOUND
  // only when `dir` itself does not exist.
  static absl::StatusOr<ChatTemplate> LoadFromModelDir(const std::string& dir);

  // The built-in DeepSeek-V2-Chat template with DeepSeek's bos/eos.
  static ChatTemplate BuiltinDefault();

  // This template's bos/eos with the Jinja template of file `path` (--chat-template: e.g.
  // deploy/chat_templates/deepseek_v3_tools.jinja, which renders tool definitions).
  // INVALID_ARGUMENT naming the file when it cannot be read or does not parse.
  absl::StatusOr<ChatTemplate> WithTemplateFile(const std::string& path) const;

  // Renders OpenAI-shaped `messages` (an array of {role, content, tool_calls?, tool_call_id?, ...},
  // passed to the template as they are) with `tools` (null or an array of tool definitions),
  // `add_generation_prompt`, `bos_token` and `eos_token`. Member order of the JSON objects is kept
  // (it shows in `| tojson`), so prefer the ordered_json overload when the request was parsed
  // that way. INVALID_ARGUMENT when messages is not an array or tools is neither null nor an
  // array, when either nests deeper than 128 levels, when the template raises an exception
  // (raise_exception(msg): exactly msg) or fails (e.g. `+` on a missing content: "jinja: line L:C:
  // ..."); RESOURCE_EXHAUSTED when rendering exceeds `limits`.
  absl::StatusOr<std::string> Render(const nlohmann::ordered_json& messages,
                                     const nlohmann::ordered_json& tools,
                                     bool add_generation_prompt,
                                     const jinja::Limits& limits = jinja::Limits()) const;
  absl::StatusOr<std::string> Render(const nlohmann::json& messages, const nlohmann::json& tools,
                                     bool add_generation_prompt,
                                     const jinja::Limits& limits = jinja::Limits()) const;

  // The special tokens the template sees ("" when the config has none).
  const std::string& bos_token() const { return bos_; }
  const std::string& eos_token() const { return eos_; }
  // True when no chat template was found and the DeepSeek-V2-Chat one is used (log it once).
  bool is_builtin_default() const { return builtin_; }
  // The Jinja source being rendered.
  const std::string& source() const { return source_; }

 private:
  static absl::StatusOr<ChatTemplate> FromConfig(const nlohmann::ordered_json& config);
  ChatTemplate(jinja::Template t, std::string source, bool builtin)
      : template_(std::move(t)), source_(std::move(source)), builtin_(builtin) {}

  jinja::Template template_;
  std::string source_;
  bool builtin_;
  std::string bos_, eos_;
  bool has_bos_ = false, has_eos_ = false;  // absent tokens stay undefined in the template
};

}  // namespace dmoe::gateway

#endif  // DMOE_GATEWAY_CHAT_TEMPLATE_H_
