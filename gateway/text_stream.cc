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

}  // namespace dmoe::gateway
