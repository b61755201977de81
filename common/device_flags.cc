#include "common/device_flags.h"

#include <algorithm>
#include <string>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace dmoe {

std::string DeviceHelp(int column, bool experts_only) {
  const std::string pad(static_cast<size_t>(column), ' ');
  auto flag = [&](const std::string& f) {
    return "  " + f + pad.substr(std::min(pad.size(), f.size() + 2));
  };
  const std::string what = experts_only
                               ? "cpu (default) or cuda: with cuda the experts run on a CUDA GPU\n"
                               : "cpu (default) or cuda: with cuda the attention layers (and the "
                                 "experts\n" +
                                     pad + "computed in this process) run on a CUDA GPU\n";
  return flag("--device D") + what + pad +
         "(a bf16 checkpoint stays bf16 there and runs with bf16 activations, the\n" + pad +
         "CPU's A16 arithmetic; other weights fp32); builds without the\n" + pad +
         "CUDA toolkit, or machines without a GPU, refuse it with the reason\n" + flag("--gpu N") +
         "the CUDA device to use (default 0; with --device cuda)\n";
}

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
