// openai::ParseRequest on hostile bodies: no input may crash the gateway.
#include "gateway/openai.h"

#include <string>
#include <utility>
#include <vector>

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

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
  const std::string tools =
      R"([{"type":"function","function":{"name":"f","parameters":{"x":)" + Nested(100) + "}}}]";
  auto r = ParseRequest(Endpoint::kChat,
                        R"({"messages":[{"role":"user","content":"hi"}],"tools":)" + tools + "}");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->chat.tools_json(), tools);
}

// What this server would silently not do is an error naming the field: tool calls where no
// parser reads them (an agent would take the model's markup for its final answer), a tool_choice
// naming no tool, and JSON schemas (JSON mode, json_object, is served: sampling.json_object).
TEST(ParseRequest, ToolCallsAndJsonFormatsAreRefused) {
  const std::string msgs = R"({"messages":[{"role":"user","content":"hi"}])";
  const std::string tool = R"([{"type":"function","function":{"name":"f","parameters":{}}}])";
  const std::pair<std::string, const char*> refused[] = {
      {msgs + R"(,"tools":)" + tool +
           R"(,"tool_choice":{"type":"function","function":{"name":"g"}}})",
       "tool_choice.function.name"},
      {msgs + R"(,"tools":)" + tool + R"(,"tool_choice":{"type":"function"}})",
       "tool_choice.function"},
      {msgs + R"(,"tool_choice":"required"})", "tool_choice"},
      {msgs + R"(,"tools":)" + tool + R"(,"tool_choice":"sometimes"})", "tool_choice"},
      {msgs + R"(,"tools":{"f":1}})", "tools"},
      {msgs + R"(,"tools":[{"type":"function","function":{"parameters":{}}}]})",
       "tools[0].function.name"},
      {msgs + R"(,"tools":[{"type":"retrieval"}]})", "tools[0].type"},
      {msgs + R"(,"tools":[{"type":"function","function":{"name":"f"}},)"
              R"({"type":"function","function":{"name":"g","parameters":"x"}}]})",
       "tools[1].function.parameters"},
      {msgs + R"(,"tools":)" + tool + R"(,"parallel_tool_calls":"no"})", "parallel_tool_calls"},
      {msgs + R"(,"tools":[{"type":"function","function":{"name":"get weather"}}]})",
       "tools[0].function.name"},
      {msgs + R"(,"tools":[{"type":"function","function":{"name":")" + std::string(65, 'x') +
           R"("}}]})",
       "tools[0].function.name"},
      {msgs + R"(,"tools":[{"type":"function","function":{"name":7}}]})", "tools[0].function.name"},
      {msgs + R"(,"tools":)" + tool + R"(,"tool_choice":{"type":7}})", "tool_choice.type"},
      {R"({"messages":[{"role":"user","content":"hi","name":5}]})", "messages[0].name"},
      {msgs + R"(,"response_format":{"type":"json_schema","json_schema":{"name":"x"}}})",
       "response_format"},
      {msgs + R"(,"response_format":"json"})", "response_format"},
  };
  for (const auto& [body, field] : refused) {
    auto r = ParseRequest(Endpoint::kChat, body);
    ASSERT_FALSE(r.ok()) << body;
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << r.status();
    EXPECT_EQ(r.status().message().rfind(std::string(field) + ":", 0), 0u) << r.status();
    EXPECT_EQ(ErrorFromStatus(r.status()).param, field);
  }
  // Tools with tool_choice "auto" (said or by default), "required" or named need
  // --tool-call-parser; the last two start the answer inside a call.
  const std::pair<std::string, std::string> choices[] = {
      {"", ""},
      {R"(,"tool_choice":"auto")", ""},
      {R"(,"tool_choice":"required")",
       "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>"},
      {R"(,"tool_choice":{"type":"function","function":{"name":"f"}})",
       "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>f\n```json\n"},
  };
  for (const auto& [choice, prefill] : choices) {
    auto r = ParseRequest(Endpoint::kChat, msgs + R"(,"tools":)" + tool + choice + "}");
    ASSERT_TRUE(r.ok()) << r.status();
    const absl::Status st = EnableToolCalls("", &*r);
    EXPECT_EQ(ErrorFromStatus(st).param, "tools") << st;
    EXPECT_NE(st.message().find("--tool-call-parser deepseek_v3"), std::string::npos) << st;
    EXPECT_FALSE(r->parse_tool_calls);
    ASSERT_TRUE(EnableToolCalls("deepseek_v3", &*r).ok());
    EXPECT_TRUE(r->parse_tool_calls);
    EXPECT_EQ(r->tool_prefill, prefill) << choice;
  }
  const std::string taken[] = {
      msgs + R"(,"tools":)" + tool + R"(,"tool_choice":"none"})",
      msgs + R"(,"tools":[]})",
      msgs + R"(,"tools":null,"tool_choice":"auto"})",
      msgs + R"(,"response_format":{"type":"text"}})",
      msgs + R"(,"response_format":{"type":"json_object"}})",
  };
  for (const std::string& body : taken) {
    auto r = ParseRequest(Endpoint::kChat, body);
    ASSERT_TRUE(r.ok()) << body << ": " << r.status();
    EXPECT_EQ(r->sampling.json_object(), body.find("json_object") != std::string::npos) << body;
    // tool_choice "none": the tools are left out of the prompt (the answer is text).
    EXPECT_EQ(r->chat.tools_json(), "") << body;
    EXPECT_TRUE(EnableToolCalls("", &*r).ok()) << body;
    ASSERT_TRUE(EnableToolCalls("deepseek_v3", &*r).ok());
    EXPECT_FALSE(r->parse_tool_calls) << body << ": nothing to parse";
  }
}

