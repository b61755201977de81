// Random-weight checkpoints in the exact Hugging Face layout, for tests, benchmarks and the demo.
// Presets and the weight scale rule are MODEL_SPEC.md's "Test presets".
#ifndef DMOE_MODEL_TINY_MODEL_H_
#define DMOE_MODEL_TINY_MODEL_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "model/config.h"
#include "model/dtype.h"

namespace dmoe {

// "tiny", "tiny-lite", "tiny-demo" (tiny with the DeepSeek-V3 vocabulary size) or "small".
absl::StatusOr<ModelConfig> PresetConfig(const std::string& preset);

struct TinyModelOptions {
  uint64_t seed = 0;
  DType dtype = DType::kF32;  // kF32 or kBF16
  int shards = 1;             // > 1 writes model-0000i-of-0000N.safetensors + index
};

// Writes config.json and the safetensors file(s) into `out_dir` (created if missing). Each tensor's
// values depend only on (seed, tensor name), so every dtype/sharding of one seed holds the same
// draws (bf16 = round-to-nearest-even of the f32 draw).
absl::Status WriteTinyModel(const std::string& out_dir, const ModelConfig& config,
                            const TinyModelOptions& options);

// The tensors of a full checkpoint for `config`, in file order, with their shapes.
struct TensorSpec {
  std::string name;
  std::vector<int64_t> shape;
};
std::vector<TensorSpec> CheckpointTensors(const ModelConfig& config);

}  // namespace dmoe

#endif  // DMOE_MODEL_TINY_MODEL_H_
