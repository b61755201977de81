#include "gateway/text_stream.h"

#include <algorithm>

namespace dmoe::gateway {

StopStrings::StopStrings(std::vector<std::string> stops) : stops_(std::move(stops)) {
  stops_.erase(std::remove(stops_.begin(), stops_.end(), std::string()), stops_.end());
  for (const std::string& s : stops_) max_len_ = std::max(max_len_, s.size());
}

namespace {
// The largest i <= n that does not fall inside a UTF-8 character of s.
size_t CharBoundary(const std::string& s, size_t n) {
  while (n > 0 && n < s.size() && (static_cast<uint8_t>(s[n]) & 0xc0) == 0x80) --n;
  return n;
}
}  // namespace

std::string StopStrings::Add(const std::string& delta) {
  if (stopped_) return std::string();
  text_ += delta;
  // A stop string can end in this delta and start up to max_len - 1 bytes before it.
  const size_t from = emitted_ > max_len_ ? emitted_ - max_len_ : 0;
  size_t cut = std::string::npos;
  for (const std::string& s : stops_) {
    const size_t at = text_.find(s, from);
    if (at != std::string::npos) cut = std::min(cut, at);
  }
  if (cut != std::string::npos) {
    stopped_ = true;
    std::string out = cut > emitted_ ? text_.substr(emitted_, cut - emitted_) : std::string();
    emitted_ = std::max(emitted_, cut);
    return out;
  }
  // Hold back what could still grow into a stop string.
  size_t safe = text_.size() > (max_len_ ? max_len_ - 1 : 0)
                    ? text_.size() - (max_len_ ? max_len_ - 1 : 0)
                    : 0;
  safe = CharBoundary(text_, std::max(safe, emitted_));
  if (safe <= emitted_) return std::string();
  std::string out = text_.substr(emitted_, safe - emitted_);
  emitted_ = safe;
  return out;
}

std::string StopStrings::Flush() {
  if (stopped_) return std::string();
  std::string out = text_.substr(emitted_);
  emitted_ = text_.size();
  return out;
}

namespace {

constexpr char kOpen[] = "<think>";
constexpr char kClose[] = "</think>";

// The length of the longest suffix of `s` that is a proper prefix of `tag`.
size_t PartialTagAtEnd(const std::string& s, const std::string& tag) {
  for (size_t n = std::min(s.size(), tag.size() - 1); n > 0; --n) {
    if (s.compare(s.size() - n, n, tag, 0, n) == 0) return n;
  }
  return 0;
}

}  // namespace

ReasoningSplitter::Parts ReasoningSplitter::Add(const std::string& delta) {
  Parts out;
  held_ += delta;
  if (!opened_) {
    const size_t start = held_.find_first_not_of(" \t\r\n");
    if (start == std::string::npos) return out;  // only blanks so far
    const std::string open(kOpen);
    const std::string rest = held_.substr(start);
    if (rest.size() < open.size() && open.compare(0, rest.size(), rest) == 0) return out;
    opened_ = true;
    if (rest.compare(0, open.size(), open) == 0) held_ = rest.substr(open.size());
  }
  if (closed_) {
    out.content = std::move(held_);
    held_.clear();
    return out;
  }
  if (const size_t at = held_.find(kClose); at != std::string::npos) {
    closed_ = true;
    out.reasoning = held_.substr(0, at);
    out.content = held_.substr(at + sizeof(kClose) - 1);
    held_.clear();
    return out;
  }
  const size_t keep = PartialTagAtEnd(held_, kClose);
  out.reasoning = held_.substr(0, held_.size() - keep);
  held_.erase(0, held_.size() - keep);
  return out;
}

ReasoningSplitter::Parts ReasoningSplitter::Flush() {
  Parts out;
  (closed_ ? out.content : out.reasoning) = std::move(held_);
  held_.clear();
  opened_ = true;
  return out;
}

namespace {

constexpr char kCallsBegin[] = "<｜tool▁calls▁begin｜>";
constexpr char kCallBegin[] = "<｜tool▁call▁begin｜>";
constexpr char kToolSep[] = "<｜tool▁sep｜>";
constexpr char kCallEnd[] = "<｜tool▁call▁end｜>";
constexpr char kCallsEnd[] = "<｜tool▁calls▁end｜>";
constexpr char kJsonFence[] = "```json\n";
constexpr size_t kMaxType = 64;    // "function"
constexpr size_t kMaxName = 1024;  // bytes of a function's name

bool StartsWith(const std::string& s, const std::string& p) {
  return s.compare(0, p.size(), p) == 0;
}
// Whether `s` is a proper prefix of `p` (more text may complete it).
bool Incomplete(const std::string& s, const std::string& p) {
  return s.size() < p.size() && p.compare(0, s.size(), s) == 0;
}
bool IsBlank(char c) { return c == ' ' || c == '\t' || c == '\r' || c == '\n'; }

}  // namespace

std::string ToolCallParser::Opening(const std::string& name) {
  std::string s = std::string(kCallsBegin) + kCallBegin + "function" + kToolSep;
  if (!name.empty()) s += name + "\n" + kJsonFence;
  return s;
}

ToolCallParser::CallDelta* ToolCallParser::Current(Parts* out) {
  if (out->calls.empty() || out->calls.back().index != calls_ - 1) {
    out->calls.emplace_back();
    out->calls.back().index = calls_ - 1;
  }
  return &out->calls.back();
}

void ToolCallParser::Consume(size_t n) {
  pending_.append(held_, 0, n);
  held_.erase(0, n);
}

void ToolCallParser::ToRaw(Parts* out) {
  out->content += pending_ + held_;
  pending_.clear();
  held_.clear();
  state_ = State::kRaw;
}

bool ToolCallParser::StepContent(Parts* out) {
  const size_t at = held_.find(kCallsBegin);
  if (at == std::string::npos) {
    const size_t keep = PartialTagAtEnd(held_, kCallsBegin);
    out->content.append(held_, 0, held_.size() - keep);
    held_.erase(0, held_.size() - keep);
    return false;
  }
  out->content.append(held_, 0, at);
  held_.erase(0, at);
  Consume(sizeof(kCallsBegin) - 1);
  state_ = State::kBetween;
  return true;
}

bool ToolCallParser::StepBetween(Parts* out) {
  size_t blanks = 0;
  while (blanks < held_.size() && IsBlank(held_[blanks])) ++blanks;
  Consume(blanks);
  if (StartsWith(held_, kCallBegin)) {
    Consume(sizeof(kCallBegin) - 1);
    state_ = State::kType;
    return true;
  }
  if (StartsWith(held_, kCallsEnd)) {
    held_.erase(0, sizeof(kCallsEnd) - 1);
    pending_.clear();
    state_ = State::kRaw;  // anything after the calls is content
    return true;
  }
  if (!held_.empty() && !Incomplete(held_, kCallBegin) && !Incomplete(held_, kCallsEnd)) {
    ToRaw(out);
  }
  return false;
}

// A call's head: its type (up to <｜tool▁sep｜>), its name (up to the line's end), the fence.
bool ToolCallParser::StepHead(Parts* out) {
  if (state_ == State::kType) {
    const size_t at = held_.find(kToolSep);
    const size_t line = held_.find('\n');
    if (at == std::string::npos) {
      if (line != std::string::npos || held_.size() > kMaxType + sizeof(kToolSep)) ToRaw(out);
      return false;
    }
    if (at > kMaxType || line < at) {
      ToRaw(out);
      return false;
    }
    Consume(at + sizeof(kToolSep) - 1);
    state_ = State::kName;
    return true;
  }
  if (state_ == State::kName) {
    const size_t at = held_.find('\n');
    if (at == std::string::npos) {
      if (held_.size() > kMaxName) ToRaw(out);
      return false;
    }
    name_ = held_.substr(0, at);
    while (!name_.empty() && IsBlank(name_.back())) name_.pop_back();
    name_.erase(0, std::min(name_.size(), name_.find_first_not_of(" \t\r")));
    if (name_.empty() || at > kMaxName) {
      ToRaw(out);
      return false;
    }
    Consume(at + 1);
    state_ = State::kFence;
    return true;
  }
  if (Incomplete(held_, kJsonFence)) return false;
  if (!StartsWith(held_, kJsonFence)) {
    ToRaw(out);
    return false;
  }
  held_.erase(0, sizeof(kJsonFence) - 1);
  pending_.clear();
  ++calls_;
  Current(out)->started = true;
  Current(out)->name = std::move(name_);
  name_.clear();
  state_ = State::kArguments;
  return true;
}

bool ToolCallParser::StepArguments(Parts* out) {
  // The arguments end at "\n```" and <｜tool▁call▁end｜>; blanks and backticks before a possible
  // end are held back (JSON has neither a raw newline in a string nor a backtick outside one).
  const size_t at = held_.find(kCallEnd);
  const size_t end = at == std::string::npos ? held_.size() - PartialTagAtEnd(held_, kCallEnd) : at;
  size_t keep_from = end;
  while (keep_from > 0 && (IsBlank(held_[keep_from - 1]) || held_[keep_from - 1] == '`')) {
    --keep_from;
  }
  if (at == std::string::npos) {
    if (keep_from > 0) Current(out)->arguments.append(held_, 0, keep_from);
    held_.erase(0, keep_from);
    return false;
  }
  // The call's end: its fence and the blanks around it are not arguments.
  const std::string tail = held_.substr(keep_from, at - keep_from);
  const size_t fence = tail.rfind("```");
  std::string kept = fence == std::string::npos ? tail : tail.substr(0, fence);
  while (!kept.empty() && IsBlank(kept.back())) kept.pop_back();
  if (keep_from + kept.size() > 0) {
    Current(out)->arguments.append(held_, 0, keep_from);
    Current(out)->arguments += kept;
  }
  held_.erase(0, at + sizeof(kCallEnd) - 1);
  ++completed_;
  state_ = State::kBetween;
  return true;
}

bool ToolCallParser::Step(Parts* out) {
  switch (state_) {
    case State::kContent:
      return StepContent(out);
    case State::kBetween:
      return StepBetween(out);
    case State::kType:
    case State::kName:
    case State::kFence:
      return StepHead(out);
    case State::kArguments:
      return StepArguments(out);
    case State::kRaw:
      out->content += held_;
      held_.clear();
      return false;
  }
  return false;
}

ToolCallParser::Parts ToolCallParser::Add(const std::string& delta) {
  Parts out;
  held_ += delta;
  while (Step(&out)) {
  }
  return out;
}

ToolCallParser::Parts ToolCallParser::Flush() {
  Parts out;
  while (Step(&out)) {
  }
  switch (state_) {
    case State::kArguments: {  // cut short: the arguments so far, without a fence or end begun
      held_.resize(held_.size() - PartialTagAtEnd(held_, kCallEnd));
      std::string tail = held_;
      while (!tail.empty() && (IsBlank(tail.back()) || tail.back() == '`')) tail.pop_back();
      if (!tail.empty()) Current(&out)->arguments += tail;
      held_.clear();
      break;
    }
    case State::kBetween:
      if (calls_ == 0 || held_.find_first_not_of(" \t\r\n") != std::string::npos) ToRaw(&out);
      break;
    default:
      ToRaw(&out);
  }
  pending_.clear();
  held_.clear();
  state_ = State::kRaw;
  return out;
}

}  // namespace dmoe::gateway