// vLLM's extras: stop_token_ids is served; those that would change the output if ignored are an
// error naming the field (they were silently ignored) unless given their "off" value.
TEST(ParseRequest, VllmExtrasAreServedOrRefusedNeverIgnored) {
  const std::string msgs = R"({"messages":[{"role":"user","content":"hi"}])";
  auto ids = ParseRequest(Endpoint::kChat, msgs + R"(,"stop_token_ids":[7, 9]})");
  ASSERT_TRUE(ids.ok()) << ids.status();
  ASSERT_EQ(ids->sampling.stop_token_ids_size(), 2);
  EXPECT_EQ(ids->sampling.stop_token_ids(0), 7);
  EXPECT_EQ(ids->sampling.stop_token_ids(1), 9);
  const std::pair<std::string, const char*> refused[] = {
      {R"("stop_token_ids":[7, "x"])", "stop_token_ids[1]"},
      {R"("stop_token_ids":[-1])", "stop_token_ids[0]"},
      {R"("stop_token_ids":7)", "stop_token_ids"},
      {R"("guided_json":{"type":"object"})", "guided_json"},
      {R"("guided_regex":"a+")", "guided_regex"},
      {R"("guided_choice":["a","b"])", "guided_choice"},
      {R"("guided_grammar":"root ::= x")", "guided_grammar"},
      {R"("structured_outputs":{"json":{}})", "structured_outputs"},
      {R"("functions":[{"name":"f"}])", "functions"},
      {R"("function_call":"auto")", "function_call"},
      {R"("min_tokens":5)", "min_tokens"},
      {R"("include_stop_str_in_output":true)", "include_stop_str_in_output"},
      {R"("chat_template_kwargs":{"thinking":true})", "chat_template_kwargs"},
      {R"("continue_final_message":true)", "continue_final_message"},
      {R"("add_generation_prompt":false)", "add_generation_prompt"},
      {R"("allowed_token_ids":[1, 2])", "allowed_token_ids"},
      {R"("bad_words":["x"])", "bad_words"},
      {R"("prompt_logprobs":1)", "prompt_logprobs"},
      {R"("truncate_prompt_tokens":10)", "truncate_prompt_tokens"},
      {R"("use_beam_search":true)", "use_beam_search"},
      {R"("echo":true)", "echo"},
  };
  for (const auto& [extra, field] : refused) {
    const std::string body = msgs + "," + extra + "}";
    auto r = ParseRequest(Endpoint::kChat, body);
    ASSERT_FALSE(r.ok()) << body;
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << r.status();
    EXPECT_EQ(ErrorFromStatus(r.status()).param, field) << r.status();
  }
  const std::string off[] = {
      R"("guided_json":null)",
      R"("functions":[])",
      R"("min_tokens":0)",
      R"("include_stop_str_in_output":false)",
      R"("chat_template_kwargs":{})",
      R"("continue_final_message":false)",
      R"("add_generation_prompt":true)",
      R"("metadata":{"a":"b"},"store":false)",
      R"("function_call":"none")",
      R"("use_beam_search":false,"echo":false,"bad_words":[])",
  };
  for (const std::string& extra : off) {
    const std::string body = msgs + "," + extra + "}";
    auto r = ParseRequest(Endpoint::kChat, body);
    EXPECT_TRUE(r.ok()) << body << ": " << r.status();
  }
  // Completions read response_format too (as vLLM's): JSON mode, or a refusal; never ignored.
  auto json_mode = ParseRequest(Endpoint::kCompletions,
                                R"({"prompt":"a","response_format":{"type":"json_object"}})");
  ASSERT_TRUE(json_mode.ok()) << json_mode.status();
  EXPECT_TRUE(json_mode->sampling.json_object());
  auto schema = ParseRequest(Endpoint::kCompletions,
                             R"({"prompt":"a","response_format":{"type":"json_schema"}})");
  EXPECT_EQ(ErrorFromStatus(schema.status()).param, "response_format") << schema.status();
  auto completion = ParseRequest(Endpoint::kCompletions, R"({"prompt":"a","min_tokens":3})");
  ASSERT_FALSE(completion.ok());
  EXPECT_EQ(ErrorFromStatus(completion.status()).param, "min_tokens");
}

