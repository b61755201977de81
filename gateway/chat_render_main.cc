// Test helper (tests/tokenizer/compare_chat_template.sh): renders conversations with a chat
// template, for the comparison with @huggingface/jinja (tests/tokenizer/jinja_render.mjs).
//
// Usage: chat_render [--tokenizer-config FILE] < lines
//   Without --tokenizer-config: the built-in DeepSeek-V2-Chat template. Each input line is either a
//   JSON array of messages (rendered with add_generation_prompt = true, no tools) or an object
//   {messages, tools?, add_generation_prompt?} (add_generation_prompt defaults to false).
// Usage: chat_render --cases < lines
//   Each input line is {template, context}: any template with any context (gateway/jinja.h).
// Each output line is the rendered text as a JSON string, or {"error": message} when parsing or
// rendering fails.
#include <cstdio>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>

#include "gateway/chat_template.h"
#include "gateway/jinja.h"
#include "nlohmann/json.hpp"

namespace {

using OJson = nlohmann::ordered_json;

void PrintError(const std::string& msg) {
  std::printf("{\"error\": %s}\n", dmoe::gateway::jinja::JsonQuote(msg).c_str());
}

void Print(const absl::StatusOr<std::string>& text) {
  if (text.ok()) {
    std::printf("%s\n", dmoe::gateway::jinja::JsonQuote(*text).c_str());
  } else {
    PrintError(std::string(text.status().message()));
  }
}

int RenderCases() {
  std::string line;
  while (std::getline(std::cin, line)) {
    const OJson j = OJson::parse(line, nullptr, /*allow_exceptions=*/false);
    if (!j.is_object() || !j.contains("template") || !j["template"].is_string()) {
      PrintError("input line: expected {template, context}");
      continue;
    }
    const auto t = dmoe::gateway::jinja::Template::Parse(j["template"].get<std::string>());
    if (!t.ok()) {
      PrintError(std::string(t.status().message()));
      continue;
    }
    Print(t->Render(j.contains("context") ? j["context"] : OJson::object()));
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  std::string config_path;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--cases") return RenderCases();
    if (arg == "--tokenizer-config" && i + 1 < argc) {
      config_path = argv[++i];
    } else {
      std::fprintf(stderr, "usage: %s [--tokenizer-config FILE | --cases] < lines\n", argv[0]);
      return 2;
    }
  }
  absl::StatusOr<dmoe::gateway::ChatTemplate> tmpl = dmoe::gateway::ChatTemplate::BuiltinDefault();
  if (!config_path.empty()) {
    std::ifstream in(config_path, std::ios::binary);
    if (!in) {
      std::fprintf(stderr, "cannot open %s\n", config_path.c_str());
      return 1;
    }
    std::stringstream ss;
    ss << in.rdbuf();
    tmpl = dmoe::gateway::ChatTemplate::FromTokenizerConfig(ss.str());
    if (!tmpl.ok()) {
      std::fprintf(stderr, "%s: %s\n", config_path.c_str(), tmpl.status().ToString().c_str());
      return 1;
    }
  }
  std::string line;
  while (std::getline(std::cin, line)) {
    const OJson j = OJson::parse(line, nullptr, /*allow_exceptions=*/false);
    OJson messages, tools;
    bool add_generation_prompt = false;
    if (j.is_array()) {
      messages = j;
      add_generation_prompt = true;
    } else if (j.is_object() && j.contains("messages")) {
      messages = j["messages"];
      if (j.contains("tools")) tools = j["tools"];
      const auto agp = j.find("add_generation_prompt");
      add_generation_prompt = agp != j.end() && agp->is_boolean() && agp->get<bool>();
    } else {
      PrintError("input line: expected an array of messages or {messages, tools, ...}");
      continue;
    }
    Print(tmpl->Render(messages, tools, add_generation_prompt));
  }
  return 0;
}
