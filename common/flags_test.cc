// ComputeThreads: --threads, its former name --blas-threads, neither, both (refused).
#include "common/flags.h"

#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace dmoe {
namespace {

absl::StatusOr<int64_t> Threads(std::vector<std::string> args) {
  std::vector<char*> argv;
  for (std::string& a : args) argv.push_back(a.data());
  auto f =
      Flags::Parse(static_cast<int>(argv.size()), argv.data(), {"threads", "blas-threads"}, {});
  if (!f.ok()) return f.status();
  return ComputeThreads(*f);
}

TEST(ComputeThreads, EitherNameNeitherOrBoth) {
  EXPECT_EQ(*Threads({"--threads", "3"}), 3);
  EXPECT_EQ(*Threads({"--blas-threads", "2"}), 2);
  EXPECT_EQ(*Threads({}), 0);
  const auto both = Threads({"--threads", "1", "--blas-threads", "1"});
  ASSERT_FALSE(both.ok());
  EXPECT_EQ(both.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(both.status().message().find("--threads"), absl::string_view::npos);
  EXPECT_FALSE(Threads({"--threads", "two"}).ok());
}

}  // namespace
}  // namespace dmoe