// The model's sampling defaults fill what a request omits, never what it gave.
TEST(ParseRequest, SamplingDefaultsFillOnlyOmittedFields) {
  ModelConfig::SamplingDefaults d;
  d.temperature = 0.6;
  d.top_p = 0.95;
  d.top_k = 40;
  d.repetition_penalty = 1.1;
  auto omitted = ParseRequest(Endpoint::kCompletions, R"({"prompt":"a"})");
  ASSERT_TRUE(omitted.ok());
  EXPECT_EQ(omitted->sampling.temperature(), 1.0);  // OpenAI's, before the defaults
  ApplySamplingDefaults(d, &*omitted);
  EXPECT_EQ(omitted->sampling.temperature(), 0.6);
  EXPECT_EQ(omitted->sampling.top_p(), 0.95);
  EXPECT_EQ(omitted->sampling.top_k(), 40);
  EXPECT_EQ(omitted->sampling.min_p(), 0.0);  // no default: unchanged
  EXPECT_EQ(omitted->sampling.repetition_penalty(), 1.1);
  auto given =
      ParseRequest(Endpoint::kCompletions, R"({"prompt":"a","temperature":0,"top_p":1,"top_k":-1,)"
                                           R"("repetition_penalty":1})");
  ASSERT_TRUE(given.ok()) << given.status();
  ApplySamplingDefaults(d, &*given);
  EXPECT_EQ(given->sampling.temperature(), 0.0);
  EXPECT_EQ(given->sampling.top_p(), 1.0);
  EXPECT_EQ(given->sampling.top_k(), 0);
  EXPECT_EQ(given->sampling.repetition_penalty(), 1.0);
}

