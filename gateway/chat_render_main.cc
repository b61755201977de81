// Test helper: renders conversations (JSON lines of [{role, content}]) with RenderDeepseekChat and
// prints one JSON string per line, for the comparison with the real template.
#include <cstdio>
#include <iostream>
#include <string>

#include "gateway/text_stream.h"
#include "nlohmann/json.hpp"

int main() {
  std::string line;
  while (std::getline(std::cin, line)) {
    const auto j = nlohmann::json::parse(line);
    std::vector<dmoe::gateway::ChatTurn> turns;
    for (const auto& m : j) turns.push_back({m["role"], m["content"]});
    auto text = dmoe::gateway::RenderDeepseekChat(turns, "<｜begin▁of▁sentence｜>",
                                                  "<｜end▁of▁sentence｜>");
    std::printf("%s\n", text.ok() ? nlohmann::json(*text).dump().c_str() : "null");
  }
  return 0;
}
