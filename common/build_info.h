// What this binary is: the project's version (the VERSION file) and, in a stamped build (bazel
// build --stamp, as the Dockerfiles build), the commit it was built from ("unstamped" otherwise).
// Shown by every binary's --version, logged at start and exported as dmoe_build_info.
#ifndef DMOE_COMMON_BUILD_INFO_H_
#define DMOE_COMMON_BUILD_INFO_H_

#include <string>

namespace dmoe {

const char* BuildVersion();
const char* BuildCommit();
// "dmoe-gateway 0.1.0 (commit 0123456789ab)".
std::string VersionLine(const std::string& program);
// Prints VersionLine(program) to stdout; returns 0 (for --version).
int PrintVersion(const std::string& program);

}  // namespace dmoe

#endif  // DMOE_COMMON_BUILD_INFO_H_