// --reasoning-parser deepseek-r1: the thinking goes to reasoning_content, the rest to content,
// streamed (delta.reasoning_content / delta.content) and whole (message.reasoning_content).
TEST(ResponseWriter, SplitsDeepSeekR1ReasoningFromTheAnswer) {
  auto deltas = [](const std::vector<std::string>& texts) {
    std::vector<v1::GenerateResponse> out;
    for (const std::string& t : texts) {
      out.emplace_back();
      out.back().set_text_delta(t);
    }
    out.back().set_finish_reason("stop");
    return out;
  };
  // "</thi" alone is held back whole: no event for it (vLLM sends none either).
  const std::vector<std::string> pieces = {"<think>\nfirst", " second", "</thi", "nk>\n\nAns",
                                           "wer."};
  for (const bool stream : {false, true}) {
    auto r = ParseRequest(Endpoint::kChat, R"({"messages":[{"role":"user","content":"q"}]})");
    ASSERT_TRUE(r.ok()) << r.status();
    r->stream = stream;
    r->split_reasoning = true;
    ResponseWriter w(*r, "id", 0, "dmoe", nullptr, 1);
    std::string reasoning, content;
    int events = 0;
    for (const v1::GenerateResponse& d : deltas(pieces)) {
      const std::string event = w.Chunk(0, d);
      if (!stream || event.empty()) continue;
      ++events;
      ASSERT_EQ(event.rfind("data: ", 0), 0u) << event;
      const auto j = nlohmann::json::parse(event.substr(6));
      const auto& delta = j["choices"][0]["delta"];
      if (delta.contains("reasoning_content")) reasoning += delta["reasoning_content"];
      if (delta.contains("content")) content += delta["content"];
    }
    if (!stream) {
      const auto body = nlohmann::json::parse(w.Body());
      reasoning = body["choices"][0]["message"]["reasoning_content"];
      content = body["choices"][0]["message"]["content"];
    }
    EXPECT_EQ(reasoning, "\nfirst second") << (stream ? "streamed" : "whole");
    EXPECT_EQ(content, "\n\nAnswer.") << (stream ? "streamed" : "whole");
    if (stream) {
      EXPECT_EQ(events, 4) << "the held-back piece made an empty event";
    }
  }
  // Without the parser the same text is all content, and there is no reasoning_content.
  auto plain = ParseRequest(Endpoint::kChat, R"({"messages":[{"role":"user","content":"q"}]})");
  ASSERT_TRUE(plain.ok());
  ResponseWriter w(*plain, "id", 0, "dmoe", nullptr, 1);
  for (const v1::GenerateResponse& d : deltas(pieces)) w.Chunk(0, d);
  const auto body = nlohmann::json::parse(w.Body());
  EXPECT_FALSE(body["choices"][0]["message"].contains("reasoning_content"));
  EXPECT_EQ(body["choices"][0]["message"]["content"], "<think>\nfirst second</think>\n\nAnswer.");
  // The last response of a choice flushes the splitter even without a finish reason.
  auto r = ParseRequest(Endpoint::kChat, R"({"messages":[{"role":"user","content":"q"}]})");
  ASSERT_TRUE(r.ok());
  r->split_reasoning = true;
  ResponseWriter held(*r, "id", 0, "dmoe", nullptr, 1);
  v1::GenerateResponse last;
  last.set_text_delta("thought </th");
  last.mutable_usage()->set_completion_tokens(3);
  held.Chunk(0, last);
  EXPECT_EQ(nlohmann::json::parse(held.Body())["choices"][0]["message"]["reasoning_content"],
            "thought </th");
}

