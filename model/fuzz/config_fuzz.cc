// libFuzzer target: config.json parsing and validation on arbitrary text.
#include <cstddef>
#include <cstdint>
#include <string>

#include "model/config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto c = dmoe::ParseModelConfig(std::string(reinterpret_cast<const char*>(data), size));
  if (c.ok()) {
    // Accepted configs must round-trip and satisfy their own validation.
    auto back = dmoe::ParseModelConfig(dmoe::ModelConfigToJson(*c));
    if (!back.ok()) __builtin_trap();
  }
  return 0;
}
