// Gateway-side text handling that needs no RPC: stop strings, DeepSeek-R1's reasoning split and
// DeepSeek-V3's tool calls (the chat template is chat_template.h).
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

// DeepSeek-V3's (and R1's) tool calls, as its chat template writes them and vLLM's deepseek_v3
// tool parser reads them: the answer's text, then
//   <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME
//   ```json
//   ARGUMENTS
//   ```<｜tool▁call▁end｜>
// and more calls (blanks between them), then <｜tool▁calls▁end｜>. Each call is reported as soon as
// its name is known, and its arguments as they arrive; text that could be the start of a marker
// is held back until it is known. Text that breaks the format from some point on is returned from
// there as content (nothing is dropped but the markers), as is text after <｜tool▁calls▁end｜>.
class ToolCallParser {
 public:
  // What one call gained: its name (`started`: the call is new) and/or more of its arguments.
  struct CallDelta {
    int index = 0;
    bool started = false;
    std::string name, arguments;
  };
  struct Parts {
    std::string content;
    std::vector<CallDelta> calls;  // at most one entry per call, in call order
  };
  Parts Add(const std::string& delta);
  // The rest at the end of the answer: a call cut short keeps the arguments it had.
  Parts Flush();
  // Calls started so far, and those of them read to their end marker.
  int calls() const { return calls_; }
  int completed() const { return completed_; }
  // The start of an answer that calls a tool (tool_choice "required": name ""), or the function
  // `name`, up to where the model goes on: the name, or the arguments.
  static std::string Opening(const std::string& name);

 private:
  enum class State { kContent, kBetween, kType, kName, kFence, kArguments, kRaw };
  bool Step(Parts* out);  // false: nothing more to do until more text arrives
  bool StepContent(Parts* out);
  bool StepBetween(Parts* out);
  bool StepHead(Parts* out);
  bool StepArguments(Parts* out);
  void Consume(size_t n);
  void ToRaw(Parts* out);
  CallDelta* Current(Parts* out);
  State state_ = State::kContent;
  std::string held_;     // text not yet returned or consumed
  std::string pending_;  // consumed markup of a call not yet started (content if it breaks)
  std::string name_;     // of the call being read
  int calls_ = 0;
  int completed_ = 0;
};

}  // namespace dmoe::gateway

#endif  // DMOE_GATEWAY_TEXT_STREAM_H_
