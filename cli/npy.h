// Writes a float32 array as a standard NumPy .npy file (format version 1.0, little-endian, C
// order).
#ifndef DMOE_CLI_NPY_H_
#define DMOE_CLI_NPY_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"

namespace dmoe::cli {

absl::Status WriteNpyFloat32(const std::string& path, const std::vector<int64_t>& shape,
                             const float* data);

}  // namespace dmoe::cli

#endif  // DMOE_CLI_NPY_H_