// An answer with DeepSeek-V3's tool-call markup, with --tool-call-parser deepseek_v3: whole, the
// message has the text before the calls as content (null when none) and tool_calls; streamed,
// the deltas joined by index give the same calls (each call's id, type and name once, then its
// arguments). The finish reason is "tool_calls". parallel_tool_calls false keeps the first call.
TEST(ResponseWriter, ParsesDeepSeekV3ToolCalls) {
  const std::string call1 =
      "<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{\"city\": \"Paris\"}\n```"
      "<｜tool▁call▁end｜>";
  const std::string call2 =
      "<｜tool▁call▁begin｜>function<｜tool▁sep｜>search\n```json\n{\"q\": \"x\"}\n```"
      "<｜tool▁call▁end｜>";
  const std::string answer =
      "Checking.<｜tool▁calls▁begin｜>" + call1 + "\n" + call2 + "<｜tool▁calls▁end｜>";
  const std::string body =
      R"({"messages":[{"role":"user","content":"q"}],"tools":[{"type":"function",)"
      R"("function":{"name":"get_weather"}},{"type":"function","function":{"name":"search"}}])";
  for (const bool parallel : {true, false}) {
    for (const bool stream : {false, true}) {
      auto r = ParseRequest(Endpoint::kChat,
                            body + (parallel ? "}" : R"(,"parallel_tool_calls":false})"));
      ASSERT_TRUE(r.ok()) << r.status();
      ASSERT_TRUE(EnableToolCalls("deepseek_v3", &*r).ok());
      r->stream = stream;
      ResponseWriter w(*r, "chatcmpl-00ab", 0, "dmoe", nullptr, 1);
      nlohmann::json calls = nlohmann::json::array();
      nlohmann::json content = "";
      std::string finish;
      for (size_t at = 0; at < answer.size(); at += 7) {  // pieces that cut through markers
        v1::GenerateResponse d;
        d.set_text_delta(answer.substr(at, 7));
        if (at + 7 >= answer.size()) d.set_finish_reason("stop");
        const std::string event = w.Chunk(0, d);
        if (!stream || event.empty()) continue;
        const auto j = nlohmann::json::parse(event.substr(6));
        const auto& delta = j["choices"][0]["delta"];
        if (delta.contains("content"))
          content = content.get<std::string>() + delta["content"].get<std::string>();
        if (!j["choices"][0]["finish_reason"].is_null()) finish = j["choices"][0]["finish_reason"];
        if (!delta.contains("tool_calls")) continue;
        for (const auto& c : delta["tool_calls"]) {
          const size_t i = c["index"];
          if (c.contains("id")) {
            ASSERT_EQ(i, calls.size()) << event;
            calls.push_back({{"id", c["id"]},
                             {"type", c["type"]},
                             {"function", {{"name", c["function"]["name"]}, {"arguments", ""}}}});
          }
          ASSERT_LT(i, calls.size()) << "arguments before the call's name: " << event;
          calls[i]["function"]["arguments"] = calls[i]["function"]["arguments"].get<std::string>() +
                                              c["function"]["arguments"].get<std::string>();
        }
      }
      if (!stream) {
        const auto msg = nlohmann::json::parse(w.Body())["choices"][0];
        finish = msg["finish_reason"];
        content = msg["message"]["content"];
        calls = msg["message"]["tool_calls"];
      }
      const std::string how = std::string(stream ? "streamed" : "whole") +
                              (parallel ? "" : ", parallel_tool_calls false");
      EXPECT_EQ(content, "Checking.") << how;
      EXPECT_EQ(finish, "tool_calls") << how;
      ASSERT_EQ(calls.size(), parallel ? 2u : 1u) << how << calls.dump();
      EXPECT_EQ(calls[0]["id"], "call_00ab_0_0") << how;
      EXPECT_EQ(calls[0]["type"], "function") << how;
      EXPECT_EQ(calls[0]["function"]["name"], "get_weather") << how;
      EXPECT_EQ(calls[0]["function"]["arguments"], "{\"city\": \"Paris\"}") << how;
      if (parallel) {
        EXPECT_EQ(calls[1]["id"], "call_00ab_0_1") << how;
        EXPECT_EQ(calls[1]["function"]["name"], "search") << how;
        EXPECT_EQ(calls[1]["function"]["arguments"], "{\"q\": \"x\"}") << how;
      }
    }
  }
  // Only calls: content is null. Without the parser (tool_choice "none") the markup is content.
  auto r = ParseRequest(Endpoint::kChat, body + "}");
  ASSERT_TRUE(r.ok());
  ASSERT_TRUE(EnableToolCalls("deepseek_v3", &*r).ok());
  ResponseWriter only(*r, "chatcmpl-1", 0, "dmoe", nullptr, 1);
  v1::GenerateResponse d;
  d.set_text_delta("<｜tool▁calls▁begin｜>" + call1 + "<｜tool▁calls▁end｜>");
  d.set_finish_reason("stop");
  only.Chunk(0, d);
  const auto msg = nlohmann::json::parse(only.Body())["choices"][0]["message"];
  EXPECT_TRUE(msg["content"].is_null()) << msg.dump();
  EXPECT_EQ(msg["tool_calls"].size(), 1u);
  // A stop string that ends the answer inside a call: "stop", not "tool_calls" (the arguments
  // are not whole).
  ResponseWriter cut(*r, "chatcmpl-3", 0, "dmoe", nullptr, 1);
  v1::GenerateResponse cut_short;
  cut_short.set_text_delta("<｜tool▁calls▁begin｜>" + call1.substr(0, call1.find("Paris")));
  cut_short.set_finish_reason("stop");
  cut.Chunk(0, cut_short);
  const auto cut_choice = nlohmann::json::parse(cut.Body())["choices"][0];
  EXPECT_EQ(cut_choice["finish_reason"], "stop");
  EXPECT_EQ(cut_choice["message"]["tool_calls"][0]["function"]["arguments"], "{\"city\": \"");
  ResponseWriter cut2(*r, "chatcmpl-4", 0, "dmoe", nullptr, 1);
  cut_short.set_text_delta("<｜tool▁calls▁begin｜>" + call1 + "\n" +
                           call2.substr(0, call2.find("\"x")));
  cut2.Chunk(0, cut_short);
  EXPECT_EQ(nlohmann::json::parse(cut2.Body())["choices"][0]["finish_reason"], "stop")
      << "the second call was cut";
  auto none = ParseRequest(Endpoint::kChat, body + R"(,"tool_choice":"none"})");
  ASSERT_TRUE(none.ok());
  ASSERT_TRUE(EnableToolCalls("deepseek_v3", &*none).ok());
  ResponseWriter raw(*none, "chatcmpl-2", 0, "dmoe", nullptr, 1);
  raw.Chunk(0, d);
  const auto plain = nlohmann::json::parse(raw.Body())["choices"][0];
  EXPECT_EQ(plain["message"]["content"], d.text_delta());
  EXPECT_FALSE(plain["message"].contains("tool_calls"));
  EXPECT_EQ(plain["finish_reason"], "stop");
}

