#include "gateway/openai.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "absl/strings/str_cat.h"
#include "common/json_nesting.h"
#include "common/status_macros.h"

namespace dmoe::gateway::openai {

using json = nlohmann::json;

std::string Dump(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }

std::string ApiError::Json() const {
  json e = {{"message", message},
            {"type", type},
            {"param", param.empty() ? json(nullptr) : json(param)},
            {"code", code.empty() ? json(nullptr) : json(code)}};
  return Dump(json{{"error", std::move(e)}});
}

ApiError ErrorFromStatus(const absl::Status& status) {
  ApiError e;
  e.message = std::string(status.message());
  const size_t colon = e.message.find(": ");
  const std::string field = colon == std::string::npos ? "" : e.message.substr(0, colon);
  // A field name has no spaces ("messages[2].role", "max_tokens").
  const bool names_field = !field.empty() && field.find(' ') == std::string::npos;
  switch (status.code()) {
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kFailedPrecondition:
      e.http_status = 400;
      if (names_field) e.param = field;
      break;
    case absl::StatusCode::kOutOfRange:  // the prompt and max_tokens do not fit the context
      e = {400, e.message, "invalid_request_error", names_field ? field : "",
           "context_length_exceeded"};
      break;
    case absl::StatusCode::kUnauthenticated:
      e = {401, e.message, "authentication_error", "", "invalid_api_key"};
      break;
    case absl::StatusCode::kPermissionDenied:
      e = {403, e.message, "permission_error", "", ""};
      break;
    case absl::StatusCode::kNotFound:
      e = {404, e.message, "invalid_request_error", names_field ? field : "", "model_not_found"};
      break;
    case absl::StatusCode::kResourceExhausted:
      e = {429, e.message, "rate_limit_error", "", "rate_limit_exceeded"};
      break;
    case absl::StatusCode::kUnavailable:
      e = {503, e.message, "service_unavailable", "", ""};
      break;
    case absl::StatusCode::kDeadlineExceeded:
      e = {504, e.message, "timeout", "", ""};
      break;
    default:
      e = {500, e.message, "server_error", "", ""};
  }
  return e;
}

namespace {

absl::Status Bad(const std::string& field, const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat(field, ": ", what));
}

// Typed access to the optional fields of a JSON object (null reads as absent).
class Fields {
 public:
  // `prefix`: how errors name the object's fields ("messages[2]." + "name").
  explicit Fields(const json& o, std::string prefix = "") : o_(o), prefix_(std::move(prefix)) {}
  const json* Get(const char* name) const {
    auto it = o_.find(name);
    return it == o_.end() || it->is_null() ? nullptr : &*it;
  }
  absl::Status Bool(const char* name, bool* out) const {
    const json* v = Get(name);
    if (v == nullptr) return absl::OkStatus();
    if (!v->is_boolean()) return Bad(prefix_ + name, "must be true or false");
    *out = v->get<bool>();
    return absl::OkStatus();
  }
  absl::Status Number(const char* name, double lo, double hi, double* out) const {
    const json* v = Get(name);
    if (v == nullptr) return absl::OkStatus();
    if (!v->is_number()) return Bad(prefix_ + name, "must be a number");
    const double d = v->get<double>();
    if (!std::isfinite(d) || d < lo || d > hi) {
      return Bad(prefix_ + name, absl::StrCat(d, " is not in [", lo, ", ", hi, "]"));
    }
    *out = d;
    return absl::OkStatus();
  }
  absl::Status Int(const char* name, int64_t lo, int64_t hi, int64_t* out) const {
    const json* v = Get(name);
    if (v == nullptr) return absl::OkStatus();
    if (!v->is_number_integer()) return Bad(prefix_ + name, "must be an integer");
    const int64_t i = v->is_number_unsigned() && v->get<uint64_t>() > INT64_MAX
                          ? std::numeric_limits<int64_t>::max()
                          : v->get<int64_t>();
    if (i < lo || i > hi)
      return Bad(prefix_ + name, absl::StrCat(i, " is not in [", lo, ", ", hi, "]"));
    *out = i;
    return absl::OkStatus();
  }
  absl::Status String(const char* name, std::string* out) const {
    const json* v = Get(name);
    if (v == nullptr) return absl::OkStatus();
    if (!v->is_string()) return Bad(prefix_ + name, "must be a string");
    *out = v->get<std::string>();
    return absl::OkStatus();
  }

