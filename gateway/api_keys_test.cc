#include "gateway/api_keys.h"

#include <cstdlib>
#include <fstream>
#include <string>
#include <utility>

#include "gtest/gtest.h"

namespace dmoe::gateway {
namespace {

std::string WriteKeys(const std::string& bytes) {
  const char* dir = std::getenv("TEST_TMPDIR");
  static int n = 0;
  const std::string path = std::string(dir ? dir : "/tmp") + "/keys" + std::to_string(++n);
  std::ofstream(path, std::ios::binary) << bytes;
  return path;
}

// A CRLF file, a tab before the limit, comments and blank lines: every key as a client sends it
// (a CRLF file's keys had kept their \r, so every client got "unknown API key").
TEST(ApiKeys, KeysAndLimitsSplitOnAnyWhitespace) {
  auto keys =
      ApiKeys::Load(WriteKeys("# keys\r\nalpha\r\n\r\nbeta\t1\r\n  # indented comment\n"), 4);
  ASSERT_TRUE(keys.ok()) << keys.status();
  std::string a, b, b2;
  EXPECT_TRUE((*keys)->Acquire("Bearer alpha", &a).ok());
  EXPECT_TRUE((*keys)->Acquire("Bearer beta", &b).ok());
  EXPECT_EQ((*keys)->Acquire("Bearer beta", &b2).code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ((*keys)->Check("Bearer alpha\r").code(), absl::StatusCode::kUnauthenticated);
  // The scheme in any case (RFC 9110), and spaces before the key.
  EXPECT_TRUE((*keys)->Check("bearer alpha").ok());
  EXPECT_TRUE((*keys)->Check("BEARER   alpha").ok());
  EXPECT_EQ((*keys)->Check("Basic alpha").code(), absl::StatusCode::kUnauthenticated);
  EXPECT_EQ((*keys)->Check("Bearer").code(), absl::StatusCode::kUnauthenticated);
  EXPECT_EQ((*keys)->Check("Bearer ").code(), absl::StatusCode::kUnauthenticated);
  (*keys)->Release(a);
  (*keys)->Release(b);
}

TEST(ApiKeys, BadFilesAndLimitsAreErrorsNamingTheLine) {
  const std::pair<std::string, std::string> cases[] = {
      {"alpha\nalpha 3\n", "line 2: this key is listed twice"},
      {"k\xC3\xB6y\n", "line 1: a key must be printable ASCII"},
      {"alpha 0\n", "line 1: expected KEY [LIMIT]"},
      {"alpha 2 3\n", "line 1: expected KEY [LIMIT]"},
      {"# only a comment\n", "no keys"},
  };
  for (const auto& [bytes, want] : cases) {
    auto keys = ApiKeys::Load(WriteKeys(bytes), 4);
    ASSERT_FALSE(keys.ok()) << want;
    EXPECT_NE(keys.status().message().find(want), std::string::npos) << keys.status();
  }
  auto zero = ApiKeys::Load(WriteKeys("alpha\n"), 0);
  ASSERT_FALSE(zero.ok());
  EXPECT_NE(zero.status().message().find("--max-concurrent-per-key: 0"), std::string::npos)
      << zero.status();
}

}  // namespace
}  // namespace dmoe::gateway