// A named tool_choice: the prompt ended inside the call, so the answer is its arguments; the
// response is the call with those arguments, as if the model had written the opening itself.
TEST(ResponseWriter, ANamedToolChoiceReadsTheAnswerAsTheCallsArguments) {
  auto r = ParseRequest(
      Endpoint::kChat,
      R"({"messages":[{"role":"user","content":"q"}],"tools":[{"type":"function","function":)"
      R"({"name":"get_weather"}}],"tool_choice":{"type":"function","function":)"
      R"({"name":"get_weather"}}})");
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_TRUE(EnableToolCalls("deepseek_v3", &*r).ok());
  EXPECT_TRUE(r->sampling.json_object()) << "the arguments are generated in JSON mode";
  ResponseWriter w(*r, "chatcmpl-7", 0, "dmoe", nullptr, 1);
  v1::GenerateResponse d;
  d.set_text_delta("{\"city\": \"Oslo\"}");  // JSON mode ends the answer where it closes
  d.set_finish_reason("stop");
  w.Chunk(0, d);
  const auto choice = nlohmann::json::parse(w.Body())["choices"][0];
  ASSERT_EQ(choice["message"]["tool_calls"].size(), 1u) << choice.dump();
  EXPECT_EQ(choice["message"]["tool_calls"][0]["function"]["name"], "get_weather");
  EXPECT_EQ(choice["message"]["tool_calls"][0]["function"]["arguments"], "{\"city\": \"Oslo\"}");
  EXPECT_TRUE(choice["message"]["content"].is_null());
  EXPECT_EQ(choice["finish_reason"], "stop") << "a named function's call: stop, as OpenAI's";
  // tool_choice "required", and the model broke the format right after the opening (no name
  // line): its text is content, without the opening it never wrote.
  auto required = ParseRequest(
      Endpoint::kChat,
      R"({"messages":[{"role":"user","content":"q"}],"tools":[{"type":"function","function":)"
      R"({"name":"get_weather"}}],"tool_choice":"required"})");
  ASSERT_TRUE(required.ok()) << required.status();
  ASSERT_TRUE(EnableToolCalls("deepseek_v3", &*required).ok());
  ResponseWriter broken(*required, "chatcmpl-8", 0, "dmoe", nullptr, 1);
  v1::GenerateResponse b;
  b.set_text_delta("Sorry, no.");
  b.set_finish_reason("stop");
  broken.Chunk(0, b);
  const auto bc = nlohmann::json::parse(broken.Body())["choices"][0];
  EXPECT_EQ(bc["message"]["content"], "Sorry, no.") << bc.dump();
  EXPECT_FALSE(bc["message"].contains("tool_calls")) << bc.dump();
}

