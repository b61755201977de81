// libFuzzer target: the safetensors header parser on arbitrary file bytes.
#include <cstddef>
#include <cstdint>

#include "model/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto r = dmoe::ParseSafetensorsHeader(data, size);
  if (r.ok()) {
    // Every accepted range must lie inside the input.
    for (const dmoe::TensorInfo& t : *r) {
      if (t.offset + t.nbytes > size) __builtin_trap();
    }
  }
  return 0;
}
