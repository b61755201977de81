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

}  // namespace dmoe::gateway