// Completions with echo: the prompt's text comes first, and with logprobs its tokens' entries
// (the first null, then the node's prompt scores; top_logprobs keyed by token), before the
// answer's, with text_offset running on through both; streamed and whole the same.
TEST(ResponseWriter, EchoReturnsThePromptAndItsLogprobsFirst) {
  for (const bool stream : {false, true}) {
    auto r = ParseRequest(Endpoint::kCompletions,
                          R"({"prompt": [7, 8, 9], "echo": true, "logprobs": 1, "max_tokens": 1})");
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_TRUE(r->sampling.prompt_logprobs());
    r->stream = stream;
    r->prompt_token_ids = {{7, 8, 9}};
    ResponseWriter w(*r, "cmpl-1", 0, "dmoe", nullptr, 1);
    v1::GenerateResponse d;
    d.add_token_ids(10);
    d.add_logprobs(-0.5f);
    d.add_top_logprobs()->add_top()->set_token_id(10);
    d.mutable_top_logprobs(0)->mutable_top(0)->set_logprob(-0.5f);
    d.set_text_delta("ten");
    for (int id : {8, 9}) {
      d.add_prompt_token_ids(id);
      d.add_prompt_logprobs(-1.0f * id);
      v1::TokenLogprob* t = d.add_prompt_top_logprobs()->add_top();
      t->set_token_id(id + 100);
      t->set_logprob(-0.25f);
    }
    d.set_finish_reason("length");
    const std::string event = w.Chunk(0, d);
    const auto choice = stream ? nlohmann::json::parse(event.substr(6))["choices"][0]
                               : nlohmann::json::parse(w.Body())["choices"][0];
    // Without a tokenizer a token reads "token_id:N" (its bytes unknown): 10 bytes each.
    EXPECT_EQ(choice["text"], "ten") << "no tokenizer: the id prompt's text is unknown";
    const auto& lp = choice["logprobs"];
    EXPECT_EQ(lp["tokens"],
              nlohmann::json({"token_id:7", "token_id:8", "token_id:9", "token_id:10"}));
    EXPECT_EQ(lp["token_logprobs"], nlohmann::json({nullptr, -8.0, -9.0, -0.5}));
    EXPECT_TRUE(lp["top_logprobs"][0].is_null());
    EXPECT_EQ(lp["top_logprobs"][1], nlohmann::json({{"token_id:108", -0.25}}));
    EXPECT_EQ(lp["text_offset"], nlohmann::json({0, 10, 20, 30}));
  }
  // A text prompt comes back as it was sent; echo without logprobs asks the node for no scores.
  auto text = ParseRequest(Endpoint::kCompletions, R"({"prompt": "Hi there", "echo": true})");
  ASSERT_TRUE(text.ok());
  EXPECT_FALSE(text->sampling.prompt_logprobs());
  ResponseWriter w(*text, "cmpl-2", 0, "dmoe", nullptr, 1);
  v1::GenerateResponse d;
  d.set_text_delta("!");
  d.set_finish_reason("length");
  w.Chunk(0, d);
  EXPECT_EQ(nlohmann::json::parse(w.Body())["choices"][0]["text"], "Hi there!");
  EXPECT_FALSE(
      ParseRequest(Endpoint::kChat, R"({"messages":[{"role":"user","content":"q"}],"echo":true})")
          .ok())
      << "chat echo stays refused";
}

}  // namespace
}  // namespace dmoe::gateway::openai
