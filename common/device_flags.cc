#include "common/device_flags.h"

#include <string>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace dmoe {

const char kDeviceHelp[] =
    R"(  --device D           cpu (default) or cuda: with cuda the attention layers (and experts
                       computed in this process) run on a CUDA GPU; builds without the CUDA
                       toolkit, or machines without a GPU, refuse it with the reason
  --gpu N              the CUDA device to use (default 0; with --device cuda)
)";

absl::StatusOr<DeviceChoice> ParseDevice(const Flags& f) {
  DeviceChoice d;
  const std::string device = f.StringOr("device", "cpu");
  if (device == "cuda") {
    d.cuda = true;
  } else if (device != "cpu") {
    return absl::InvalidArgumentError(
        absl::StrCat("--device: \"", device, "\" is not cpu or cuda"));
  }
  ASSIGN_OR_RETURN(int64_t gpu, f.Int("gpu", 0));
  if (gpu < 0 || gpu > 1023) return absl::InvalidArgumentError("--gpu: must be in [0, 1023]");
  if (f.Has("gpu") && !d.cuda) return absl::InvalidArgumentError("--gpu needs --device cuda");
  d.gpu = static_cast<int>(gpu);
  return d;
}

}  // namespace dmoe
