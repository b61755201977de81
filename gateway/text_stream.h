// Gateway-side text handling that needs no RPC: stop strings (the chat template is
// chat_template.h).
#ifndef DMOE_GATEWAY_TEXT_STREAM_H_
#define DMOE_GATEWAY_TEXT_STREAM_H_

#include <string>
#include <vector>

namespace dmoe::gateway {

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
