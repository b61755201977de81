// --device cpu|cuda and --gpu N, shared by dmoe, dmoe-attention and dmoe-expert.
#ifndef DMOE_COMMON_DEVICE_FLAGS_H_
#define DMOE_COMMON_DEVICE_FLAGS_H_

#include <string>

#include "absl/status/statusor.h"
#include "common/flags.h"

namespace dmoe {

struct DeviceChoice {
  bool cuda = false;  // --device cuda
  int gpu = 0;        // --gpu N
};

// The two flags' --help lines, their descriptions starting at `column` (as the other flags');
// `experts_only`: the process computes only routed experts (dmoe-expert).
std::string DeviceHelp(int column, bool experts_only = false);

// INVALID_ARGUMENT naming the flag for a device other than cpu or cuda, a negative --gpu, or
// --gpu without --device cuda.
absl::StatusOr<DeviceChoice> ParseDevice(const Flags& f);

}  // namespace dmoe

#endif  // DMOE_COMMON_DEVICE_FLAGS_H_
