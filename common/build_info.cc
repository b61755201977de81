#include "common/build_info.h"

#include <cstdio>

// Defined by the generated build_stamp_*.cc (common/BUILD).
extern const char kDmoeVersion[];
extern const char kDmoeCommit[];

namespace dmoe {

const char* BuildVersion() { return kDmoeVersion; }
const char* BuildCommit() { return kDmoeCommit; }

std::string VersionLine(const std::string& program) {
  return program + " " + kDmoeVersion + " (commit " + kDmoeCommit + ")";
}

int PrintVersion(const std::string& program) {
  std::printf("%s\n", VersionLine(program).c_str());
  return 0;
}

}  // namespace dmoe
