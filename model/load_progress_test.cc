#include "model/load_progress.h"

#include <cstdio>
#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace dmoe {
namespace {

std::vector<std::string> Lines(std::FILE* f) {
  std::rewind(f);
  std::vector<std::string> lines;
  char buf[512];
  while (std::fgets(buf, sizeof(buf), f) != nullptr) lines.emplace_back(buf);
  return lines;
}

TEST(LoadProgress, LogFileGetsOneLinePerTenthAndAFinalLine) {
  std::FILE* f = std::tmpfile();
  ASSERT_NE(f, nullptr);
  {
    LoadProgress p("test", 100, 100 * 1024 * 1024, f, /*terminal=*/0);
    for (int i = 0; i < 100; ++i) p.Add(1024 * 1024);
    p.Done();
  }
  const auto lines = Lines(f);
  // The start line, 10 %..90 % (100 % is the final line), the final line.
  ASSERT_EQ(lines.size(), 11u);
  EXPECT_NE(lines[0].find("test: loading 100 tensors, 100.0 MiB"), std::string::npos) << lines[0];
  EXPECT_NE(lines[1].find(" 10%  10/100 tensors  10.0 MiB/100.0 MiB"), std::string::npos)
      << lines[1];
  EXPECT_NE(lines[1].find("s left"), std::string::npos) << lines[1];
  EXPECT_NE(lines[9].find(" 90%  90/100 tensors"), std::string::npos) << lines[9];
  EXPECT_NE(lines[10].find("test: loaded 100 tensors, 100.0 MiB in"), std::string::npos)
      << lines[10];
  std::fclose(f);
}

TEST(LoadProgress, TerminalRedrawsOneLine) {
  std::FILE* f = std::tmpfile();
  ASSERT_NE(f, nullptr);
  {
    LoadProgress p("t", 2, 2048, f, /*terminal=*/1);
    for (int i = 0; i < 5; ++i) p.Add(1024);  // more than announced; redrawn at most every 0.2 s
    p.Done();
  }
  const auto lines = Lines(f);
  ASSERT_EQ(lines.size(), 2u);  // the start line; the redraws and the final line share one line
  EXPECT_EQ(lines[1].rfind("\rt:  50%  1/2 tensors", 0), 0u) << lines[1];
  EXPECT_NE(lines[1].find("\r\033[Kt: loaded 5 tensors"), std::string::npos) << lines[1];
  std::fclose(f);
}

TEST(LoadProgress, NeverShowsMoreThanTheTotals) {
  std::FILE* f = std::tmpfile();
  ASSERT_NE(f, nullptr);
  {
    LoadProgress p("x", 2, 2048, f, /*terminal=*/0);
    for (int i = 0; i < 5; ++i) p.Add(1024);
  }
  for (const std::string& line : Lines(f)) {
    EXPECT_EQ(line.find("3/2"), std::string::npos) << line;
    EXPECT_EQ(line.find("250%"), std::string::npos) << line;
  }
  std::fclose(f);
}

TEST(LoadProgress, AFailedLoadIsNotReportedAsLoaded) {
  std::FILE* f = std::tmpfile();
  ASSERT_NE(f, nullptr);
  {
    LoadProgress p("y", 10, 10240, f, /*terminal=*/0);
    for (int i = 0; i < 3; ++i) p.Add(1024);
  }  // no Done(): the load failed
  const auto lines = Lines(f);
  ASSERT_FALSE(lines.empty());
  EXPECT_EQ(lines.back(), "y: loading stopped after 3 tensors\n");
  for (const std::string& line : lines) EXPECT_EQ(line.find("loaded"), std::string::npos) << line;
  std::fclose(f);
}

}  // namespace
}  // namespace dmoe