 private:
  const json& o_;
  const std::string prefix_;
};

absl::StatusOr<std::vector<int32_t>> TokenIds(const json& a, const std::string& field) {
  std::vector<int32_t> ids;
  for (size_t i = 0; i < a.size(); ++i) {
    if (!a[i].is_number_integer() || a[i].get<int64_t>() < 0 ||
        a[i].get<int64_t>() > std::numeric_limits<int32_t>::max()) {
      return Bad(absl::StrCat(field, "[", i, "]"), "must be a token id (a non-negative integer)");
    }
    ids.push_back(static_cast<int32_t>(a[i].get<int64_t>()));
  }
  return ids;
}

// A string, a list of strings, a list of token ids or a list of lists of token ids.
absl::Status ParsePrompts(const json* p, Request* r) {
  if (p == nullptr) return Bad("prompt", "is required");
  if (p->is_string()) {
    r->prompts.push_back(p->get<std::string>());
  } else if (p->is_array() && !p->empty() && (*p)[0].is_number()) {
    ASSIGN_OR_RETURN(std::vector<int32_t> ids, TokenIds(*p, "prompt"));
    r->prompts.push_back(std::move(ids));
  } else if (p->is_array()) {
    for (size_t i = 0; i < p->size(); ++i) {
      const json& e = (*p)[i];
      const std::string field = absl::StrCat("prompt[", i, "]");
      if (e.is_string()) {
        r->prompts.push_back(e.get<std::string>());
      } else if (e.is_array()) {
        ASSIGN_OR_RETURN(std::vector<int32_t> ids, TokenIds(e, field));
        r->prompts.push_back(std::move(ids));
      } else {
        return Bad(field, "must be a string or a list of token ids");
      }
    }
  } else {
    return Bad("prompt", "must be a string, a list of strings or a list of token ids");
  }
  if (r->prompts.empty()) return Bad("prompt", "is empty");
  for (size_t i = 0; i < r->prompts.size(); ++i) {
    const Prompt& q = r->prompts[i];
    const bool empty = q.index() == 0 ? std::get<0>(q).empty() : std::get<1>(q).empty();
    if (empty)
      return Bad(r->prompts.size() == 1 ? "prompt" : absl::StrCat("prompt[", i, "]"), "is empty");
  }
  return absl::OkStatus();
}

// A message's content: a string, or a list of {"type": "text", "text": ...} parts.
absl::StatusOr<std::string> Content(const json& c, const std::string& field) {
  if (c.is_null()) return std::string();
  if (c.is_string()) return c.get<std::string>();
  if (!c.is_array()) return Bad(field, "must be a string or a list of content parts");
  std::string text;
  for (size_t i = 0; i < c.size(); ++i) {
    const std::string f = absl::StrCat(field, "[", i, "]");
    if (!c[i].is_object()) return Bad(f, "must be an object");
    auto type = c[i].find("type");
    if (type == c[i].end() || *type != "text") {
      return Bad(absl::StrCat(f, ".type"), "only \"text\" parts are served by this model");
    }
    auto t = c[i].find("text");
    if (t == c[i].end() || !t->is_string())
      return Bad(absl::StrCat(f, ".text"), "must be a string");
    text += t->get<std::string>();
  }
  return text;
}

absl::Status ParseToolCalls(const json& calls, const std::string& field, v1::ChatMessage* m) {
  if (!calls.is_array()) return Bad(field, "must be a list");
  for (size_t i = 0; i < calls.size(); ++i) {
    const std::string f = absl::StrCat(field, "[", i, "]");
    const json& c = calls[i];
    if (!c.is_object()) return Bad(f, "must be an object");
    v1::ToolCall* t = m->add_tool_calls();
    Fields cf(c, f + ".");
    RETURN_IF_ERROR(cf.String("id", t->mutable_id()));
    RETURN_IF_ERROR(cf.String("type", t->mutable_type()));
    const json* fn = cf.Get("function");
    if (fn == nullptr || !fn->is_object()) return Bad(f + ".function", "must be an object");
    Fields ff(*fn, f + ".function.");
    RETURN_IF_ERROR(ff.String("name", t->mutable_function_name()));
    RETURN_IF_ERROR(ff.String("arguments", t->mutable_function_arguments()));
  }
  return absl::OkStatus();
}

// `tools`: a list of {"type": "function", "function": {"name", "description"?, "parameters"?}}
// (each field checked here: a template would render a wrong one as something else, or fail with
// a message naming none of them).
absl::Status ParseTools(const json& tools, std::vector<std::string>* names) {
  if (!tools.is_array()) return Bad("tools", "must be a list");
  for (size_t i = 0; i < tools.size(); ++i) {
    const std::string f = absl::StrCat("tools[", i, "]");
    if (!tools[i].is_object()) return Bad(f, "must be an object");
    Fields tf(tools[i], f + ".");
    std::string type = "function";
    RETURN_IF_ERROR(tf.String("type", &type));
    if (type != "function") return Bad(f + ".type", "only \"function\" tools are served");
    const json* fn = tf.Get("function");
    if (fn == nullptr || !fn->is_object()) return Bad(f + ".function", "must be an object");
    Fields ff(*fn, f + ".function.");
    std::string name, description;
    RETURN_IF_ERROR(ff.String("name", &name));
    if (name.empty()) return Bad(f + ".function.name", "is required");
    // What the model writes back as the call's name, on one line of DeepSeek's markup.
    const bool plain = std::none_of(name.begin(), name.end(), [](char ch) {
      return static_cast<unsigned char>(ch) <= ' ' || ch == '<' || ch == '`' || ch == 0x7f;
    });
    if (name.size() > kMaxToolName || !plain) {
      return Bad(f + ".function.name",
                 absl::StrCat("must be 1-", kMaxToolName, " bytes without blanks, '<' or '`'"));
    }
    names->push_back(name);
    RETURN_IF_ERROR(ff.String("description", &description));
    const json* params = ff.Get("parameters");
    if (params != nullptr && !params->is_object()) {
      return Bad(f + ".function.parameters", "must be a JSON Schema object");
    }
  }
  return absl::OkStatus();
}

// tool_choice: "auto" (the default with tools), "none", "required", or {"type": "function",
// "function": {"name": one of the tools}}.
absl::Status ParseToolChoice(const Fields& f, const std::vector<std::string>& names, Request* r) {
  const json* choice = f.Get("tool_choice");
  r->tool_choice = r->has_tools ? "auto" : "none";
  if (choice == nullptr) return absl::OkStatus();
  if (choice->is_string() && (*choice == "auto" || *choice == "none" || *choice == "required")) {
    if (!r->has_tools && *choice == "required")
      return Bad("tool_choice", "\"required\" needs tools");
    if (r->has_tools) r->tool_choice = choice->get<std::string>();
    return absl::OkStatus();
  }
  if (!choice->is_object()) {
    return Bad("tool_choice", "must be \"auto\", \"none\", \"required\" or a named function");
  }
  Fields cf(*choice, "tool_choice.");
  std::string type;
  RETURN_IF_ERROR(cf.String("type", &type));
  if (type != "function") return Bad("tool_choice.type", "must be \"function\"");
  const json* fn = cf.Get("function");
  if (fn == nullptr || !fn->is_object()) return Bad("tool_choice.function", "must be an object");
  std::string name;
  RETURN_IF_ERROR(Fields(*fn, "tool_choice.function.").String("name", &name));
  if (std::find(names.begin(), names.end(), name) == names.end()) {
    const std::string shown =
        name.size() > kMaxToolName ? name.substr(0, kMaxToolName) + "..." : name;
    return Bad("tool_choice.function.name", absl::StrCat("\"", shown, "\" is not one of tools"));
  }
  r->tool_choice = "function";
  r->tool_choice_name = name;
  return absl::OkStatus();
}

absl::Status ParseMessages(const Fields& f, Request* r) {
  const json* ms = f.Get("messages");
  if (ms == nullptr) return Bad("messages", "is required");
  if (!ms->is_array()) return Bad("messages", "must be a list of messages");
  if (ms->empty()) return Bad("messages", "is empty");
  if (ms->size() > static_cast<size_t>(kMaxMessages)) {
    return Bad("messages", absl::StrCat(ms->size(), " messages; at most ", kMaxMessages));
  }
  for (size_t i = 0; i < ms->size(); ++i) {
    const std::string field = absl::StrCat("messages[", i, "]");
    const json& m = (*ms)[i];
    if (!m.is_object()) return Bad(field, "must be an object");
    Fields mf(m, field + ".");
    v1::ChatMessage* out = r->chat.add_messages();
    RETURN_IF_ERROR(mf.String("role", out->mutable_role()));
    if (out->role().empty()) return Bad(field + ".role", "is required");
    if (out->role() == "developer") out->set_role("system");
    static const json kAbsent;  // (content by reference: copying a value recurses per level)
    const json* c = mf.Get("content");
    ASSIGN_OR_RETURN(std::string content, Content(c != nullptr ? *c : kAbsent, field + ".content"));
    out->set_content(std::move(content));
    RETURN_IF_ERROR(mf.String("name", out->mutable_name()));
    RETURN_IF_ERROR(mf.String("tool_call_id", out->mutable_tool_call_id()));
    if (const json* calls = mf.Get("tool_calls")) {
      RETURN_IF_ERROR(ParseToolCalls(*calls, field + ".tool_calls", out));
    }
  }
  std::vector<std::string> names;
  if (const json* tools = f.Get("tools")) {
    RETURN_IF_ERROR(ParseTools(*tools, &names));
    r->has_tools = !tools->empty();
    r->chat.set_tools_json(Dump(*tools));
  }
  RETURN_IF_ERROR(ParseToolChoice(f, names, r));
  // tool_choice "none": the model answers in text, so it is not shown tools it must not call
  // (as OpenAI's; vLLM's --exclude-tools-when-tool-choice-none).
  if (r->tool_choice == "none") r->chat.clear_tools_json();
  return f.Bool("parallel_tool_calls", &r->parallel_tool_calls);
}

absl::Status ParseStop(const Fields& f, v1::SamplingParams* s) {
  const json* stop = f.Get("stop");
  if (stop == nullptr) return absl::OkStatus();
  std::vector<std::string> stops;
  if (stop->is_string()) {
    stops.push_back(stop->get<std::string>());
  } else if (stop->is_array()) {
    for (size_t i = 0; i < stop->size(); ++i) {
      if (!(*stop)[i].is_string()) {
        return Bad(absl::StrCat("stop[", i, "]"), "must be a string");
      }
      stops.push_back((*stop)[i].get<std::string>());
    }
  } else {
    return Bad("stop", "must be a string or a list of strings");
  }
  if (stops.size() > static_cast<size_t>(kMaxStops)) {
    return Bad("stop", absl::StrCat("at most ", kMaxStops, " stop strings"));
  }
  for (size_t i = 0; i < stops.size(); ++i) {
    if (stops[i].empty()) return Bad(absl::StrCat("stop[", i, "]"), "is empty");
    s->add_stop(stops[i]);
  }
  return absl::OkStatus();
}

absl::Status ParseLogitBias(const Fields& f, v1::SamplingParams* s) {
  const json* bias = f.Get("logit_bias");
  if (bias == nullptr) return absl::OkStatus();
  if (!bias->is_object()) return Bad("logit_bias", "must be an object of token id: bias");
  for (auto it = bias->begin(); it != bias->end(); ++it) {
    const std::string field = absl::StrCat("logit_bias[\"", it.key(), "\"]");
    char* end = nullptr;
    const long id = std::strtol(it.key().c_str(), &end, 10);
    if (it.key().empty() || *end != '\0' || id < 0 || id > std::numeric_limits<int32_t>::max()) {
      return Bad(field, "the key must be a token id");
    }
    if (!it.value().is_number() || !(std::fabs(it.value().get<double>()) <= 100)) {
      return Bad(field, "must be a number in [-100, 100]");
    }
    (*s->mutable_logit_bias())[static_cast<int32_t>(id)] = it.value().get<float>();
  }
  return absl::OkStatus();
}

// vLLM's stop_token_ids: the answer ends at any of these ids (the node checks the vocabulary).
absl::Status ParseStopTokenIds(const Fields& f, v1::SamplingParams* s) {
  const json* ids = f.Get("stop_token_ids");
  if (ids == nullptr) return absl::OkStatus();
  if (!ids->is_array()) return Bad("stop_token_ids", "must be a list of token ids");
  if (ids->size() > static_cast<size_t>(kMaxStopTokenIds)) {
    return Bad("stop_token_ids", absl::StrCat("at most ", kMaxStopTokenIds, " ids"));
  }
  for (size_t i = 0; i < ids->size(); ++i) {
    const json& id = (*ids)[i];
    if (!id.is_number_integer() || id.get<int64_t>() < 0 ||
        id.get<int64_t>() > std::numeric_limits<int32_t>::max()) {
      return Bad(absl::StrCat("stop_token_ids[", i, "]"), "must be a token id");
    }
    s->add_stop_token_ids(static_cast<int32_t>(id.get<int64_t>()));
  }
  return absl::OkStatus();
}

// Fields other servers (vLLM, the legacy OpenAI API) take that would change the output here if
// they were ignored: present with a value other than the one that means "off", they are an error
// naming the field rather than a silent difference. (Unknown fields that change nothing, such as
// metadata or store, are ignored as OpenAI's own server does.)
absl::Status Unsupported(const Fields& f) {
  for (const char* name : {"guided_json", "guided_regex", "guided_choice", "guided_grammar",
                           "structured_outputs", "functions", "function_call", "allowed_token_ids",
                           "bad_words", "prompt_logprobs", "truncate_prompt_tokens"}) {
    const json* v = f.Get(name);
    const bool off = (v == nullptr) || (v->is_array() && v->empty()) ||
                     (std::string(name) == "function_call" && *v == "none");
    if (!off) return Bad(name, "is not supported here");
  }
  bool beam = false;
  RETURN_IF_ERROR(f.Bool("use_beam_search", &beam));
  if (beam) return Bad("use_beam_search", "is not supported");
  int64_t min_tokens = 0;
  RETURN_IF_ERROR(f.Int("min_tokens", 0, std::numeric_limits<int32_t>::max(), &min_tokens));
  if (min_tokens > 0) return Bad("min_tokens", "is not supported");
  bool include_stop = false;
  RETURN_IF_ERROR(f.Bool("include_stop_str_in_output", &include_stop));
  if (include_stop) return Bad("include_stop_str_in_output", "is not supported");
  return absl::OkStatus();
}

// The sampling fields both endpoints share.
absl::Status ParseSampling(const Fields& f, Request* r) {
  v1::SamplingParams* s = &r->sampling;
  double temperature = 1.0, top_p = 1.0, min_p = 0, presence = 0, frequency = 0, repetition = 1;
  int64_t top_k = 0, seed = 0, max_tokens = 0, n = 1;
  RETURN_IF_ERROR(f.Number("temperature", 0, 2, &temperature));
  RETURN_IF_ERROR(f.Number("top_p", 0, 1, &top_p));
  if (top_p <= 0) return Bad("top_p", "must be greater than 0");
  RETURN_IF_ERROR(f.Int("top_k", -1, std::numeric_limits<int32_t>::max(), &top_k));
  RETURN_IF_ERROR(f.Number("min_p", 0, 1, &min_p));
  RETURN_IF_ERROR(f.Int("seed", std::numeric_limits<int64_t>::min(),
                        std::numeric_limits<int64_t>::max(), &seed));
  RETURN_IF_ERROR(f.Number("presence_penalty", -2, 2, &presence));
  RETURN_IF_ERROR(f.Number("frequency_penalty", -2, 2, &frequency));
  RETURN_IF_ERROR(f.Number("repetition_penalty", 1e-6, 1e6, &repetition));
  RETURN_IF_ERROR(f.Int("max_tokens", 1, std::numeric_limits<int32_t>::max(), &max_tokens));
  RETURN_IF_ERROR(
      f.Int("max_completion_tokens", 1, std::numeric_limits<int32_t>::max(), &max_tokens));
  r->max_tokens_given = f.Get("max_tokens") != nullptr || f.Get("max_completion_tokens") != nullptr;
  r->seed_given = f.Get("seed") != nullptr;
  r->temperature_given = f.Get("temperature") != nullptr;
  r->top_p_given = f.Get("top_p") != nullptr;
  r->top_k_given = f.Get("top_k") != nullptr;
  r->min_p_given = f.Get("min_p") != nullptr;
  r->repetition_penalty_given = f.Get("repetition_penalty") != nullptr;
  RETURN_IF_ERROR(f.Int("n", 1, kMaxChoices, &n));
  r->n = static_cast<int>(n);
  bool ignore_eos = false;
  RETURN_IF_ERROR(f.Bool("ignore_eos", &ignore_eos));
  s->set_temperature(temperature);
  s->set_top_p(top_p);
  s->set_top_k(top_k < 0 ? 0 : top_k);
  s->set_min_p(min_p);
  s->set_seed(static_cast<uint64_t>(seed));
  s->set_max_tokens(max_tokens);
  s->set_ignore_eos(ignore_eos);
  s->set_presence_penalty(presence);
  s->set_frequency_penalty(frequency);
  s->set_repetition_penalty(repetition);
  RETURN_IF_ERROR(ParseStop(f, s));
  RETURN_IF_ERROR(ParseStopTokenIds(f, s));
  RETURN_IF_ERROR(Unsupported(f));
  return ParseLogitBias(f, s);
}

absl::Status ParseLogprobs(const Fields& f, Request* r) {
  if (r->endpoint == Endpoint::kChat) {
    int64_t top = 0;
    RETURN_IF_ERROR(f.Bool("logprobs", &r->logprobs));
    RETURN_IF_ERROR(f.Int("top_logprobs", 0, 20, &top));
    if (top > 0 && !r->logprobs) return Bad("top_logprobs", "needs \"logprobs\": true");
    r->sampling.set_logprobs(r->logprobs);
    r->sampling.set_top_logprobs(top);
    return absl::OkStatus();
  }
  int64_t k = -1;
  RETURN_IF_ERROR(f.Int("logprobs", 0, 20, &k));
  r->logprobs = k >= 0;
  r->sampling.set_logprobs(r->logprobs);
  r->sampling.set_top_logprobs(k > 0 ? k : 0);
  // echo: the prompt comes back before the answer, with its tokens' logprobs when asked for
  // (how lm-evaluation-harness scores a continuation).
  RETURN_IF_ERROR(f.Bool("echo", &r->echo));
  r->sampling.set_prompt_logprobs(r->echo && r->logprobs);
  return absl::OkStatus();
}

// Fields of the API this server does not serve: an error rather than a silent difference.
absl::Status Unserved(const Fields& f) {
  int64_t best_of = 1;
  RETURN_IF_ERROR(f.Int("best_of", 1, kMaxChoices, &best_of));
  if (best_of != 1) return Bad("best_of", "is not supported");
  std::string suffix;
  RETURN_IF_ERROR(f.String("suffix", &suffix));
  if (!suffix.empty()) return Bad("suffix", "is not supported");
  return absl::OkStatus();
}

absl::Status ParseStreamOptions(const Fields& f, Request* r) {
  RETURN_IF_ERROR(f.Bool("stream", &r->stream));
  const json* so = f.Get("stream_options");
  if (so == nullptr) return absl::OkStatus();
  if (!so->is_object()) return Bad("stream_options", "must be an object");
  if (!r->stream) return Bad("stream_options", "only with \"stream\": true");
  const json* iu = Fields(*so).Get("include_usage");
  if (iu != nullptr && !iu->is_boolean()) {
    return Bad("stream_options.include_usage", "must be true or false");
  }
  r->include_usage = iu != nullptr && iu->get<bool>();
  return absl::OkStatus();
}

absl::Status ParseResponseFormat(const Fields& f, Request* r);

// Chat fields this server does not serve: an error rather than output the client cannot use.
absl::Status UnservedChat(const Fields& f, Request* r) {
  bool echo = false;  // vLLM's: the last message before the answer
  RETURN_IF_ERROR(f.Bool("echo", &echo));
  if (echo) return Bad("echo", "is not supported");
  // vLLM's chat extras that change the prompt.
  const json* kwargs = f.Get("chat_template_kwargs");
  if (kwargs != nullptr && !(kwargs->is_object() && kwargs->empty())) {
    return Bad("chat_template_kwargs", "is not supported");
  }
  bool continue_final = false, add_generation_prompt = true;
  RETURN_IF_ERROR(f.Bool("continue_final_message", &continue_final));
  if (continue_final) return Bad("continue_final_message", "is not supported");
  RETURN_IF_ERROR(f.Bool("add_generation_prompt", &add_generation_prompt));
  if (!add_generation_prompt) return Bad("add_generation_prompt", "false is not supported");
  return ParseResponseFormat(f, r);
}

// response_format (chat, and completions as vLLM's): "text", or "json_object" (JSON mode).
absl::Status ParseResponseFormat(const Fields& f, Request* r) {
  const json* format = f.Get("response_format");
  if (format == nullptr) return absl::OkStatus();
  const json* type = format->is_object() ? Fields(*format).Get("type") : nullptr;
  if (type == nullptr || !type->is_string()) {
    return Bad("response_format", "must be an object with a string \"type\"");
  }
  if (*type == "json_object") {
    r->sampling.set_json_object(true);
    return absl::OkStatus();
  }
  if (*type != "text") {
    return Bad("response_format",
               absl::StrCat("type ", type->dump(),
                            " is not supported (no JSON-schema decoding): \"text\" or "
                            "\"json_object\""));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status EnableToolCalls(const std::string& parser, Request* r) {
  if (r->endpoint != Endpoint::kChat || r->tool_choice == "none") return absl::OkStatus();
  if (parser.empty()) {
    return Bad("tools",
               "tool calls are not parsed by this server (start the gateway with "
               "--tool-call-parser deepseek_v3), or send tool_choice \"none\" for an answer in "
               "text");
  }
  r->parse_tool_calls = true;
  // "required" and a named function: the answer starts inside a call (of that function), so a
  // call is what comes; its arguments are the model's, not checked against the schema.
  if (r->tool_choice == "required") r->tool_prefill = ToolCallParser::Opening("");
  if (r->tool_choice == "function") {
    r->tool_prefill = ToolCallParser::Opening(r->tool_choice_name);
    r->parallel_tool_calls = false;  // the one call asked for
    // The answer is the call's arguments: JSON mode keeps them one JSON object, ending there.
    r->sampling.set_json_object(true);
  }
  return absl::OkStatus();
}

void ApplySamplingDefaults(const ModelConfig::SamplingDefaults& d, Request* r) {
  v1::SamplingParams* s = &r->sampling;
  if (!r->temperature_given && !std::isnan(d.temperature)) s->set_temperature(d.temperature);
  if (!r->top_p_given && !std::isnan(d.top_p)) s->set_top_p(d.top_p);
  if (!r->top_k_given && d.top_k >= 0) s->set_top_k(d.top_k);
  if (!r->min_p_given && !std::isnan(d.min_p)) s->set_min_p(d.min_p);
  if (!r->repetition_penalty_given && !std::isnan(d.repetition_penalty)) {
    s->set_repetition_penalty(d.repetition_penalty);
  }
}

absl::StatusOr<Request> ParseRequest(Endpoint endpoint, std::string_view body) {
  json j = json::parse(body.begin(), body.end(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return Bad("body", "is not valid JSON (or not UTF-8)");
  if (!j.is_object()) return Bad("body", "must be a JSON object");
  if (NestsDeeperThan(j, kMaxBodyNesting)) {
    return Bad("body", absl::StrCat("JSON nested deeper than ", kMaxBodyNesting, " levels"));
  }
  Request r;
  r.endpoint = endpoint;
  Fields f(j);
  RETURN_IF_ERROR(f.String("model", &r.model));
  RETURN_IF_ERROR(f.String("user", &r.user));
  if (endpoint == Endpoint::kChat) {
    RETURN_IF_ERROR(ParseMessages(f, &r));
    RETURN_IF_ERROR(UnservedChat(f, &r));
  } else {
    RETURN_IF_ERROR(ParsePrompts(f.Get("prompt"), &r));
    RETURN_IF_ERROR(Unserved(f));
    RETURN_IF_ERROR(ParseResponseFormat(f, &r));
  }
  RETURN_IF_ERROR(ParseSampling(f, &r));
  RETURN_IF_ERROR(ParseLogprobs(f, &r));
  RETURN_IF_ERROR(f.Bool("skip_special_tokens", &r.skip_special_tokens));
  RETURN_IF_ERROR(ParseStreamOptions(f, &r));
  if (!r.chat.tools_json().empty()) {
    // The tools as the client ordered their members (a template shows them with `tojson`, as
    // transformers does from Python's ordered dicts); `j` sorted them.
    const auto ordered = nlohmann::ordered_json::parse(body.begin(), body.end(), nullptr, false);
    r.chat.set_tools_json(
        ordered["tools"].dump(-1, ' ', false, nlohmann::ordered_json::error_handler_t::replace));
  }
  const size_t prompts = endpoint == Endpoint::kChat ? 1 : r.prompts.size();
  if (prompts * static_cast<size_t>(r.n) > static_cast<size_t>(kMaxChoices)) {
    return Bad(
        "n", absl::StrCat(r.n, " x ", prompts, " prompts is more than ", kMaxChoices, " choices"));
  }
  return r;
}

}  // namespace dmoe::gateway::openai

namespace dmoe::gateway::openai {

ResponseWriter::ResponseWriter(const Request& request, std::string id, int64_t created,
                               std::string model, const Tokenizer* tokenizer, int n_choices)
    : request_(request),
      id_(std::move(id)),
      created_(created),
      model_(std::move(model)),
      tokenizer_(tokenizer),
      choices_(static_cast<size_t>(n_choices)) {}

std::string ResponseWriter::TokenText(int32_t id, const std::string& bytes) const {
  if (!bytes.empty()) return bytes;
  if (tokenizer_ != nullptr && id >= 0 && id < tokenizer_->vocab_size()) {
    return tokenizer_->TokenBytes(id);
  }
  return absl::StrCat("token_id:", id);
}

namespace {

json Bytes(const std::string& s) {
  json b = json::array();
  for (unsigned char c : s) b.push_back(static_cast<int>(c));
  return b;
}

}  // namespace

// The logprobs of one response's tokens, in the endpoint's shape; null when not asked for.
json ResponseWriter::LogprobsOf(Choice* c, const v1::GenerateResponse& r) const {
  if (!request_.logprobs) return nullptr;
  const bool chat = request_.endpoint == Endpoint::kChat;
  json content = json::array();
  json tokens = json::array(), token_lps = json::array(), tops = json::array(),
       offsets = json::array();
  for (int i = 0; i < r.token_ids_size(); ++i) {
    const std::string tok = TokenText(r.token_ids(i), "");
    const double lp = i < r.logprobs_size() ? r.logprobs(i) : 0.0;
    json top = chat ? json::array() : json::object();
    if (i < r.top_logprobs_size()) {
      for (const v1::TokenLogprob& t : r.top_logprobs(i).top()) {
        const std::string s = TokenText(t.token_id(), t.token());
        if (chat) {
          top.push_back({{"token", s}, {"logprob", t.logprob()}, {"bytes", Bytes(s)}});
        } else if (!top.contains(s)) {
          top[s] = t.logprob();  // the likelier of two same-text tokens
        }
      }
    }
    if (chat) {
      content.push_back(
          {{"token", tok}, {"logprob", lp}, {"bytes", Bytes(tok)}, {"top_logprobs", top}});
    } else {
      tokens.push_back(tok);
      token_lps.push_back(lp);
      tops.push_back(request_.sampling.top_logprobs() > 0 ? top : json(nullptr));
      offsets.push_back(c->text_offset);
      c->text_offset += static_cast<int64_t>(tok.size());
    }
  }
  if (chat) return {{"content", std::move(content)}};
  return {{"tokens", std::move(tokens)},
          {"token_logprobs", std::move(token_lps)},
          {"top_logprobs", std::move(tops)},
          {"text_offset", std::move(offsets)}};
}

namespace {

// Appends logprobs object `lp`'s lists to those of `into` (null: becomes lp).
void AppendEntries(json* into, const json& lp) {
  if (lp.is_null()) return;
  if (into->is_null()) {
    *into = lp;
    return;
  }
  for (auto& [key, value] : lp.items()) {
    for (const auto& e : value) (*into)[key].push_back(e);
  }
}

}  // namespace

void ResponseWriter::AppendLogprobs(Choice* c, const json& lp) const {
  AppendEntries(&c->logprobs, lp);
}

std::string ResponseWriter::Echo(int index, Choice* c, const v1::GenerateResponse& r,
                                 json* lp) const {
  c->echoed = true;
  const size_t p = static_cast<size_t>(index / request_.n);
  std::string text;
  if (p < request_.prompts.size()) {
    const Prompt& q = request_.prompts[p];
    if (q.index() == 0) {
      text = std::get<0>(q);
    } else if (tokenizer_ != nullptr) {
      text = tokenizer_->Decode(std::get<1>(q));
    }
  }
  if (!request_.logprobs || p >= request_.prompt_token_ids.size()) return text;
  // Position i's score is the node's (i - 1)th; the first token has none (null, as vLLM's).
  const std::vector<int32_t>& ids = request_.prompt_token_ids[p];
  json tokens = json::array(), token_lps = json::array(), tops = json::array(),
       offsets = json::array();
  for (size_t i = 0; i < ids.size(); ++i) {
    const std::string tok = TokenText(ids[i], "");
    tokens.push_back(tok);
    offsets.push_back(c->text_offset);
    c->text_offset += static_cast<int64_t>(tok.size());
    const int k = static_cast<int>(i) - 1;
    token_lps.push_back(k >= 0 && k < r.prompt_logprobs_size() ? json(r.prompt_logprobs(k))
                                                               : json(nullptr));
    if (request_.sampling.top_logprobs() <= 0 || k < 0 || k >= r.prompt_top_logprobs_size()) {
      tops.push_back(nullptr);
      continue;
    }
    json top = json::object();
    for (const v1::TokenLogprob& t : r.prompt_top_logprobs(k).top()) {
      const std::string key = TokenText(t.token_id(), t.token());
      if (!top.contains(key)) top[key] = t.logprob();  // the likelier of two same-text tokens
    }
    tops.push_back(std::move(top));
  }
  *lp = {{"tokens", std::move(tokens)},
         {"token_logprobs", std::move(token_lps)},
         {"top_logprobs", std::move(tops)},
         {"text_offset", std::move(offsets)}};
  return text;
}

void ResponseWriter::AddUsage(int index, const v1::Usage& u) {
  // Each prompt's n choices share it: counted once.
  if (index % request_.n == 0) {
    prompt_tokens_ += u.prompt_tokens();
    cached_tokens_ += u.cached_prompt_tokens();
  }
  completion_tokens_ += u.completion_tokens();
}

json ResponseWriter::UsageJson() const {
  return {{"prompt_tokens", prompt_tokens_},
          {"completion_tokens", completion_tokens_},
          {"total_tokens", prompt_tokens_ + completion_tokens_},
          {"prompt_tokens_details", {{"cached_tokens", cached_tokens_}}}};
}

std::string ResponseWriter::CallId(int index, int call) const {
  return absl::StrCat("call_", id_.substr(id_.rfind('-') + 1), "_", index, "_", call);
}

// The tool_calls of a streamed delta: a new call with its id, type and name, then its arguments
// in pieces (clients join them by index).
json ResponseWriter::ToolCallsJson(int index, const std::vector<ToolCallParser::CallDelta>& calls) {
  json out = json::array();
  for (const ToolCallParser::CallDelta& d : calls) {
    json call = {{"index", d.index}};
    json fn = json::object();
    if (d.started) {
      call["id"] = CallId(index, d.index);
      call["type"] = "function";
      fn["name"] = d.name;
    }
    fn["arguments"] = d.arguments;
    call["function"] = std::move(fn);
    out.push_back(std::move(call));
  }
  return out;
}

json ResponseWriter::ChunkJson(int index, const Parts& parts, const json& lp,
                               const std::string& finish) {
  Choice& c = choices_[static_cast<size_t>(index)];
  const bool chat = request_.endpoint == Endpoint::kChat;
  json choice = {{"index", index}};
  if (chat) {
    json delta = json::object();
    if (!c.role_sent) delta["role"] = "assistant";
    if (!parts.reasoning.empty()) delta["reasoning_content"] = parts.reasoning;
    if (!parts.content.empty() || !c.role_sent) delta["content"] = parts.content;
    if (!parts.calls.empty()) delta["tool_calls"] = ToolCallsJson(index, parts.calls);
    c.role_sent = true;
    choice["delta"] = std::move(delta);
  } else {
    choice["text"] = parts.content;
  }
  choice["logprobs"] = lp;
  choice["finish_reason"] = finish.empty() ? json(nullptr) : json(finish);
  json chunk = {{"id", id_},
                {"object", chat ? "chat.completion.chunk" : "text_completion"},
                {"created", created_},
                {"model", model_},
                {"choices", json::array({std::move(choice)})}};
  if (request_.include_usage) chunk["usage"] = nullptr;
  return chunk;
}

// The text of response `r` as reasoning, content and tool calls; `last`: the choice's last
// response (what the parsers hold back is flushed).
ResponseWriter::Parts ResponseWriter::Split(Choice* c, const v1::GenerateResponse& r, bool last) {
  Parts parts;
  if (request_.split_reasoning) {
    ReasoningSplitter::Parts p = c->splitter.Add(r.text_delta());
    if (last) {
      ReasoningSplitter::Parts rest = c->splitter.Flush();
      p.reasoning += rest.reasoning;
      p.content += rest.content;
    }
    parts.reasoning = std::move(p.reasoning);
    parts.content = std::move(p.content);
  } else {
    parts.content = r.text_delta();
  }
  if (!request_.parse_tool_calls) return parts;
  ToolCallParser::Parts t =
      c->tool_parser.Add(c->prefill_read ? parts.content : request_.tool_prefill + parts.content);
  c->prefill_read = true;
  if (last) {
    ToolCallParser::Parts rest = c->tool_parser.Flush();
    t.content += rest.content;
    for (ToolCallParser::CallDelta& d : rest.calls) {
      if (!t.calls.empty() && t.calls.back().index == d.index) {
        t.calls.back().arguments += d.arguments;
      } else {
        t.calls.push_back(std::move(d));
      }
    }
  }
  parts.content = std::move(t.content);
  if (!request_.tool_prefill.empty() && !c->prefill_stripped && !parts.content.empty()) {
    // The format broke inside the prefilled call: the text from there is content, but not the
    // opening the model never wrote.
    c->prefill_stripped = true;
    if (parts.content.compare(0, request_.tool_prefill.size(), request_.tool_prefill) == 0) {
      parts.content.erase(0, request_.tool_prefill.size());
    }
  }
  for (ToolCallParser::CallDelta& d : t.calls) {
    // parallel_tool_calls false: the first call only (the model may write several).
    if (request_.parallel_tool_calls || d.index == 0) parts.calls.push_back(std::move(d));
  }
  return parts;
}

bool ResponseWriter::CallsWhole(const Choice& c) const {
  // A named function is answered "stop", as OpenAI's and vLLM's (the call was asked for).
  if (request_.tool_choice == "function") return false;
  const int completed = c.tool_parser.completed();
  return completed > 0 && (completed == c.tool_parser.calls() || !request_.parallel_tool_calls);
}

std::string ResponseWriter::Chunk(int index, const v1::GenerateResponse& r) {
  Choice& c = choices_[static_cast<size_t>(index)];
  if (r.has_usage()) AddUsage(index, r.usage());
  // "stop" (a stop token or string) and "length" as OpenAI's; anything else as the node said it.
  // An answer that called tools and then stopped: "tool_calls", as OpenAI's (not when a stop
  // string cut a call short: its arguments are not whole).
  std::string finish = r.finish_reason();
  json lp = nullptr;
  std::string echo;
  if (request_.echo && !c.echoed) echo = Echo(index, &c, r, &lp);
  if (r.token_ids_size() > 0) AppendEntries(&lp, LogprobsOf(&c, r));
  Parts parts = Split(&c, r, !finish.empty() || r.has_usage());
  parts.content = echo + parts.content;
  if (finish == "stop" && CallsWhole(c)) finish = "tool_calls";
  if (!request_.stream) {
    c.reasoning += parts.reasoning;
    c.text += parts.content;
    for (const ToolCallParser::CallDelta& d : parts.calls) {
      if (d.started) {
        c.tool_calls.push_back({{"id", CallId(index, d.index)},
                                {"type", "function"},
                                {"function", {{"name", d.name}, {"arguments", ""}}}});
      }
      std::string& args = c.tool_calls[static_cast<size_t>(d.index)]["function"]["arguments"]
                              .get_ref<std::string&>();
      args += d.arguments;
    }
    AppendLogprobs(&c, lp);
    if (!finish.empty()) c.finish_reason = finish;
    if (request_.logprobs && c.logprobs.is_null() && !finish.empty()) {
      c.logprobs = LogprobsOf(&c, v1::GenerateResponse());  // no tokens: empty lists
    }
    return "";
  }
  // Nothing to say (text held back: a possible stop string or tag), as vLLM: no event.
  if (c.role_sent && parts.content.empty() && parts.reasoning.empty() && parts.calls.empty() &&
      lp.is_null() && finish.empty()) {
    return "";
  }
  return absl::StrCat("data: ", Dump(ChunkJson(index, parts, lp, finish)), "\n\n");
}

std::string ResponseWriter::End() {
  std::string out;
  if (request_.stream && request_.include_usage) {
    json u = {{"id", id_},
              {"object",
               request_.endpoint == Endpoint::kChat ? "chat.completion.chunk" : "text_completion"},
              {"created", created_},
              {"model", model_},
              {"choices", json::array()},
              {"usage", UsageJson()}};
    out = absl::StrCat("data: ", Dump(u), "\n\n");
  }
  return out + "data: [DONE]\n\n";
}

std::string ResponseWriter::Body() const {
  const bool chat = request_.endpoint == Endpoint::kChat;
  json choices = json::array();
  for (size_t i = 0; i < choices_.size(); ++i) {
    const Choice& c = choices_[i];
    json choice = {{"index", i}};
    if (chat) {
      // With tool calls and no text, content is null (as OpenAI's).
      choice["message"] = {
          {"role", "assistant"},
          {"content", c.text.empty() && !c.tool_calls.empty() ? json(nullptr) : json(c.text)}};
      if (!c.tool_calls.empty()) choice["message"]["tool_calls"] = c.tool_calls;
      if (request_.split_reasoning) {
        choice["message"]["reasoning_content"] =
            c.reasoning.empty() ? json(nullptr) : json(c.reasoning);
      }
    } else {
      choice["text"] = c.text;
    }
    choice["logprobs"] = c.logprobs;
    choice["finish_reason"] = c.finish_reason.empty() ? json(nullptr) : json(c.finish_reason);
    choices.push_back(std::move(choice));
  }
  return Dump({{"id", id_},
               {"object", chat ? "chat.completion" : "text_completion"},
               {"created", created_},
               {"model", model_},
               {"choices", std::move(choices)},
               {"usage", UsageJson()}});
}

}  // namespace dmoe::gateway::openai
