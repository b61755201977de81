// Gateway-side text handling that needs no RPC: stop strings, and DeepSeek-R1's reasoning split
// (the chat template is chat_template.h).
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

// DeepSeek-R1's answers: the reasoning, "</think>", then the answer; a leading "<think>" (older
// chat templates leave it to the model) is dropped. An answer with no "</think>" is all reasoning
// (R1's template opens the thinking in the prompt), as vLLM's deepseek_r1 reasoning parser reads
// it. Streamed text that could be the start of either tag is held back until it is known.
class ReasoningSplitter {
 public:
  struct Parts {
    std::string reasoning, content;
  };
  Parts Add(const std::string& delta);
  // The rest at the end of the answer.
  Parts Flush();

 private:
  bool opened_ = false;  // past the leading "<think>" (or known to have none)
  bool closed_ = false;  // past "</think>": everything now is content
  std::string held_;     // text not yet returned
};

}  // namespace dmoe::gateway

#endif  // DMOE_GATEWAY_TEXT_STREAM_H_
