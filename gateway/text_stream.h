// Gateway-side text handling that needs no RPC: the DeepSeek chat template and stop strings.
#ifndef DMOE_GATEWAY_TEXT_STREAM_H_
#define DMOE_GATEWAY_TEXT_STREAM_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace dmoe::gateway {

struct ChatTurn {
  std::string role;  // system, user or assistant
  std::string content;
};

// The DeepSeek chat template (tokenizer_config.json's `chat_template`) for system / user /
// assistant turns, with the generation prompt: bos, the system prompts joined by a blank line, then
// "<｜User｜>" + user, "<｜Assistant｜>" + assistant + eos, ..., "<｜Assistant｜>".
// INVALID_ARGUMENT naming messages[i].role for any other role, or for no messages.
absl::StatusOr<std::string> RenderDeepseekChat(const std::vector<ChatTurn>& messages,
                                               const std::string& bos, const std::string& eos);

// Holds back streamed text that could be the start of a stop string, and cuts the text before the
// first stop string. Never splits a UTF-8 character.
class StopStrings {
 public:
  explicit StopStrings(std::vector<std::string> stops);
  // Adds decoded text; returns the text safe to emit now. `stopped()` turns true at a stop string.
  std::string Add(const std::string& delta);
  // The rest at the end of the stream (nothing after a stop).
  std::string Flush();
  bool stopped() const { return stopped_; }

 private:
  std::vector<std::string> stops_;
  size_t max_len_ = 0;
  std::string text_;    // everything decoded so far
  size_t emitted_ = 0;  // bytes of text_ already returned
  bool stopped_ = false;
};

}  // namespace dmoe::gateway

#endif  // DMOE_GATEWAY_TEXT_STREAM_H_
