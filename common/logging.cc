#include "common/logging.h"

#include <spdlog/sinks/stdout_sinks.h>

#include <memory>

#include "absl/strings/str_cat.h"

namespace dmoe {

absl::Status InitLogging(const std::string& component, const std::string& level) {
  auto logger = std::make_shared<spdlog::logger>(component,
                                                 std::make_shared<spdlog::sinks::stderr_sink_mt>());
  logger->set_pattern("%Y-%m-%dT%H:%M:%S.%e %L %n: %v");
  logger->flush_on(spdlog::level::trace);  // every line reaches the log at once (crash, SIGKILL)
  spdlog::set_default_logger(logger);
  const spdlog::level::level_enum l = spdlog::level::from_str(level);
  // from_str answers "off" for an unknown name: only "off" itself may mean off.
  if (l == spdlog::level::off && level != "off") {
    spdlog::set_level(spdlog::level::info);
    return absl::InvalidArgumentError(
        absl::StrCat("--log-level: \"", level, "\" is not one of ", kLogLevels));
  }
  spdlog::set_level(l);
  return absl::OkStatus();
}

}  // namespace dmoe
