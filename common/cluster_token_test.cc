#include "common/cluster_token.h"

#include <cstdlib>
#include <fstream>
#include <string>
#include <utility>

#include "gtest/gtest.h"

namespace dmoe {
namespace {

std::string WriteTokenFile(const std::string& bytes) {
  const char* dir = std::getenv("TEST_TMPDIR");
  static int n = 0;
  const std::string path = std::string(dir ? dir : "/tmp") + "/token" + std::to_string(++n);
  std::ofstream(path, std::ios::binary) << bytes;
  return path;
}

TEST(ClusterTokenFile, PrintableAsciiIsTheTokenOuterWhitespaceTrimmed) {
  auto t = ReadClusterTokenFile(WriteTokenFile("0123abcdef!~\r\n"));
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(*t, "0123abcdef!~");
  auto spaced = ReadClusterTokenFile(WriteTokenFile("  two words \n"));
  ASSERT_TRUE(spaced.ok()) << spaced.status();
  EXPECT_EQ(*spaced, "two words");
}

// gRPC asserts (aborting the process at its first call) on metadata values that are not
// printable ASCII: such a token is refused when the file is read, naming the byte.
TEST(ClusterTokenFile, OtherBytesAreRefusedNamingTheOffset) {
  const std::pair<std::string, std::string> cases[] = {
      {"\xEF\xBB\xBFsecret\n", "byte 239 at offset 0"},  // a UTF-8 byte-order mark
      {"t\xC3\xB6ken\n", "byte 195 at offset 1"},        // a UTF-8 letter
      {"tab\there\n", "byte 9 at offset 3"},
      {std::string("nul\0x", 5), "byte 0 at offset 3"},
  };
  for (const auto& [bytes, want] : cases) {
    auto t = ReadClusterTokenFile(WriteTokenFile(bytes));
    ASSERT_FALSE(t.ok()) << want;
    EXPECT_EQ(t.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(t.status().message().find(want), std::string::npos) << t.status();
  }
}

TEST(ClusterTokenFile, EmptyMissingOrTooLongIsAnError) {
  EXPECT_FALSE(ReadClusterTokenFile(WriteTokenFile("\n")).ok());
  EXPECT_FALSE(
      ReadClusterTokenFile(WriteTokenFile(std::string(kMaxClusterTokenBytes + 1, 'a'))).ok());
  EXPECT_EQ(ReadClusterTokenFile("/nonexistent/token").status().code(),
            absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace dmoe
