// Starting and stopping the real dmoe binaries from tests (common/process.h's ChildProcess: every
// child tracked by PID, killed and reaped at the latest when its ChildProcess is destroyed).
#ifndef DMOE_TESTS_PROCESS_UTIL_H_
#define DMOE_TESTS_PROCESS_UTIL_H_

#include <chrono>
#include <map>
#include <string>

#include "common/process.h"

namespace dmoe::testing {

using ::dmoe::ChildProcess;

// $TEST_SRCDIR/dmoe/<path>, the runfiles path of a binary of this workspace.
std::string Runfile(const std::string& path);
std::string TmpDir();

// Waits up to `timeout` for a JSON file written by --ready-file; returns its string/number
// fields, or an empty map on timeout.
std::map<std::string, std::string> WaitForReadyFile(const std::string& path,
                                                    std::chrono::milliseconds timeout);

}  // namespace dmoe::testing

#endif  // DMOE_TESTS_PROCESS_UTIL_H_
