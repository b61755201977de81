#include "model/tokenizer_testing.h"

#include "nlohmann/json.hpp"

namespace dmoe::testing {

std::string ByteLevelTokenizerJson(bool with_added) {
  nlohmann::json vocab = nlohmann::json::object();
  for (int b = 0; b < 256; ++b) vocab[ByteChar(b)] = b;
  nlohmann::json added = nlohmann::json::array();
  if (with_added) {
    added.push_back({{"id", 256}, {"content", "<eos>"}, {"special", true}});
    added.push_back({{"id", 257}, {"content", "<tool>"}, {"special", false}});
  }
  const nlohmann::json j = {
      {"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", nlohmann::json::array()}}},
      {"added_tokens", added},
      {"normalizer", nullptr},
      {"pre_tokenizer", {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", false}}},
      {"decoder", {{"type", "ByteLevel"}}}};
  return j.dump();
}

}  // namespace dmoe::testing
