// Logging for every dmoe process, through spdlog (Debian's libspdlog-dev: levels, timestamps, a
// thread-safe stderr sink; fmt-style arguments). Each line reads
//   2026-12-02T07:34:10.123 I dmoe-attention: serving on 127.0.0.1:4001
// (time, level letter T/D/I/W/E/C, the component, the message). Call InitLogging once in main;
// library code logs with spdlog::info/warn/error(...) and gets the process's component.
#ifndef DMOE_COMMON_LOGGING_H_
#define DMOE_COMMON_LOGGING_H_

#include <spdlog/spdlog.h>

#include <string>

#include "absl/status/status.h"

namespace dmoe {

// The --log-level values, for help texts.
inline constexpr char kLogLevels[] = "trace, debug, info (default), warn, error, critical, off";

// Makes `component` the name in every line and `level` the least severe one printed. An unknown
// level is an error naming --log-level (logging then stays at info).
absl::Status InitLogging(const std::string& component, const std::string& level = "info");

}  // namespace dmoe

#endif  // DMOE_COMMON_LOGGING_H_
