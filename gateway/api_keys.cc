#include "gateway/api_keys.h"

#include <cctype>
#include <fstream>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace dmoe::gateway {

absl::StatusOr<std::unique_ptr<ApiKeys>> ApiKeys::Load(const std::string& path, int64_t limit) {
  if (limit <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("--max-concurrent-per-key: ", limit, " is not positive"));
  }
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("--api-keys: cannot open ", path));
  auto keys = std::make_unique<ApiKeys>();
  std::string line;
  int n = 0;
  while (std::getline(in, line)) {
    ++n;
    const auto at = [&] { return absl::StrCat("--api-keys ", path, " line ", n, ": "); };
    // Split on any whitespace (a tab, a CRLF file's \r): a key is what a client sends after
    // "Bearer ", printable ASCII.
    std::vector<std::string> parts =
        absl::StrSplit(line, absl::ByAnyChar(" \t\r\v\f"), absl::SkipEmpty());
    if (parts.empty() || parts[0][0] == '#') continue;
    int64_t own = limit;
    if (parts.size() > 2 ||
        (parts.size() == 2 && (!absl::SimpleAtoi(parts[1], &own) || own <= 0))) {
      return absl::InvalidArgumentError(absl::StrCat(at(), "expected KEY [LIMIT]"));
    }
    for (const char ch : parts[0]) {
      if (static_cast<unsigned char>(ch) < 0x21 || static_cast<unsigned char>(ch) > 0x7e) {
        return absl::InvalidArgumentError(
            absl::StrCat(at(), "a key must be printable ASCII (byte ",
                         static_cast<int>(static_cast<unsigned char>(ch)), ")"));
      }
    }
    if (keys->limits_.count(parts[0])) {
      return absl::InvalidArgumentError(absl::StrCat(at(), "this key is listed twice"));
    }
    keys->limits_[parts[0]] = own;
  }
  if (keys->limits_.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("--api-keys ", path, ": no keys"));
  }
  return keys;
}

absl::StatusOr<std::string> ApiKeys::KeyOf(std::string_view authorization) const {
  if (authorization.empty()) {
    return absl::UnauthenticatedError("missing authorization: Bearer KEY");
  }
  // The scheme is case-insensitive (RFC 9110 11.1), and any spaces may follow it.
  std::string scheme(authorization.substr(0, 7));
  for (char& c : scheme) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  if (scheme != "bearer ") {
    return absl::UnauthenticatedError("authorization must be \"Bearer KEY\"");
  }
  std::string_view rest = authorization.substr(7);
  while (!rest.empty() && rest.front() == ' ') rest.remove_prefix(1);
  std::string k(rest);
  if (limits_.count(k) == 0) return absl::UnauthenticatedError("unknown API key");
  return k;
}

absl::Status ApiKeys::Check(std::string_view authorization) const {
  if (!enabled()) return absl::OkStatus();
  return KeyOf(authorization).status();
}

absl::Status ApiKeys::Acquire(std::string_view authorization, std::string* key) {
  if (!enabled()) return absl::OkStatus();
  auto k = KeyOf(authorization);
  if (!k.ok()) return k.status();
  const int64_t limit = limits_.at(*k);
  MutexLock l(&mu_);
  if (active_[*k] >= limit) {
    return absl::ResourceExhaustedError(
        absl::StrCat("this API key already has ", limit, " requests in flight"));
  }
  ++active_[*k];
  *key = *k;
  return absl::OkStatus();
}

void ApiKeys::Release(const std::string& key) {
  if (key.empty()) return;
  MutexLock l(&mu_);
  --active_[key];
}

}  // namespace dmoe::gateway
